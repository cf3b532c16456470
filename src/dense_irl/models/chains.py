"""Log-probabilities of chains under a causal LM, per token and per step (the layout: ``data.layout``)."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from dense_irl.data.layout import Chain, ChainLayout, encode_chains, sum_by_step

LOGP_CHUNK = 256  # positions per chunk of the log-softmax: a (B, 256, V) fp32 block at a time


def _chunk_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log softmax at the taken token = its logit - logsumexp; the fp32 upcast lives for one chunk only.
    lg = logits.float()
    return lg.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(lg, dim=-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = LOGP_CHUNK) -> torch.Tensor:
    """log pi(token_t | tokens_<t) at every position (B, T) in fp32; position 0 gets 0.

    Computed ``chunk`` positions at a time, never as a full fp32 copy of the (B, T, V) logits: fp32 logits
    are read in place, and half-precision chunks are recomputed in the backward pass instead of kept.
    """
    targets = input_ids[:, 1:]
    recompute = logits.requires_grad and logits.dtype != torch.float32
    parts = []
    for s in range(0, targets.shape[1], chunk):
        lg, tg = logits[:, s : min(s + chunk, targets.shape[1])], targets[:, s : s + chunk]
        if recompute:
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logp, lg, tg, use_reentrant=False))
        else:
            parts.append(_chunk_logp(lg, tg))
    logp = torch.cat(parts, dim=1) if parts else logits.new_zeros((logits.shape[0], 0), dtype=torch.float32)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def token_logsumexp(logits: torch.Tensor, chunk: int = LOGP_CHUNK) -> torch.Tensor:
    """logsumexp over the vocabulary at every position (B, T) in fp32 (the soft value V), in chunks."""
    recompute = logits.requires_grad and logits.dtype != torch.float32
    fn = lambda lg: torch.logsumexp(lg.float(), dim=-1)  # noqa: E731
    parts = [torch.utils.checkpoint.checkpoint(fn, logits[:, s : s + chunk], use_reentrant=False) if recompute
             else fn(logits[:, s : s + chunk]) for s in range(0, logits.shape[1], chunk)]
    return torch.cat(parts, dim=1) if parts else logits.new_zeros(logits.shape[:2], dtype=torch.float32)


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


def truncated_chains(tokenizer, chains: list[Chain], layout: ChainLayout, batch_size: int = 256) -> list[int]:
    """Indices of the chains longer than ``layout.max_length`` (they keep only their leading steps): tokenising
    only, no model, so a run can say so before any compute."""
    out = []
    for i in range(0, len(chains), batch_size):
        enc = encode_chains(tokenizer, chains[i : i + batch_size], layout.max_length, layout.separator)
        out += [i + b for b, (kept, given) in enumerate(zip(enc.n_steps, enc.n_steps_given)) if kept < given]
    return out


def report_truncated(tokenizer, chains: list[Chain], layout: ChainLayout, what: str) -> int:
    """Print one line when some of ``chains`` exceed ``max_length`` (never fatal); returns how many."""
    n = len(truncated_chains(tokenizer, chains, layout))
    if n:
        from tqdm import tqdm

        tqdm.write(f"note: {n} of {len(chains)} {what} are longer than max_length {layout.max_length} tokens; "
                   "they train and score on the steps that fit (raise model.max_length to keep them whole)")
    return n
