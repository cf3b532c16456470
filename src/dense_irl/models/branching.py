"""Chains that share a prefix with a parent chain, run from where they leave it over the parent's key/value cache.

A negative of the reward phase repeats its expert's tokens up to the step where it leaves it (a perturbed
expert), or at least the prompt (a policy sample of the same prompt), and a causal LM's outputs at a position
depend only on the tokens before it: the negative's outputs over the shared prefix are the expert's. So the
experts run once with their key/value cache kept, and each negative runs only its own tokens over that cache
(a cut GSM8K negative's divergent step is ~30 of its ~160 tokens). No gradients: this is for frozen models (the
reward phase's ``pi_old`` pass and a frozen backbone's feature cache).
"""

from __future__ import annotations

import inspect

import torch

from dense_irl.data.layout import EncodedBatch
from dense_irl.models.chains import token_logprobs

Ids = tuple[int, ...]


def branch_start(parent: Ids, ids: Ids) -> int:
    """The first position of ``ids`` a pass continuing ``parent``'s cache runs: the last token the two share
    (its logits give the first differing token's log-prob), 0 when they share none."""
    n = min(len(parent), len(ids))
    p = next((t for t in range(n) if parent[t] != ids[t]), n)
    return max(0, min(p, len(ids)) - 1)


def row_ids(enc: EncodedBatch) -> list[Ids]:
    """Every row's unpadded token ids."""
    lengths = enc.attention_mask.sum(1).tolist()
    return [tuple(enc.input_ids[b, : int(n)].tolist()) for b, n in enumerate(lengths)]


def _cache_arg(model) -> str:
    # transformers 5.2x renamed forward's past_key_values to cache (the old name still works, with a warning)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _branch_passes(todo: dict[Ids, tuple[int, int]], max_tokens: int) -> list[list[Ids]]:
    # Longest runs first; a pass holds at most max_tokens padded new tokens, and its copies of the parents'
    # keys and values at most 4x that many positions (46 KB a position for SmolLM2-135M).
    order = sorted(todo, key=lambda ids: -(len(ids) - todo[ids][1]))
    if max_tokens <= 0:
        return [order] if order else []
    passes: list[list[Ids]] = []
    for ids in order:
        g = passes[-1] if passes else None
        longest = len(g[0]) - todo[g[0]][1] if g else 0
        if g and (len(g) + 1) * longest <= max_tokens and \
                (len(g) + 1) * max(todo[i][1] for i in g + [ids]) <= 4 * max_tokens:
            g.append(ids)
        else:
            passes.append([ids])
    return passes


@torch.no_grad()
def family_forward(model, parents: EncodedBatch, branches: list[tuple[int, Ids]], max_tokens: int = 1024,
                   hidden_layer: int | None = None):
    """Run ``parents`` (one pass, key/value cache kept) and ``branches``: ``(row, ids)``, chains that repeat
    parent ``row``'s tokens up to some position. Each branch runs from its :func:`branch_start` on, over that
    row's keys and values, in passes of at most ``max_tokens`` padded new tokens (0: one pass).

    Returns ``(logp, hidden, out)``: the parents' token log-probs (B, T) and, with ``hidden_layer``, their
    hidden states of that layer (B, T, H) (else None); ``out`` maps each branch's ids to its token log-probs
    (len(ids),) and hidden states (len(ids), H) or None, equal to a pass over the whole branch to float
    rounding."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    want_hidden = hidden_layer is not None
    ids = parents.input_ids.to(device)
    res = model(input_ids=ids, attention_mask=parents.attention_mask.to(device), output_hidden_states=want_hidden,
                use_cache=True)
    hidden = res.hidden_states[hidden_layer] if want_hidden else None
    logp = token_logprobs(res.logits, ids)
    past = res["cache" if "cache" in res else "past_key_values"]  # transformers >= 5.2x renamed it
    del res
    keys = row_ids(parents)
    todo = {b_ids: (b, branch_start(keys[b], b_ids)) for b, b_ids in branches}
    out: dict[Ids, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for group in _branch_passes(todo, max_tokens):
        parent = torch.tensor([todo[g][0] for g in group], device=device)
        start = torch.tensor([todo[g][1] for g in group], device=device)
        n_new = [len(g) - todo[g][1] for g in group]
        P, L = int(start.max()), max(n_new)
        new = torch.zeros(len(group), L, dtype=torch.long, device=device)
        new_mask = torch.zeros(len(group), L, dtype=torch.long, device=device)
        for j, g in enumerate(group):
            new[j, : n_new[j]] = torch.tensor(g[todo[g][1]:], device=device)
            new_mask[j, : n_new[j]] = 1
        # each row sees its parent's first `start` positions (the rest of the shared past is masked) and
        # continues at position `start`
        past_mask = (torch.arange(P, device=device)[None] < start[:, None]).long()
        cache = DynamicCache([(layer.keys[parent, :, :P], layer.values[parent, :, :P]) for layer in past.layers]
                             ) if P else None
        res = model(input_ids=new, attention_mask=torch.cat([past_mask, new_mask], 1),
                    position_ids=start[:, None] + torch.arange(L, device=device)[None],
                    use_cache=P > 0, output_hidden_states=want_hidden, **{_cache_arg(model): cache})
        h_new = res.hidden_states[hidden_layer] if want_hidden else None
        lp_new = token_logprobs(res.logits, new)
        for j, g in enumerate(group):
            b, s = todo[g]
            lp = torch.cat([logp[b, : s + 1], lp_new[j, 1 : n_new[j]]])
            h = torch.cat([hidden[b, :s], h_new[j, : n_new[j]]]) if want_hidden else None
            out[g] = (lp, h)
    return logp, hidden, out


def family_step_logprobs(model, tokenizer, chains: list, max_length: int, separator: str, cache: dict,
                         finished: list[bool] | None = None, max_tokens: int = 0, n_parents: int = 0) -> list[list[float]]:
    """``models.chains.cached_step_logprobs`` of a frozen ``model`` for a reward batch: the first ``n_parents``
    chains are experts, and a later chain (a negative) with the prompt of an expert that runs now runs only
    from where its tokens leave that expert's (:func:`family_forward`). The rest run whole. Each distinct
    chain is computed once and kept in ``cache`` (clear it when the model's weights change)."""
    from dense_irl.algo.microbatch import micro_batches, row_lengths, select_rows
    from dense_irl.data.layout import encode_chains, sum_by_step
    from dense_irl.models.chains import step_logprobs

    flags = finished if finished is not None else [True] * len(chains)
    keys = [(p, tuple(s), f) for (p, s), f in zip(chains, flags)]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    expert_keys = set(keys[:n_parents])
    parents = [k for k in todo if k in expert_keys]
    by_prompt: dict[str, int] = {}
    for i, k in enumerate(parents):
        by_prompt.setdefault(k[0], i)
    children = [k for k in todo if k not in expert_keys and k[0] in by_prompt]
    rest = [k for k in todo if k not in expert_keys and k[0] not in by_prompt]

    def encode(ks):
        return encode_chains(tokenizer, [(p, list(s)) for p, s, _ in ks], max_length, separator, [f for *_, f in ks])

    if rest:
        cache.update(zip(rest, step_logprobs(model, tokenizer, [(p, list(s)) for p, s, _ in rest], max_length,
                                             separator, finished=[f for *_, f in rest], max_tokens=max_tokens)))
    if parents:
        model.eval()
        device = next(model.parameters()).device
        enc_p = encode(parents)
        enc_c = encode(children) if children else None
        c_ids = row_ids(enc_c) if children else []
        kids: dict[int, list[int]] = {}
        for c, k in enumerate(children):
            kids.setdefault(by_prompt[k[0]], []).append(c)
        for rows in micro_batches(row_lengths(enc_p), max_tokens):
            sub = select_rows(enc_p, rows)
            mine = [c for r in rows for c in kids.get(r, [])]
            slot = {r: j for j, r in enumerate(rows)}
            logp, _, out = family_forward(model, sub, [(slot[by_prompt[children[c][0]]], c_ids[c]) for c in mine],
                                          max_tokens)
            per_step = sum_by_step(logp, sub.step_ids.to(device), sub.step_mask.shape[1]).cpu()
            for j, r in enumerate(rows):
                cache[parents[r]] = per_step[j, : sub.n_steps[j]].tolist()
            if mine:
                csub = select_rows(enc_c, mine)
                lp = torch.zeros(csub.input_ids.shape, dtype=torch.float32, device=device)
                for j, c in enumerate(mine):
                    lp[j, : len(c_ids[c])] = out[c_ids[c]][0]
                c_step = sum_by_step(lp, csub.step_ids.to(device), csub.step_mask.shape[1]).cpu()
                for j, c in enumerate(mine):
                    cache[children[c]] = c_step[j, : csub.n_steps[j]].tolist()
    return [cache[k] for k in keys]
