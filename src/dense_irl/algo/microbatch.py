"""Micro-batches under a token budget, grouped by length, with gradients accumulated exactly.

A batch is encoded once (``data.layout.encode_chains``); its rows are sorted by length and packed into
micro-batches of at most ``max_tokens`` padded tokens each, every micro-batch trimmed to its own longest row
(so short chains are not padded to the batch's longest, nor to ``max_length``). Every loss here is a sum
over tokens, steps or chains divided by a count; the counts are taken on the whole batch before the first
micro-batch, and each micro-batch backpropagates its sum over the whole batch's count, so the accumulated
gradient is the one-pass gradient (to float rounding) whatever the budget.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from dense_irl.data.layout import EncodedBatch


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices per micro-batch: longest rows first, each micro-batch's ``rows x its longest row`` at most
    ``max_tokens`` (a row longer than the budget goes alone). ``max_tokens`` 0: every row in one batch."""
    if max_tokens <= 0 or not lengths:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = [[]]
    for i in order:
        g = groups[-1]
        if g and (len(g) + 1) * lengths[g[0]] > max_tokens:
            groups.append([i])
        else:
            g.append(i)
    return groups


def row_lengths(enc: EncodedBatch) -> list[int]:
    """The unpadded length of every row."""
    return enc.attention_mask.sum(1).tolist()


def select_rows(enc: EncodedBatch, rows: list[int]) -> EncodedBatch:
    """The rows ``rows`` of ``enc``, trimmed to their longest row and their most steps."""
    idx = torch.tensor(rows, dtype=torch.long)
    T = max(1, int(enc.attention_mask[idx].sum(1).max()))
    S = max(1, max(enc.n_steps[i] for i in rows))
    return replace(
        enc, input_ids=enc.input_ids[idx, :T], attention_mask=enc.attention_mask[idx, :T],
        step_ids=enc.step_ids[idx, :T], step_start=enc.step_start[idx, :S], step_end=enc.step_end[idx, :S],
        step_mask=enc.step_mask[idx, :S], n_steps=[enc.n_steps[i] for i in rows],
        n_steps_given=[enc.n_steps_given[i] for i in rows],
        partial=None if enc.partial is None else [enc.partial[i] for i in rows],
    )


class Accumulator:
    """Where micro-batch losses go: ``with acc.micro(last): loss = ...; acc.backward(loss)``, then ``acc.step()``.

    ``engine`` is the model as trained: a plain module with ``optimizer`` (an ``algo.optim.Optimizer``), a
    ``DistributedDataParallel`` wrapper (gradients all-reduced once, on the last micro-batch), or a DeepSpeed
    engine (its accumulation boundary set by hand, so ranks may take different numbers of micro-batches).
    """

    def __init__(self, engine, optimizer=None, backend: str = "torch", autocast_dtype: torch.dtype | None = None,
                 device_type: str = "cuda"):
        self.engine, self.optimizer, self.backend = engine, optimizer, backend
        # bf16 autocast of the forward passes (GPUs: models.training.autocast_dtype), or None
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        self.micro_steps = 0

    @contextlib.contextmanager
    def micro(self, last: bool):
        """The forward and backward of one micro-batch; ``last``: the one that closes the step."""
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype))
            if self.backend == "deepspeed":
                self.engine.set_gradient_accumulation_boundary(last)
            elif not last and isinstance(self.engine, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(self.engine.no_sync())
            yield

    def across_ranks(self) -> bool:
        """True for a DeepSpeed engine over several ranks (every micro-batch must touch the same parameters)."""
        dist = torch.distributed
        return self.backend == "deepspeed" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def backward(self, loss: torch.Tensor) -> None:
        """Add ``loss``'s gradient (already divided by the whole batch's count)."""
        self.micro_steps += 1
        if self.backend == "deepspeed":
            self.engine.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def step(self) -> float | None:
        """The optimiser step on the accumulated gradients; returns the gradient norm where known."""
        self.micro_steps = 0
        if self.backend == "deepspeed":
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        return self.optimizer.step()


def _rows(item) -> list[int]:
    return item[0] if isinstance(item, tuple) else item


def _with_rows(item, rows: list[int]):
    return (rows, *item[1:]) if isinstance(item, tuple) else rows


def even_out(groups: list, n: int) -> list[tuple[object, float]]:
    """``groups`` made ``n`` long, each with its loss weight: the largest groups split in two, and when every
    group is one row, that row's micro-batch repeated with weight 0 (it adds no gradient)."""
    out = list(groups)
    while len(out) < n:
        big = max(range(len(out)), key=lambda i: len(_rows(out[i]))) if out else None
        if big is None or len(_rows(out[big])) < 2:
            break
        rows = _rows(out[big])
        out[big : big + 1] = [_with_rows(out[big], rows[: len(rows) // 2]), _with_rows(out[big], rows[len(rows) // 2 :])]
    weighted = [(g, 1.0) for g in out]
    while out and len(weighted) < n:
        weighted.append((out[-1], 0.0))
    return weighted


def plan(acc: Accumulator | None, groups: list) -> list[tuple[object, float]]:
    """The micro-batches a step runs, with loss weights: across data-parallel ranks every rank runs the same
    number (the most any rank has; ZeRO-3 gathers parameters in every forward pass, so counts must agree)."""
    if acc is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [(g, 1.0) for g in groups]
    count = torch.tensor([len(groups)], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        count = count.cuda()
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return even_out(groups, int(count.item()))
