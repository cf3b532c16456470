"""The online IRL run's config (``dense-irl train``, ``jobs/train_irl.py``): one dataclass per component.

Checked in full by :func:`check_loop_config` before any actor starts or any time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dense_irl.irl.offline_config import DataConfig, RewardConfig, SFTConfig, check_reward_config
from dense_irl.models.factory import ModelConfig
from dense_irl.runtime.learners import LearnerConfig
from dense_irl.runtime.rollout import RolloutConfig


@dataclass
class RLConfig:
    """The policy update."""

    lr: float = 5e-4
    clip: float = 0.2
    kl_coef: float = 0.05
    gamma: float = 1.0
    outcome_weight: float = 0.0  # weight of the verifier's 0/1 reward on the last step
    ppo_steps: int = 2  # n policy steps per iteration
    # PPO-ptx (InstructGPT; OpenRLHF's --ptx_coef): every policy step also lowers ptx_coef * the expert NLL of
    # the iteration's prompts' demonstrations, so the policy keeps imitating while it follows the dense rewards.
    ptx_coef: float = 0.0
    # The policy's lr rises linearly over this many PPO steps: a fresh Adam's first steps move every weight by
    # about lr, which knocks the SFT policy off its optimum (as reward.warmup_steps does for the reward model).
    warmup_steps: int = 0
    advantages: str = "group"  # "group" (normalised reward-to-go) or "tree" (soft backups, DESIGN §4)


@dataclass
class LoopConfig:
    """`dense-irl train`: the whole online IRL run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    iterations: int = 10
    minutes: float = 0.0  # wall-clock budget of the iterations (0: none); the last one is checkpointed
    prompts_per_iteration: int = 8
    reward_steps: int = 2  # m reward steps per iteration
    # The reward model's backbone: "" = the SFT policy (default), or a local HF folder (e.g. a 0.5B model next
    # to a 1.5B policy) that shares the policy's tokenizer, since pi_old is read on the reward model's tokens.
    reward_backbone: str = ""
    negative_mix: float = 0.5  # share of negatives that are perturbed experts (the rest: policy samples)
    # Which policy samples are negatives: "all" (AIRL: expert vs policy) or "incorrect" (those the outcome
    # verifier rejects: the policy's own mistakes, no correct chain labelled as a negative).
    policy_negatives: str = "all"
    eval_every: int = 5
    eval_prompts: int = 64
    checkpoint_every: int = 5
    # Placement group pinning the roles: "PACK" (default), "SPREAD", "STRICT_PACK", "STRICT_SPREAD", or
    # "none" (plain actor scheduling). Inside a placement group already (a Ray Tune trial) the actors go there.
    placement_strategy: str = "PACK"
    colocate_learners: bool = False  # policy and reward learner of a rank share one bundle
    placement_timeout_s: float = 120.0
    output_dir: str = "runs/irl"
    resume: str = "no"  # "no", "auto" (latest checkpoint in output_dir) or a checkpoint folder
    seed: int = 0


def check_loop_config(cfg: LoopConfig) -> None:
    """Raise one clear error for the first value that cannot run (the dataclasses check names and types)."""
    check_reward_config(cfg.reward)
    if cfg.reward_backbone and not (Path(cfg.reward_backbone).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"reward_backbone: no HF model folder at {cfg.reward_backbone} (expected config.json)")
    if cfg.prompts_per_iteration < cfg.learner.num_workers:
        raise ValueError(f"prompts_per_iteration ({cfg.prompts_per_iteration}) must be >= learner.num_workers "
                         f"({cfg.learner.num_workers}): every data-parallel rank needs a shard")
    if cfg.rl.warmup_steps < 0:
        raise ValueError(f"rl.warmup_steps must be >= 0, got {cfg.rl.warmup_steps}")
    if cfg.rl.ptx_coef < 0:
        raise ValueError(f"rl.ptx_coef must be >= 0 (the weight of the expert NLL in the policy loss), got "
                         f"{cfg.rl.ptx_coef}")
    if cfg.policy_negatives not in ("all", "incorrect"):
        raise ValueError(f"policy_negatives must be 'all' or 'incorrect', got {cfg.policy_negatives!r}")
    if cfg.rollout.weight_sync not in ("object_store", "collective"):
        raise ValueError(f"rollout.weight_sync must be 'object_store' or 'collective', got {cfg.rollout.weight_sync!r}")
    if cfg.reward.continue_sft_optimizer:
        raise ValueError("reward.continue_sft_optimizer is for the offline run (dense-irl train-reward); the online "
                         "loop's warm start trains on a learner and its optimiser state stays there")
    if cfg.resume not in ("no", "auto") and not (Path(cfg.resume) / "state.json").is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {cfg.resume} (expected state.json inside)")
