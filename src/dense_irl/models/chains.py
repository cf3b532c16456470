"""Log-probabilities of chains under a causal LM, per token and per step (the layout: ``data.layout``)."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from dense_irl.data.layout import Chain, ChainLayout, encode_chains, sum_by_step

LOGP_CHUNK = 256  # positions per chunk of the log-softmax: a (B, 256, V) fp32 block at a time


def _chunk_logp(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # log softmax at the taken token = its logit - logsumexp; the fp32 upcast lives for one chunk only.
    lg = logits.float()
    lse = torch.logsumexp(lg, dim=-1)
    return lg[:, : targets.shape[1]].gather(-1, targets[..., None])[..., 0] - lse[:, : targets.shape[1]], lse


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = LOGP_CHUNK, *,
                   with_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(token_t | tokens_<t) at every position (B, T) in fp32; position 0 gets 0.

    Computed ``chunk`` positions at a time, never as a full fp32 copy of the (B, T, V) logits: fp32 logits
    are read in place, and half-precision chunks are recomputed in the backward pass instead of kept.
    ``with_lse``: also the logsumexp over the vocabulary at every position (B, T), from the same pass (the
    soft value of the iq objective needs it; a second pass over a 49k-152k vocabulary costs as much again).
    """
    targets = input_ids[:, 1:]
    T = logits.shape[1]
    recompute = logits.requires_grad and logits.dtype != torch.float32
    logps, lses = [], []
    for s in range(0, T, chunk):
        # positions s..e-1 of the logits; the targets of the ones that have a next token
        lg, tg = logits[:, s : min(s + chunk, T)], targets[:, s : s + chunk]
        if recompute:
            lp, lse = torch.utils.checkpoint.checkpoint(_chunk_logp, lg, tg, use_reentrant=False)
        else:
            lp, lse = _chunk_logp(lg, tg)
        logps.append(lp)
        lses.append(lse)
    empty = logits.new_zeros((logits.shape[0], 0), dtype=torch.float32)
    logp = torch.cat(logps, dim=1) if logps else empty
    if T:
        logp = torch.cat([logits.new_zeros((logits.shape[0], 1), dtype=torch.float32), logp], dim=1)
    if with_lse:
        return logp, torch.cat(lses, dim=1) if lses else empty
    return logp


def token_logprobs_at(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor,
                      chunk: int = 1024) -> torch.Tensor:
    """:func:`token_logprobs` at the positions ``keep`` (B, T) only (a step's tokens), 0 elsewhere: no log-softmax
    over the vocabulary for the prompt's and the padding's positions. For passes without gradients."""
    return _logprobs_at(lambda b, t: logits[b, t], input_ids, keep, chunk)


def _logprobs_at(logits_before, input_ids: torch.Tensor, keep: torch.Tensor, chunk: int) -> torch.Tensor:
    # logits_before(b, t): the logits that predict token (b, t), i.e. those of position t - 1, for index tensors
    keep = keep.clone()
    keep[:, 0] = False  # position 0 has no logits before it
    b, t = keep.nonzero(as_tuple=True)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    for s in range(0, len(b), chunk):
        bb, tt = b[s : s + chunk], t[s : s + chunk]
        lg = logits_before(bb, tt - 1).float()
        out[bb, tt] = lg.gather(-1, input_ids[bb, tt][:, None])[:, 0] - torch.logsumexp(lg, dim=-1)
    return out


@torch.no_grad()
def logprobs_at_pass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                     hidden_layer: int | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass without gradients that applies the LM head only where log pi is wanted: ``(log pi at
    the positions keep (B, T), 0 elsewhere; the hidden states of layer hidden_layer (None: not kept))``.

    A reward model needs log pi at its steps' tokens only, yet a causal LM's forward projects every position
    onto the vocabulary: on SmolLM2-135M (49k tokens) that projection is a fifth of the pass, and a batch's
    prompts and padding are a third or more of its positions. The model runs with ``logits_to_keep=1`` and
    its output embedding is applied to the final hidden states at the kept positions; where that does not
    reproduce the model's own logits at the one position it kept (a model that scales or soft-caps its
    logits, or whose forward takes no ``logits_to_keep``), the pass falls back to the full logits."""
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # a forward without logits_to_keep
        out = None
    head = model.get_output_embeddings() if out is not None and hasattr(model, "get_output_embeddings") else None
    last = out.hidden_states[-1] if out is not None else None
    if head is None or not torch.allclose(head(last[:, -1]).float(), out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logp = token_logprobs_at(out.logits, input_ids, keep, chunk)
    else:
        logp = _logprobs_at(lambda b, t: head(last[b, t]), input_ids, keep, chunk)
    return logp, None if hidden_layer is None else out.hidden_states[hidden_layer]


@torch.no_grad()
def step_logprobs(model, tokenizer, chains: list[Chain], max_length: int, separator: str = "\n",
                  batch_size: int = 64, finished: list[bool] | None = None, max_tokens: int = 0) -> list[list[float]]:
    """The summed log-probability of every step under a causal LM (the policy log-prob baseline), in the
    order given. Chains run longest first in passes of at most ``batch_size`` chains and ``max_tokens`` padded
    tokens (0: no token cap), each pass trimmed to its longest chain; ``finished[i]`` False: chain ``i`` is
    partial (``data.layout.encode_chains``)."""
    from dense_irl.algo.microbatch import micro_batches, row_lengths, select_rows

    model.eval()
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(chains)
    for i in range(0, len(chains), 4 * batch_size):  # encode a slice at a time: a corpus is not one tensor
        part = chains[i : i + 4 * batch_size]
        enc = encode_chains(tokenizer, part, max_length, separator,
                            None if finished is None else finished[i : i + len(part)])
        groups = micro_batches(row_lengths(enc), max_tokens or int(enc.attention_mask.numel()))  # longest first
        for rows in [g[j : j + batch_size] for g in groups for j in range(0, len(g), batch_size)]:
            sub = select_rows(enc, rows)
            ids = sub.input_ids.to(device)
            lp = token_logprobs(model(input_ids=ids, attention_mask=sub.attention_mask.to(device)).logits, ids)
            per_step = sum_by_step(lp, sub.step_ids.to(device), sub.step_mask.shape[1]).cpu()
            for b, r in enumerate(rows):
                out[i + r] = per_step[b, : sub.n_steps[b]].tolist()
    return out


def cached_step_logprobs(model, tokenizer, chains: list[Chain], max_length: int, separator: str,
                         cache: dict, finished: list[bool] | None = None, max_tokens: int = 0) -> list[list[float]]:
    """:func:`step_logprobs` of a frozen ``model``, each distinct chain computed once and kept in ``cache``
    (clear the cache when the model's weights change)."""
    flags = finished if finished is not None else [True] * len(chains)
    keys = [(p, tuple(s), f) for (p, s), f in zip(chains, flags)]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        got = step_logprobs(model, tokenizer, [(p, list(s)) for p, s, _ in todo], max_length, separator,
                            finished=[f for _, _, f in todo], max_tokens=max_tokens)
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
