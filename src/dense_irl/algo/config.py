"""The algorithm's configs: the SFT warm start, the reward objective and the policy update.

Each default is the shipped recipe (the presets in ``dense_irl/presets`` set only what differs, such as
budgets). Options that only one program uses live in that program's config: the offline run extends
:class:`RewardConfig` (``dense_irl.offline.config``), the online loop owns its mixing of negatives
(``dense_irl.runtime.loop_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dense_irl.algo.optim import check_schedule
from dense_irl.errors import ConfigError


@dataclass
class SFTConfig:
    """Next-token training of the policy on the demonstrations (the warm start)."""

    max_steps: int = 1000  # the budget, in optimiser steps (0: no warm start)
    minutes: float = 0.0  # a wall-clock cap on top of the steps (0: none)
    lr: float = 2e-3
    batch_size: int = 32
    warmup_steps: int = 0  # linear lr warm-up
    lr_schedule: str = "constant"  # after warm-up: "constant", or "linear" / "cosine" decay over max_steps
    min_lr_ratio: float = 0.0  # where the decay ends, as a share of lr
    # Padded tokens per forward pass, rows grouped by length, gradients accumulated (0: the whole batch in one
    # pass, padded to its longest chain); 1,024 measured fastest on CPU for both the tiny model and SmolLM2
    # (bench/learner_bench.py); GPUs take more (the GPU presets' 8-16k).
    micro_batch_tokens: int = 1024

    def check(self) -> None:
        """Raise a ConfigError naming the first option with a bad value."""
        check_schedule("sft", self, self.max_steps)
        if self.batch_size < 1 or self.max_steps < 0:
            raise ConfigError(f"sft.batch_size must be >= 1 and sft.max_steps >= 0, got {self.batch_size} and "
                              f"{self.max_steps}")


@dataclass
class RewardConfig:
    """The reward objective (AIRL discriminator + inverse soft-Q terms) and its optimiser."""

    objective: Literal["airl", "iq", "airl+iq"] = "airl+iq"
    gail: bool = False  # ablation: GAIL logit (no h potential, no -log pi term)
    alpha: float = 1.0  # max-ent temperature: how noisy the experts are believed to be
    gamma: float = 1.0
    label_smoothing: float = 0.1
    # The discriminator's BCE at the step, paragraph (paragraph_steps steps) and whole-chain levels.
    level_weights: dict[str, float] = field(default_factory=lambda: {"step": 1.0, "paragraph": 0.0, "task": 0.0})
    paragraph_steps: int = 2
    lm_weight: float = 1.0  # expert NLL (the iq objective; keeps the backbone's knowledge in airl+iq)
    td_weight: float = 0.01  # IQ-Learn chi^2 term on the implied token reward
    lr: float = 1e-3
    warmup_steps: int = 0  # linear learning-rate warm-up (a fresh optimiser on a warm-started backbone)
    lr_schedule: str = "constant"  # after warm-up: "constant", or "linear" / "cosine" decay over the run's steps
    min_lr_ratio: float = 0.0
    micro_batch_tokens: int = 1024  # padded tokens per forward pass, length-grouped, accumulated (0: one pass)
    batch_size: int = 32  # experts per step
    # A negative's leading steps that equal its expert's are expert state-actions, not negatives: leave them
    # out of its discriminator loss (False: label every step of a negative 0, plain chain-level AIRL).
    mask_expert_prefix: bool = True
    # With mask_expert_prefix: also leave out the steps after the one where a negative leaves its expert (a
    # perturbed expert's later steps are right given its error; labelled 0 they teach the LM wrong arithmetic).
    divergence_only: bool = True
    # False: the discriminator trains only the g/h/temperature heads; the backbone learns from the iq terms alone.
    disc_backbone_grad: bool = True
    # A learned per-token temperature on the lm term (see RewardModel): where surprise means an error (airl+iq).
    token_temperature: bool = True
    # What the checkpoint serves: "reward" (the step reward R_k) or "logit" (R_k - alpha * log pi(step k), the
    # AIRL discriminator logit, free of the step's length; models.reward_model).
    readout: str = "reward"
    head_layer: int = -1  # which hidden states the g/h/temperature heads read (-1: the last layer's)

    def check(self) -> None:
        """Raise a ConfigError naming the first option with a bad value."""
        from dense_irl.models.reward_model import READOUTS

        if self.readout not in READOUTS:
            raise ConfigError(f"reward.readout must be one of {list(READOUTS)}, got {self.readout!r}")
        if self.alpha <= 0:
            raise ConfigError(f"reward.alpha must be > 0 (the max-ent temperature divides the reward), got {self.alpha}")
        check_schedule("reward", self)
        if self.batch_size < 1:
            raise ConfigError(f"reward.batch_size must be >= 1, got {self.batch_size}")
        unknown = sorted(set(self.level_weights) - {"step", "paragraph", "task"})
        if unknown:
            raise ConfigError(f"reward.level_weights: unknown level {unknown[0]!r}; valid: step, paragraph, task")
        if self.divergence_only and not self.mask_expert_prefix:
            raise ConfigError("reward.divergence_only needs reward.mask_expert_prefix: true (the loss then starts and "
                              "ends at the step where a negative leaves its expert)")
        if self.token_temperature and self.objective != "airl+iq":
            raise ConfigError(f"reward.token_temperature scales the lm term by a head the discriminator learns: it "
                              f"needs objective 'airl+iq', not {self.objective!r}; or set "
                              "reward.token_temperature: false")


@dataclass
class RLConfig:
    """The policy update: advantages from the dense step rewards, then PPO-clip + KL + PPO-ptx."""

    lr: float = 5e-4
    # The lr rises linearly over this many PPO steps: a fresh Adam's first steps move every weight by about lr,
    # which knocks the SFT policy off its optimum (without it the first step jumped to KL 1-8).
    warmup_steps: int = 4
    lr_schedule: str = "constant"  # after warm-up: "constant", or "linear" / "cosine" decay over the run's steps
    min_lr_ratio: float = 0.0
    micro_batch_tokens: int = 1024  # padded tokens per forward pass, length-grouped, accumulated (0: one pass)
    clip: float = 0.2
    kl_coef: float = 0.05
    gamma: float = 1.0
    ppo_steps: int = 4  # policy steps per iteration
    advantages: str = "group"  # an estimator of dense_irl.algo.advantages.ADVANTAGE_ESTIMATORS
    # Weight of the verifier's group-normalised 0/1 outcome, added to every step's advantage (0: dense only).
    outcome_weight: float = 1.0
    # PPO-ptx (InstructGPT; OpenRLHF's --ptx_coef): every policy step also lowers ptx_coef * the expert NLL of
    # the iteration's prompts' demonstrations, so the policy keeps imitating while it follows the dense rewards.
    ptx_coef: float = 1.0

    def check(self) -> None:
        """Raise a ConfigError naming the first option with a bad value."""
        from dense_irl.algo.advantages import ADVANTAGE_ESTIMATORS

        if self.advantages not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(f"rl.advantages must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {self.advantages!r}")
        check_schedule("rl", self)
        if self.ptx_coef < 0:
            raise ConfigError(f"rl.ptx_coef must be >= 0 (the weight of the expert NLL in the policy loss), got "
                              f"{self.ptx_coef}")
        if self.ppo_steps < 1:
            raise ConfigError(f"rl.ppo_steps must be >= 1, got {self.ppo_steps}")


def reward_model_config(cfg: RewardConfig, separator: str, max_length: int):
    """The reward model's own config for an objective: which reward terms it reads out."""
    from dense_irl.models.reward_model import RewardModelConfig

    return RewardModelConfig(
        terms={"airl": "heads", "iq": "lm", "airl+iq": "lm+heads"}[cfg.objective], potential=not cfg.gail,
        gamma=cfg.gamma, alpha=cfg.alpha, separator=separator, max_length=max_length,
        paragraph_steps=cfg.paragraph_steps, token_temperature=cfg.token_temperature, readout=cfg.readout,
        head_layer=cfg.head_layer,
    )
