"""Configs of reward-guided search: the algorithm's (``SearchConfig``, also the body of ``POST /v1/search``)
and the ``dense-irl search`` job's (``SearchJobConfig``: which policy, which reward model, which prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dense_irl.errors import ConfigError
from dense_irl.eval.bon import AGGREGATIONS

METHODS = ("best_of_n", "beam", "greedy")


@dataclass
class SearchConfig:
    """How one prompt is searched.

    ``best_of_n``: ``n`` whole chains sampled, the best by its aggregated step scores kept. ``beam``: step-level
    beam search, ``beam_width`` partial chains kept after each step, each expanded by ``expand`` sampled next
    steps (``beam_width * expand`` step samples per step, the tokens of about ``beam_width * expand`` chains in
    all: compare it with ``best_of_n`` at ``n = beam_width * expand``). ``greedy``: one chain at temperature 0.
    """

    method: str = "best_of_n"
    n: int = 4  # best_of_n: chains sampled per prompt
    beam_width: int = 2  # beam: partial chains kept after each step
    expand: int = 2  # beam: next steps sampled from each kept chain
    max_steps: int = 16  # beam: steps per chain at most (a chain still open then is kept unfinished)
    aggregation: str = "min"  # a chain's score from its step scores: min, last, sum or mean
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256  # best_of_n / greedy: tokens per chain
    max_step_tokens: int = 64  # beam: tokens per step
    seed: int = 0

    def check(self) -> None:
        """Raise a ConfigError naming the first bad option."""
        if self.method not in METHODS:
            raise ConfigError(f"search.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"search.aggregation must be one of {list(AGGREGATIONS)}, got {self.aggregation!r}")
        for name in ("n", "beam_width", "expand", "max_steps", "max_new_tokens", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.method != "greedy" and self.temperature <= 0:
            raise ConfigError(f"search.temperature must be > 0 for {self.method} (its samples must differ); "
                              "use method: greedy for one greedy chain")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"search.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"search.seed must be in [0, 2**32 - 1], got {self.seed}")


@dataclass
class SearchJobConfig:
    """``dense-irl search``: search every prompt of ``data`` with ``policy`` sampling and ``reward_model``
    ranking; one JSONL row per prompt in ``out``."""

    policy: str = ""  # the policy folder (save_pretrained layout: an SFT policy, a checkpoint's policy/)
    reward_model: str = ""  # a reward-model checkpoint
    data: str = ""  # prompts: any file `dense-irl data convert` reads (answers, when present, are scored)
    format: str = "auto"
    out: str = "search.jsonl"
    engine: str = "hf"  # "hf" or "vllm"
    limit: int = 0  # search the first ``limit`` prompts (0: all)
    prompts_per_batch: int = 16  # prompts searched together (their samples share generate and score calls)
    batch_size: int = 32  # sequences per generate call and chains per scoring pass
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    search: SearchConfig = field(default_factory=SearchConfig)

    def check(self) -> None:
        """Raise a ConfigError naming the first bad option."""
        for name in ("policy", "reward_model", "data"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (--{name}=PATH)")
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.limit < 0 or self.prompts_per_batch < 1 or self.batch_size < 1:
            raise ConfigError("limit must be >= 0, prompts_per_batch and batch_size >= 1")
        self.search.check()
