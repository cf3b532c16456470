"""Log-probabilities of chains under a causal LM, per token and per step (the layout: ``data.layout``)."""

from __future__ import annotations

import torch

from dense_irl.data.layout import Chain, encode_chains, sum_by_step


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


def cached_step_logprobs(model, tokenizer, chains: list[Chain], max_length: int, separator: str,
                         cache: dict) -> list[list[float]]:
    """:func:`step_logprobs` of a frozen ``model``, each distinct chain computed once and kept in ``cache``
    (clear the cache when the model's weights change)."""
    keys = [(p, tuple(s)) for p, s in chains]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        got = step_logprobs(model, tokenizer, [(p, list(s)) for p, s in todo], max_length, separator)
        cache.update(zip(todo, got))
    return [cache[k] for k in keys]
