"""The one optimiser step of every torch trainer here (SFT, reward model, policy, baselines).

AdamW without weight decay, gradients clipped to norm 1.0, a linear learning-rate warm-up (a fresh Adam's
first steps move every weight by about ``lr``, which knocks a converged warm start off its optimum), then
the lr held (``constant``) or decayed to ``min_lr_ratio * lr`` by ``total_steps`` (``linear`` or
``cosine``). The DeepSpeed learners hand the same schedule to their engine (``runtime.learners``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dense_irl.errors import ConfigError

MAX_GRAD_NORM = 1.0
SCHEDULES = ("constant", "linear", "cosine")


def lr_lambda(warmup_steps: int = 0, schedule: str = "constant", total_steps: int = 0,
              min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """The lr multiplier after ``i`` optimiser steps: warm-up, then constant or decayed to ``min_lr_ratio``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule != "constant" and total_steps <= warmup_steps:
        raise ConfigError(f"a {schedule} lr schedule decays over the steps after warm-up: total steps ({total_steps}) "
                          f"must exceed warmup_steps ({warmup_steps})")

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        p = min(1.0, (i - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


def check_schedule(prefix: str, cfg, total_steps: int | None = None) -> None:
    """ConfigError naming ``prefix.<key>`` for a bad lr / warm-up / schedule / micro-batch option of ``cfg``
    (``total_steps``: the steps the schedule spans, where known)."""
    if cfg.lr < 0:
        raise ConfigError(f"{prefix}.lr must be >= 0 (0 freezes the model), got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"{prefix}.warmup_steps must be >= 0 (0: no warm-up), got {cfg.warmup_steps}")
    if cfg.lr_schedule not in SCHEDULES:
        raise ConfigError(f"{prefix}.lr_schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"{prefix}.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if total_steps is not None and cfg.lr_schedule != "constant" and total_steps <= cfg.warmup_steps:
        raise ConfigError(f"{prefix}.lr_schedule {cfg.lr_schedule!r} decays over the steps after warm-up: the "
                          f"run's {total_steps} steps must exceed {prefix}.warmup_steps ({cfg.warmup_steps})")
    if cfg.micro_batch_tokens < 0:
        raise ConfigError(f"{prefix}.micro_batch_tokens must be >= 0 (0: the whole batch in one pass), got "
                          f"{cfg.micro_batch_tokens}")


class Optimizer:
    """AdamW + gradient clipping + the lr schedule of :func:`lr_lambda`.

    ``step(loss)`` runs backward and steps; ``step()`` steps on gradients already accumulated (micro-batches,
    ``algo.microbatch``). Gradients are zeroed after every step.
    """

    def __init__(self, params, lr: float, warmup_steps: int = 0, schedule: str = "constant", total_steps: int = 0,
                 min_lr_ratio: float = 0.0):
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        self.sched = None
        if warmup_steps > 0 or schedule != "constant":
            self.sched = torch.optim.lr_scheduler.LambdaLR(
                self.opt, lr_lambda(warmup_steps, schedule, total_steps, min_lr_ratio))

    def step(self, loss: torch.Tensor | None = None) -> float:
        """(Backward,) clip, step, advance the schedule, zero the gradients; returns the gradient norm."""
        if loss is not None:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """The moments and the schedule (what an exact resume needs)."""
        return {"optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])
