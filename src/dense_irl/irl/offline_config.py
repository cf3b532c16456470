"""The offline run's config (``dense-irl train-reward``), one dataclass per component, and its checks.

The online loop (``dense_irl.runtime.loop_config``) reuses the data, SFT and reward parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dense_irl.data.perturb import KINDS
from dense_irl.data.synthetic import SyntheticConfig
from dense_irl.models.factory import ModelConfig
from dense_irl.models.reward_model import RewardModelConfig


@dataclass
class DataConfig:
    """Where demonstrations come from: ``train`` is "synthetic" or a data file any reader accepts."""

    train: str = "synthetic"
    format: str = "auto"
    step_separator: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    calibration_chains: int = 400  # held-out demos perturbed to calibrate the first-error threshold
    perturbations: list[str] = field(default_factory=lambda: list(KINDS))
    max_demos: int | None = None


@dataclass
class SFTConfig:
    """Next-token training of the backbone on the demonstrations (the warm start)."""

    minutes: float = 2.0
    max_steps: int = 100_000
    lr: float = 2e-3
    batch_size: int = 32


@dataclass
class RewardConfig:
    """The reward objective and its optimisation."""

    objective: Literal["airl", "iq", "airl+iq"] = "airl+iq"
    gail: bool = False  # ablation: GAIL logit (no h potential, no -log pi term)
    alpha: float = 1.0  # max-ent temperature: how noisy the experts are believed to be
    gamma: float = 1.0
    label_smoothing: float = 0.1
    level_weights: dict[str, float] = field(default_factory=lambda: {"step": 1.0, "paragraph": 0.5, "task": 0.5})
    paragraph_steps: int = 2
    lm_weight: float = 1.0  # expert NLL (the iq objective; keeps the backbone's knowledge in airl+iq)
    td_weight: float = 0.01  # IQ-Learn chi^2 term on the implied token reward
    init: Literal["sft", "random"] = "sft"  # the backbone's start: the SFT policy, or random init
    minutes: float = 3.0
    max_steps: int = 100_000
    lr: float = 1e-3
    warmup_steps: int = 0  # linear learning-rate warm-up (a fresh optimiser on a warm-started backbone)
    batch_size: int = 32  # experts per batch
    negatives_per_expert: float = 1.0  # < 1: a cheaper step; the lm term still sees every expert
    negative_pool: int = 0  # > 0: fixed negatives per expert, pi_old log-probs cached (offline only)
    readout_weights: list[float] = field(default_factory=lambda: [1.0])  # heads' weight, calibrated
    # A negative's leading steps that equal its expert's are expert state-actions, not negatives: leave them
    # out of its discriminator loss (False: label every step of a negative 0, plain chain-level AIRL).
    mask_expert_prefix: bool = False
    # With mask_expert_prefix: also leave out the steps after the one where a negative leaves its expert (a
    # perturbed expert's later steps are right given its error; labelled 0 they teach the LM wrong arithmetic).
    divergence_only: bool = False
    # False: the discriminator trains only the g/h/temperature heads; the backbone learns from the iq terms alone.
    disc_backbone_grad: bool = True
    # A learned per-token temperature on the lm term (see RewardModel): where surprise means an error.
    token_temperature: bool = False
    # With init "sft": the backbone goes on with the warm start's AdamW moments and learning rate (sft.lr), so
    # the expert-NLL term learns as fast as SFT trained on would; the heads start fresh at reward.lr.
    continue_sft_optimizer: bool = False


@dataclass
class TrainRewardConfig:
    """``dense-irl train-reward``: everything the offline run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    output_dir: str = "runs/reward"
    seed: int = 0
    log_every: int = 25
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def reward_model_config(cfg: RewardConfig, separator: str, max_length: int) -> RewardModelConfig:
    """The reward model's own config for an objective: which reward terms it reads out."""
    return RewardModelConfig(
        terms={"airl": "heads", "iq": "lm", "airl+iq": "lm+heads"}[cfg.objective], potential=not cfg.gail,
        gamma=cfg.gamma, alpha=cfg.alpha, separator=separator, max_length=max_length,
        paragraph_steps=cfg.paragraph_steps, token_temperature=cfg.token_temperature,
    )


def check_reward_config(r: RewardConfig) -> None:
    """Raise a ValueError naming the first reward option with a bad value (offline and online runs)."""
    if r.alpha <= 0:
        raise ValueError(f"reward.alpha must be > 0 (the max-ent temperature divides the reward), got {r.alpha}")
    if not r.negatives_per_expert > 0:
        raise ValueError(f"reward.negatives_per_expert must be > 0, got {r.negatives_per_expert}")
    if r.warmup_steps < 0:
        raise ValueError(f"reward.warmup_steps must be >= 0 (0: no warm-up), got {r.warmup_steps}")
    if r.negative_pool < 0:
        raise ValueError(f"reward.negative_pool must be >= 0 (0: fresh negatives each step), got {r.negative_pool}")
    if not r.readout_weights or min(r.readout_weights) < 0:
        raise ValueError(f"reward.readout_weights must be a non-empty list of weights >= 0, got {r.readout_weights}")
    if r.divergence_only and not r.mask_expert_prefix:
        raise ValueError("reward.divergence_only needs reward.mask_expert_prefix: true (the loss then starts and "
                         "ends at the step where a negative leaves its expert)")
    if r.token_temperature and r.objective == "airl":
        raise ValueError("reward.token_temperature scales the lm term, which objective 'airl' does not have; "
                         "use objective 'airl+iq' or 'iq'")
