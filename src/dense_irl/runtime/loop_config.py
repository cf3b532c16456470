"""The online IRL run's config (``dense-irl train``, ``jobs/train_irl.py``): one dataclass per component.

Defaults are the recipe of ``make demo`` (preset ``demo_online``). Checked in full by
:meth:`LoopConfig.check` before any actor starts or any time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dense_irl.algo.config import RewardConfig, RLConfig, SFTConfig
from dense_irl.algo.optim import check_schedule
from dense_irl.data.demos import DataConfig
from dense_irl.errors import ConfigError, MissingFileError
from dense_irl.models.factory import ModelConfig
from dense_irl.runtime.learners import LearnerConfig
from dense_irl.runtime.placement import STRATEGIES
from dense_irl.sampling.engines import RolloutConfig


@dataclass
class PublishConfig:
    """Live publishing: every reward-model checkpoint of the run goes live in a running ``dense-irl serve``."""

    publish_url: str = ""  # e.g. http://127.0.0.1:8000 ("" = off); it must be able to read output_dir
    token: str = ""  # its bearer token ("" = env DENSE_IRL_TOKEN, else none)
    timeout_s: float = 120.0  # how long one reload may take (the server waits for its replicas)


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
    serve: PublishConfig = field(default_factory=PublishConfig)
    iterations: int = 9
    minutes: float = 0.0  # wall-clock cap on the iterations (0: none); the last one is checkpointed
    prompts_per_iteration: int = 16
    reward_steps: int = 8  # reward steps per iteration
    # The reward model's backbone: "" = the SFT policy (default), or a local HF folder (e.g. a 0.5B model next
    # to a 1.5B policy) that shares the policy's tokenizer, since pi_old is read on the reward model's tokens.
    reward_backbone: str = ""
    negative_mix: float = 0.5  # share of negatives that are perturbed experts (the rest: policy samples)
    # Which policy samples are negatives: "all" (AIRL: expert vs policy) or "incorrect" (those the outcome
    # verifier rejects: the policy's own mistakes, no correct chain labelled as a negative).
    policy_negatives: str = "incorrect"
    eval_every: int = 5
    eval_prompts: int = 32
    checkpoint_every: int = 5
    log_every: int = 25  # a metrics row every this many warm-start SFT steps (iterations: every one)
    # Placement group pinning the roles: "PACK" (default), "SPREAD", "STRICT_PACK", "STRICT_SPREAD", or
    # "none" (plain actor scheduling). Inside a placement group already (a Ray Tune trial) the actors go there.
    placement_strategy: str = "PACK"
    colocate_learners: bool = False  # policy and reward learner of a rank share one bundle
    placement_timeout_s: float = 120.0
    output_dir: str = "runs/irl"
    resume: str = "no"  # "no", "auto" (latest checkpoint in output_dir) or a checkpoint folder
    seed: int = 0

    def check(self) -> None:
        """Raise one clear error for the first value that cannot run (the loader checks names and types)."""
        self.data.check()
        self.model.check()
        self.sft.check()
        self.reward.check()
        self.rl.check()
        check_schedule("reward", self.reward, self.iterations * self.reward_steps)
        check_schedule("rl", self.rl, self.iterations * self.rl.ppo_steps)
        url = self.serve.publish_url
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"serve.publish_url must be the http(s) URL of a running dense-irl serve, got {url!r}")
        if self.serve.publish_url and self.checkpoint_every < 1:
            raise ConfigError("serve.publish_url publishes each checkpoint, but checkpoint_every is 0 (none is written)")
        if self.reward_backbone and not (Path(self.reward_backbone).expanduser() / "config.json").is_file():
            raise MissingFileError(f"reward_backbone: no HF model folder at {self.reward_backbone} "
                                   "(expected config.json)")
        if self.prompts_per_iteration < self.learner.num_workers:
            raise ConfigError(f"prompts_per_iteration ({self.prompts_per_iteration}) must be >= learner.num_workers "
                              f"({self.learner.num_workers}): every data-parallel rank needs a shard")
        if not 0 <= self.negative_mix <= 1:
            raise ConfigError(f"negative_mix must be in [0, 1] (the share of perturbed negatives), got "
                              f"{self.negative_mix}")
        if self.policy_negatives not in ("all", "incorrect"):
            raise ConfigError(f"policy_negatives must be 'all' or 'incorrect', got {self.policy_negatives!r}")
        if self.placement_strategy not in (*STRATEGIES, "none"):
            raise ConfigError(f"placement_strategy must be one of {STRATEGIES} or 'none', got "
                              f"{self.placement_strategy!r}")
        self.learner.check()
        self.rollout.check()
        if self.resume not in ("no", "auto") and not (Path(self.resume) / "state.json").is_file():
            raise MissingFileError(f"resume: no checkpoint at {self.resume} (expected state.json inside)")
