"""The one SFT loop (offline run, online warm start, the "SFT trained as long" baseline) and step budgets.

The loop draws seeded batches of demonstrations and hands each to a step function: in process
(:class:`LocalSFT`) or on a learner actor (``runtime.warm_start``), which compute the same
:func:`sft_loss`.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from dense_irl.algo.config import SFTConfig
from dense_irl.algo.losses import expert_nll, nll_count
from dense_irl.algo.microbatch import Accumulator, micro_batches, plan, row_lengths, select_rows
from dense_irl.algo.optim import Optimizer
from dense_irl.data.layout import Chain, ChainLayout, encode_chains


def budget(desc: str | None, max_steps: int, minutes: float = 0.0, unit: str = "step") -> Iterator[tuple[int, tqdm]]:
    """Yield ``(step, bar)`` until ``max_steps`` are done or ``minutes`` (0: no cap) run out.

    ``desc`` None: no progress bar (a background task). The bar shows the ETA and, when the caller sets
    its postfix, the throughput.
    """
    deadline = time.monotonic() + 60 * minutes if minutes > 0 else float("inf")
    bar = tqdm(total=max_steps, desc=desc, unit=unit, mininterval=2, disable=desc is None)
    step = 0
    while step < max_steps and time.monotonic() < deadline:
        yield step, bar
        step += 1
        bar.update(1)
    bar.close()


def sft_loss(model, tokenizer, chains: list[Chain], layout: ChainLayout, device=None, *, acc: Accumulator | None = None,
             max_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """Next-token NLL of the expert steps (the prompt is context, not a target); also the tokens it saw.

    Runs in micro-batches of at most ``max_tokens`` padded tokens (0: one pass), longest chains first; with
    ``acc`` each micro-batch is backpropagated there (the returned loss is then detached).
    """
    enc = encode_chains(tokenizer, chains, layout.max_length, layout.separator)
    targets = enc.step_ids >= 0
    n_targets = nll_count(targets)
    groups = plan(acc, micro_batches(row_lengths(enc), max_tokens))
    total: torch.Tensor | float = 0.0
    for j, (rows, weight) in enumerate(groups):
        sub = select_rows(enc, rows)
        ids = sub.input_ids.to(device) if device is not None else sub.input_ids
        with acc.micro(j == len(groups) - 1) if acc is not None else contextlib.nullcontext():
            logits = model(input_ids=ids, attention_mask=sub.attention_mask.to(ids.device)).logits
            part = weight * expert_nll(logits, ids, (sub.step_ids >= 0).to(ids.device), n_targets)
            if acc is not None:
                acc.backward(part)
                part = part.detach()
        total = total + part
    return total, int(enc.attention_mask.sum())


class LocalSFT:
    """The SFT step of an in-process model: ``step(chains) -> metrics`` (``cfg``: lr, schedule, micro-batches)."""

    def __init__(self, model, tokenizer, layout: ChainLayout, cfg: SFTConfig, device=None,
                 autocast_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.layout, self.cfg, self.device = model, tokenizer, layout, cfg, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = Optimizer(params, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps, cfg.min_lr_ratio)
        self.acc = Accumulator(model, self.opt, autocast_dtype=autocast_dtype,
                               device_type=device.type if device is not None else "cpu")

    def __call__(self, chains: list[Chain]) -> dict:
        self.model.train()
        loss, tokens = sft_loss(self.model, self.tokenizer, chains, self.layout, self.device, acc=self.acc,
                                max_tokens=self.cfg.micro_batch_tokens)
        norm = self.acc.step()
        return {"sft_nll": float(loss), "tokens": tokens, "grad_norm": norm, "lr": self.opt.lr()}


def train_sft(step: Callable[[list[Chain]], dict], demos: list, cfg: SFTConfig, *, seed: int,
              log: Callable[[dict], None], log_every: int = 25, rng_state=None) -> dict:
    """Run ``cfg.max_steps`` SFT steps (capped at ``cfg.minutes``) on batches drawn from ``demos``.

    Returns ``{"steps", "tokens", "rng"}`` (``tokens``: the real tokens trained on); pass ``rng`` back as ``rng_state`` to go on with the same batch stream
    (with the step's optimiser state, that is one run: the "SFT trained as long" baseline).
    """
    rng = random.Random(seed)
    if rng_state is not None:
        rng.setstate(rng_state)
    steps, tokens, t0 = 0, 0, time.monotonic()
    for i, bar in budget("sft", cfg.max_steps, cfg.minutes):
        batch = rng.sample(demos, min(cfg.batch_size, len(demos)))
        m = step([(d.prompt, d.steps) for d in batch])
        steps, tokens = i + 1, tokens + m.get("tokens", 0)
        bar.set_postfix(nll=f"{m['sft_nll']:.3f}", tok_s=f"{tokens / max(1e-9, time.monotonic() - t0):.0f}",
                        refresh=False)
        if log_every and i % log_every == 0:
            log({"phase": "sft", "step": i, **m})
    return {"steps": steps, "tokens": tokens, "rng": rng.getstate()}
