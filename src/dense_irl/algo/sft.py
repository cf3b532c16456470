"""The one SFT loop (offline run, online warm start, the "SFT trained as long" baseline) and step budgets.

The loop draws seeded batches of demonstrations and hands each to a step function: in process
(:class:`LocalSFT`) or on a learner actor (``runtime.warm_start``), which compute the same
:func:`sft_loss`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from dense_irl.algo.config import SFTConfig
from dense_irl.algo.losses import expert_nll
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


def sft_loss(model, tokenizer, chains: list[Chain], layout: ChainLayout, device=None) -> tuple[torch.Tensor, int]:
    """Next-token NLL of the expert steps (the prompt is context, not a target); also the tokens it saw."""
    enc = encode_chains(tokenizer, chains, layout.max_length, layout.separator)
    ids = enc.input_ids.to(device) if device is not None else enc.input_ids
    mask = enc.attention_mask.to(ids.device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return expert_nll(logits, ids, (enc.step_ids >= 0).to(ids.device)), int(mask.sum())


class LocalSFT:
    """The SFT step of an in-process model: ``step(chains) -> metrics``."""

    def __init__(self, model, tokenizer, layout: ChainLayout, lr: float):
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.opt = Optimizer(model.parameters(), lr)

    def __call__(self, chains: list[Chain]) -> dict:
        self.model.train()
        loss, tokens = sft_loss(self.model, self.tokenizer, chains, self.layout)
        self.opt.step(loss)
        return {"sft_nll": loss.item(), "tokens": tokens}


def train_sft(step: Callable[[list[Chain]], dict], demos: list, cfg: SFTConfig, *, seed: int,
              log: Callable[[dict], None], log_every: int = 25, rng_state=None) -> dict:
    """Run ``cfg.max_steps`` SFT steps (capped at ``cfg.minutes``) on batches drawn from ``demos``.

    Returns ``{"steps", "rng"}``; pass ``rng`` back as ``rng_state`` to go on with the same batch stream
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
    return {"steps": steps, "rng": rng.getstate()}
