"""The offline run's config (``dense-irl train-reward``): the shared components plus its own reward options.

Defaults are the recipe of ``make demo-offline`` (preset ``offline_tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dense_irl.algo.config import RewardConfig, SFTConfig
from dense_irl.algo.optim import check_schedule
from dense_irl.data.demos import DataConfig
from dense_irl.errors import ConfigError
from dense_irl.models.factory import ModelConfig


@dataclass
class OfflineRewardConfig(RewardConfig):
    """The reward objective, plus what only the offline run has: its step budget and fixed negatives."""

    init: Literal["sft", "random"] = "sft"  # the backbone's start: the SFT policy, or random init
    max_steps: int = 150  # the budget, in reward steps
    minutes: float = 0.0  # a wall-clock cap on top of the steps (0: none)
    negatives_per_expert: float = 1.0  # < 1: a cheaper step; the lm term still sees every expert
    negative_pool: int = 2  # > 0: fixed negatives per expert, pi_old log-probs computed once (0: fresh each step)
    # > 0: steps draw their experts from the first expert_pool train demonstrations (of a seeded shuffle). With a
    # frozen backbone each chain runs through it once, so a pool the steps revisit trains the heads for many
    # epochs on few forward passes (0: every train demonstration).
    expert_pool: int = 0
    # Standardise the heads' input per dimension by the mean and std of expert-token hidden states
    # (RewardModel.fit_head_norm), so one lr suits every dimension: with a frozen backbone over the pool's cached
    # states; with a trainable one over the starting backbone's, once (offline.train.fit_head_norm_at_start).
    head_norm: bool = False
    readout_weights: list[float] = field(default_factory=lambda: [1.0])  # heads' weight, calibrated
    # > 0: that many continuations of each pool expert's first k steps (k drawn at random) are sampled from the
    # SFT policy and join its fixed negatives (offline.policy_negatives): the policy's own mistakes, AIRL's
    # negatives. "incorrect": those whose final answer the outcome verifier rejects; "all": every one that is
    # not the expert's chain. Which steps count as negative: "all" from where it leaves the expert on; "first_error"
    # only the first step whose notes' arithmetic is wrong or whose result is in neither the question nor the
    # expert's solution (data.calc_notes.first_unsupported_step; the last step when none is), the steps before
    # it unlabelled.
    policy_negatives: int = 0
    policy_negatives_keep: Literal["incorrect", "all"] = "incorrect"
    policy_negatives_label: Literal["all", "first_error"] = "all"
    policy_temperature: float = 0.7
    policy_max_new_tokens: int = 96
    policy_batch_size: int = 48  # continuations per generate call
    # The backbone learns from the iq terms (expert NLL + chi^2) alone; the discriminator trains the heads on its
    # features. Its gradient in the backbone cost arithmetic offline (docs/experiments.md).
    disc_backbone_grad: bool = False
    # With init "sft": the backbone goes on with the warm start's AdamW moments and learning rate (sft.lr), so
    # the expert-NLL term learns as fast as SFT trained on would; the heads start fresh at reward.lr.
    continue_sft_optimizer: bool = True

    def backbone_frozen(self) -> bool:
        """Whether nothing in this phase trains the backbone (no expert NLL or TD term, no discriminator
        gradient): then, warm-started from SFT, the backbone is pi_old itself and only the heads train."""
        iq = self.objective in ("iq", "airl+iq") and (self.lm_weight > 0 or self.td_weight > 0)
        return self.init == "sft" and not iq and not self.disc_backbone_grad

    def check(self) -> None:
        super().check()
        check_schedule("reward", self, self.max_steps)
        if not self.negatives_per_expert > 0:
            raise ConfigError(f"reward.negatives_per_expert must be > 0, got {self.negatives_per_expert}")
        if self.head_norm and self.init != "sft":
            raise ConfigError("reward.head_norm fits the heads' input on the warm-started backbone's states: it needs "
                              "reward.init: sft")
        if self.expert_pool < 0:
            raise ConfigError(f"reward.expert_pool must be >= 0 (0: every train demonstration), got {self.expert_pool}")
        if self.negative_pool < 0:
            raise ConfigError(f"reward.negative_pool must be >= 0 (0: fresh negatives each step), got "
                              f"{self.negative_pool}")
        if self.policy_negatives < 0:
            raise ConfigError(f"reward.policy_negatives must be >= 0 (continuations per expert), got "
                              f"{self.policy_negatives}")
        if self.policy_negatives and self.negative_pool < 1:
            raise ConfigError("reward.policy_negatives join each expert's fixed negatives: they need "
                              "reward.negative_pool >= 1")
        if self.policy_negatives_keep not in ("incorrect", "all"):
            raise ConfigError(f"reward.policy_negatives_keep must be 'incorrect' or 'all', got "
                              f"{self.policy_negatives_keep!r}")
        if self.policy_negatives_label not in ("all", "first_error"):
            raise ConfigError(f"reward.policy_negatives_label must be 'all' or 'first_error', got "
                              f"{self.policy_negatives_label!r}")
        if self.policy_negatives and (self.policy_max_new_tokens < 1 or self.policy_batch_size < 1
                                      or self.policy_temperature < 0):
            raise ConfigError("reward.policy_max_new_tokens and reward.policy_batch_size must be >= 1 and "
                              "reward.policy_temperature >= 0")
        if not self.readout_weights or min(self.readout_weights) < 0:
            raise ConfigError(f"reward.readout_weights must be a non-empty list of weights >= 0, got "
                              f"{self.readout_weights}")


@dataclass
class TrainRewardConfig:
    """``dense-irl train-reward``: everything the offline run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: OfflineRewardConfig = field(default_factory=OfflineRewardConfig)
    output_dir: str = "runs/reward"
    seed: int = 0
    log_every: int = 25  # metrics.jsonl / TensorBoard row every this many steps
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def check(self) -> None:
        """Every option checked before any data is loaded or time spent."""
        self.data.check()
        self.model.check()
        self.sft.check()
        self.reward.check()
        if self.reward.continue_sft_optimizer and self.reward.backbone_frozen():
            raise ConfigError("reward.continue_sft_optimizer continues the backbone's optimiser, but nothing trains the "
                              "backbone here (reward.lm_weight and reward.td_weight are 0, reward.disc_backbone_grad is "
                              "false); set reward.continue_sft_optimizer: false")
        if self.reward.continue_sft_optimizer and not (self.sft.max_steps > 0 and self.reward.init == "sft"):
            raise ConfigError("reward.continue_sft_optimizer needs an SFT warm start in this run (sft.max_steps > 0, "
                              "reward.init: sft); or set reward.continue_sft_optimizer: false")
