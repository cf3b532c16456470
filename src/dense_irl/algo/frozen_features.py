"""A frozen backbone's outputs per chain, computed once: the reward heads then train for many epochs on them.

When nothing in the reward phase trains the backbone (``OfflineRewardConfig.backbone_frozen``), a chain's
hidden states and token log-probs never change, so each chain runs through the backbone the first time a
step draws it and never again. The discriminator is then a small model (the g, h and temperature heads) on
fixed features, and a pool of experts that the steps revisit trains it for many epochs on few forward passes.
On SmolLM2-135M on 2 CPU cores a forward pass is ~150 tokens/s and a heads step on cached features a few
milliseconds (docs/experiments.md).

A perturbed negative repeats its expert's tokens up to the step where it leaves it, and the backbone is causal:
its states there are the expert's. :meth:`FrozenFeatures.fill_family` runs the experts once, keeps their
key/value cache, and runs each negative only from where it leaves its expert (the divergent step of a cut
negative, ~30 tokens of a GSM8K chain's ~190), so a pool of several negatives per expert costs less than one
whole negative did.
"""

from __future__ import annotations

import torch

from dense_irl.algo.microbatch import select_rows
from dense_irl.data.layout import Chain, EncodedBatch, encode_chains
from dense_irl.models.branching import branch_start, family_forward, row_ids
from dense_irl.models.chains import logprobs_at_pass


class FrozenFeatures:
    """Calls like the reward model (``reward_loss``'s ``forward``), reading each row's backbone outputs from a
    cache keyed by its token ids; rows not seen before run through the backbone once, without a graph.

    Kept in ``dtype`` (float16: the hidden states of one SmolLM2 chain of 230 tokens are 0.27 MB).
    """

    def __init__(self, rm, dtype: torch.dtype = torch.float16):
        self.rm, self.dtype = rm, dtype
        self.cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens_computed = 0  # tokens that ran through the backbone (cache misses)

    def batch_keys(self, enc: EncodedBatch) -> list[tuple[int, ...]]:
        """The cache key of every row of ``enc``: its unpadded token ids."""
        return row_ids(enc)

    def keys_of(self, chains: list[Chain], finished: list[bool] | None = None) -> list[tuple[int, ...]]:
        """The cache keys of ``chains`` (their token ids as the reward model encodes them)."""
        cfg = self.rm.config
        return self.batch_keys(encode_chains(self.rm.tokenizer, chains, cfg.max_length, cfg.separator, finished))

    def expert_hidden(self, chains: list[Chain], max_tokens: int = 200_000) -> torch.Tensor:
        """The cached hidden states of the step tokens of ``chains`` (at most ``max_tokens`` of them), (N, H):
        what the heads' standardisation is fitted on."""
        cfg = self.rm.config
        enc = encode_chains(self.rm.tokenizer, chains, cfg.max_length, cfg.separator)
        out, n = [], 0
        for b, k in enumerate(self.batch_keys(enc)):
            if k in self.cache and n < max_tokens:
                steps = enc.step_ids[b, : len(k)] >= 0
                out.append(self.cache[k][0][steps].float())
                n += int(steps.sum())
        if not out:
            raise ValueError("no cached chains to fit the heads' standardisation on")
        return torch.cat(out)[:max_tokens]

    @torch.no_grad()
    def _fill(self, enc: EncodedBatch, rows: list[int], keys: list[tuple[int, ...]]) -> None:
        sub = select_rows(enc, rows)
        dev = self.rm.g_head.weight.device
        # log pi at every token the cache keeps (as family_forward's), none at the padding
        mask = sub.attention_mask.to(dev)
        logp, hidden = logprobs_at_pass(self.rm.backbone, sub.input_ids.to(dev), mask, mask.bool(),
                                        self.rm.config.head_layer)
        for j, b in enumerate(rows):
            n = len(keys[b])
            self.cache[keys[b]] = (hidden[j, :n].to("cpu", self.dtype), logp[j, :n].float().cpu())
            self.tokens_computed += n

    def fill(self, enc: EncodedBatch) -> list[tuple[int, ...]]:
        """Run the rows of ``enc`` not cached yet through the backbone; returns every row's cache key."""
        keys = self.batch_keys(enc)
        missing = [b for b, k in enumerate(keys) if k not in self.cache]
        if missing:
            self._fill(enc, missing, keys)
        return keys

    def fill_family(self, experts: EncodedBatch, branches: list[tuple[int, tuple[int, ...]]],
                    max_tokens: int = 1024) -> None:
        """Cache ``experts`` (one backbone pass, its key/value cache kept) and ``branches``: ``(row, ids)``,
        chains that repeat row ``row``'s tokens up to some position (its perturbed negatives), each run only
        from where it leaves that row (``models.branching.family_forward``); their cached outputs equal a pass
        over the whole branch to float rounding."""
        keys = self.batch_keys(experts)
        todo = [(b, ids) for b, ids in branches if ids not in self.cache]
        logp, hidden, out = family_forward(self.rm.backbone, experts, todo, max_tokens, self.rm.config.head_layer)
        for b, k in enumerate(keys):
            if k not in self.cache:
                self.cache[k] = (hidden[b, : len(k)].to("cpu", self.dtype), logp[b, : len(k)].float().cpu())
                self.tokens_computed += len(k)
        for b, ids in todo:
            if ids not in self.cache:
                lp, h = out[ids]
                self.cache[ids] = (h.to("cpu", self.dtype), lp.float().cpu())
                self.tokens_computed += len(ids) - branch_start(keys[b], ids)

    def __call__(self, enc: EncodedBatch, detach_backbone: bool = True, backbone_grad: bool = False) -> dict:
        if not detach_backbone or backbone_grad:
            raise ValueError("FrozenFeatures serves a frozen backbone: call it with detach_backbone=True and "
                             "backbone_grad=False (reward.disc_backbone_grad false, no iq terms)")
        keys = self.fill(enc)
        B, T = enc.input_ids.shape
        H = self.cache[keys[0]][0].shape[-1]
        hidden, logp = torch.zeros(B, T, H), torch.zeros(B, T)
        for b, k in enumerate(keys):
            h, lp = self.cache[k]
            hidden[b, : len(k)], logp[b, : len(k)] = h.float(), lp
        return self.rm(enc, features=(hidden, logp))
