"""Tokenise reasoning chains and keep every step's token span.

A chain is ``(prompt, steps)``. Its token layout is

    <s> prompt SEP | step_0 SEP | step_1 SEP | ... | step_last </s>

where ``|`` marks span boundaries: a step's span is its own tokens plus the separator (or ``</s>``) that
closes it, because "this step ends here" is part of the step (``12 + 5 = 1`` and ``12 + 5 = 17`` differ
only in where the step stops). Each piece is tokenised on its own and the ids concatenated, so spans are
exact for any tokenizer. Truncation drops whole steps from the end and says how many were kept: labels
are cut with the tokens, never shifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Chain = tuple[str, list[str]]


@dataclass
class EncodedBatch:
    """A padded batch of chains with each step's token span."""

    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    step_ids: torch.Tensor  # (B, T) index of the step each token belongs to, -1 for prompt and padding
    step_start: torch.Tensor  # (B, S) first token position of each step (0 where absent)
    step_end: torch.Tensor  # (B, S) last token position of each step (0 where absent)
    step_mask: torch.Tensor  # (B, S) True where the step exists (was not truncated)
    n_steps: list[int]  # steps kept per chain
    n_steps_given: list[int]  # steps given per chain


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chains(tokenizer, chains: list[Chain], max_length: int, separator: str = "\n") -> EncodedBatch:
    """Tokenise ``chains`` into one padded batch; see the module docstring for the layout."""
    if not chains:
        raise ValueError("encode_chains got no chains")
    sep = _ids(tokenizer, separator)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, spans_all = [], []
    for prompt, steps in chains:
        ids = bos + _ids(tokenizer, prompt) + sep
        pieces = [_ids(tokenizer, step) + (eos if k == len(steps) - 1 else sep) for k, step in enumerate(steps)]
        # An over-long prompt loses its beginning (not its steps) so the first step still fits.
        room = max_length - min(len(pieces[0]) if pieces else 0, max_length // 2)
        if len(ids) > room:
            ids = bos + ids[len(ids) - room + len(bos) :]
        spans = []
        for piece in pieces:
            if len(ids) + len(piece) > max_length:
                break
            spans.append((len(ids), len(ids) + len(piece) - 1))
            ids = ids + piece
        rows.append(ids)
        spans_all.append(spans)
    B, T = len(rows), max(len(r) for r in rows)
    S = max(1, max(len(s) for s in spans_all))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    step_ids = torch.full((B, T), -1, dtype=torch.long)
    step_start = torch.zeros((B, S), dtype=torch.long)
    step_end = torch.zeros((B, S), dtype=torch.long)
    step_mask = torch.zeros((B, S), dtype=torch.bool)
    for b, (ids, spans) in enumerate(zip(rows, spans_all)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        for k, (s, e) in enumerate(spans):
            step_ids[b, s : e + 1] = k
            step_start[b, k], step_end[b, k], step_mask[b, k] = s, e, True
    return EncodedBatch(
        input_ids, attention_mask, step_ids, step_start, step_end, step_mask,
        [len(s) for s in spans_all], [len(c[1]) for c in chains],
    )


def sum_by_step(token_values: torch.Tensor, step_ids: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Sum per-token values (B, T) into per-step totals (B, n_steps); tokens with step id -1 are dropped."""
    B = token_values.shape[0]
    idx = step_ids.clamp(min=0)
    vals = token_values * (step_ids >= 0).to(token_values.dtype)
    out = torch.zeros(B, n_steps, dtype=token_values.dtype, device=token_values.device)
    return out.scatter_add(1, idx, vals)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(token_t | tokens_<t) at every position (B, T); position 0 gets 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


@torch.no_grad()
def step_logprobs(model, tokenizer, chains: list[Chain], max_length: int, separator: str = "\n",
                  batch_size: int = 64) -> list[list[float]]:
    """The summed log-probability of every step under a causal LM (the policy log-prob baseline)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for i in range(0, len(chains), batch_size):
        enc = encode_chains(tokenizer, chains[i : i + batch_size], max_length, separator)
        logits = model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device)).logits
        lp = token_logprobs(logits, enc.input_ids.to(device))
        per_step = sum_by_step(lp, enc.step_ids.to(device), enc.step_mask.shape[1]).cpu()
        out += [per_step[b, : enc.n_steps[b]].tolist() for b in range(len(enc.n_steps))]
    return out
