"""The one optimiser step of every torch trainer here (SFT, reward model, policy, baselines).

AdamW without weight decay, gradients clipped to norm 1.0, and a linear learning-rate warm-up: a fresh
Adam's first steps move every weight by about ``lr``, which knocks a converged warm start off its optimum.
(The DeepSpeed learners get the same recipe from their engine's config: ``runtime.learners``.)
"""

from __future__ import annotations

import torch

MAX_GRAD_NORM = 1.0


class Optimizer:
    """AdamW + gradient clipping + linear warm-up over ``warmup_steps`` steps; :meth:`step` takes a loss."""

    def __init__(self, params, lr: float, warmup_steps: int = 0):
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        self.sched = None
        if warmup_steps > 0:
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / warmup_steps))

    def step(self, loss: torch.Tensor) -> None:
        """Backward, clip, step, advance the schedule."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def state_dict(self) -> dict:
        """The moments and the schedule (what an exact resume needs)."""
        return {"optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])
