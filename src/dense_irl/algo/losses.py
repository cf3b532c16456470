"""Every loss of dense-irl, in one file: SFT, the reward objectives, and the policy objective.

Reward (labels come only per chain: expert = 1, policy sample or perturbed expert = 0; no step labels):

    AIRL discriminator logit of a step:   D_k = R_k / alpha - log pi_old(step k)
    GAIL-logit ablation:                  D_k = R_k / alpha
    a paragraph's or a whole chain's logit is the sum of its steps' logits (the AIRL logit of a trajectory
    segment), so one set of step rewards is trained at every level at once (``reward.level_weights``).
    inverse soft-Q (IQ-Learn) with chi^2 regularisation on expert states reduces to
        -E[log pi_Q(a|s)] + c * E[(Q(s,a) - gamma V(s'))^2]
    (the NLL of the LM read as a soft-Q function, plus a TD penalty keeping the implied reward small).

Policy: token-level PPO-clip on the advantages, plus ``kl_coef`` * k3 KL(pi || pi_ref), plus ``ptx_coef`` *
the expert NLL of the iteration's demonstrations (PPO-ptx).

Every loss is a sum divided by a count (tokens, steps, chains). ``normaliser`` / ``norms`` give the whole
batch's counts, so a micro-batch's loss is its share of the whole batch's (``algo.microbatch``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dense_irl.algo.batches import RewardBatch
from dense_irl.algo.config import RewardConfig
from dense_irl.algo.microbatch import micro_batches, plan, row_lengths, select_rows
from dense_irl.data.layout import encode_chains, sum_by_step
from dense_irl.models.chains import token_logprobs


def expert_nll(logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor,
               normaliser: float | None = None) -> torch.Tensor:
    """Mean next-token NLL over the masked (expert step) tokens: the SFT loss, PPO-ptx and the iq term.

    ``normaliser``: the count to divide by (the whole batch's masked tokens); default this batch's."""
    logp = token_logprobs(logits, input_ids)[:, 1:]
    m = token_mask[:, 1:].to(logp.dtype)
    n = m.sum().clamp(min=1) if normaliser is None else max(1.0, float(normaliser))
    return -(logp * m).sum() / n


def nll_count(token_mask: torch.Tensor) -> int:
    """How many tokens :func:`expert_nll` averages over (its whole-batch ``normaliser``)."""
    return int(token_mask[:, 1:].sum())


def discriminator_logits(step_rewards: torch.Tensor, policy_step_logp: torch.Tensor | None,
                         alpha: float, gail: bool) -> torch.Tensor:
    """Per-step discriminator logits (B, S); ``policy_step_logp`` is log pi_old per step (detached here)."""
    logits = step_rewards / alpha
    if not gail and policy_step_logp is not None:
        logits = logits - policy_step_logp.detach()
    return logits


def _paragraphs(x: torch.Tensor, p: int) -> torch.Tensor:
    B, S = x.shape
    n_par = (S + p - 1) // p
    return F.pad(x, (0, n_par * p - S)).view(B, n_par, p).sum(-1)


def level_counts(step_mask: torch.Tensor, paragraph_steps: int) -> dict[str, float]:
    """The counts :func:`level_bce` averages over at each level (its whole-batch ``norms``)."""
    par = _paragraphs(step_mask.float(), max(1, paragraph_steps)) > 0
    return {"step": float(step_mask.sum()), "paragraph": float(par.sum()), "task": float(step_mask.shape[0])}


def level_bce(step_logits: torch.Tensor, step_mask: torch.Tensor, is_expert: torch.Tensor,
              label_smoothing: float, weights: dict[str, float], paragraph_steps: int,
              norms: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """BCE of expert-vs-negative at the step, paragraph and task levels; returns each and the weighted total."""
    mask = step_mask.to(step_logits.dtype)
    norms = norms or level_counts(step_mask, paragraph_steps)
    y = is_expert.to(step_logits.dtype)[:, None]
    # Smoothed targets: experts are noisy too (the max-ent view); negatives are not all wrong.
    y = y * (1 - label_smoothing) + 0.5 * label_smoothing
    logits = step_logits * mask
    out: dict[str, torch.Tensor] = {}
    bce = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    out["step"] = (bce * mask).sum() / max(1.0, norms["step"])
    p = max(1, paragraph_steps)
    par_logits = _paragraphs(logits, p)
    par_mask = (_paragraphs(mask, p) > 0).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(par_logits, y.expand_as(par_logits), reduction="none")
    out["paragraph"] = (bce * par_mask).sum() / max(1.0, norms["paragraph"])
    task = F.binary_cross_entropy_with_logits(logits.sum(1), y[:, 0], reduction="none")
    out["task"] = task.sum() / max(1.0, norms["task"])
    out["total"] = sum(weights.get(k, 0.0) * out[k] for k in ("step", "paragraph", "task"))
    return out


def td_penalty(token_rewards: torch.Tensor, token_mask: torch.Tensor, normaliser: float | None = None) -> torch.Tensor:
    """Mean squared implied reward (Q - gamma V') over the masked tokens: IQ-Learn's chi^2 term."""
    m = token_mask.to(token_rewards.dtype)
    n = m.sum().clamp(min=1) if normaliser is None else max(1.0, float(normaliser))
    return (token_rewards.pow(2) * m).sum() / n


def loss_chains(batch: RewardBatch, cfg: RewardConfig) -> tuple[list, list[bool]]:
    """The chains :func:`reward_loss` runs, in loss order (experts, then negatives), and whether each is finished.

    With ``mask_expert_prefix`` and ``divergence_only`` a negative's loss reads only the step where it leaves
    its expert, and the model is causal: the steps after that one change nothing in the loss. So the negative
    runs cut after that step, as a partial chain (that step still closed by the separator, the potential
    after it not terminal), the same ids as the whole chain's up to there: its loss, to float rounding, for
    fewer tokens (17-26% of a perturbed GSM8K negative's, bench/learner_bench.py). pi_old's log-probs are
    taken on the same chains.
    """
    chains, finished = list(batch.experts), [True] * len(batch.experts)
    for neg in batch.negatives:
        cut = cfg.mask_expert_prefix and cfg.divergence_only and not neg.label_all and neg.shared + 1 < len(neg.steps)
        chains.append((neg.prompt, neg.steps[: neg.shared + 1] if cut else neg.steps))
        finished.append(neg.finished and not cut)
    return chains, finished


def negative_loss_mask(step_mask: torch.Tensor, n_experts: int, shared: list[int], cfg: RewardConfig,
                       label_all: list[bool] | None = None) -> torch.Tensor:
    """Which steps count in the discriminator loss: every expert step; of a negative, with
    ``mask_expert_prefix`` not its first ``shared`` (expert) steps, and with ``divergence_only`` only the
    step where it leaves its expert (unless its ``label_all``: a policy continuation, every step after)."""
    if not cfg.mask_expert_prefix:
        return step_mask
    mask = step_mask.clone()
    for b, k in enumerate(shared):
        mask[n_experts + b, :k] = False
        if cfg.divergence_only and not (label_all and label_all[b]):
            mask[n_experts + b, k + 1 :] = False
    return mask


def lm_outputs(out: dict, ids: torch.Tensor, backbone_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and logsumexps (B, T) with the backbone's graph, for the iq terms: the reward model's own
    when it computed them with the graph (``backbone_grad``: its rewards were not detached), else one pass
    over ``out["logits"]``."""
    if backbone_grad and out.get("token_lse") is not None:
        return out["token_logp"], out["token_lse"]
    return token_logprobs(out["logits"], ids, with_lse=True)


def _reward_groups(enc, n_experts: int, cfg: RewardConfig, max_tokens: int, uniform: bool = False
                   ) -> list[tuple[list[int], bool]]:
    """Micro-batches of a reward step and whether each backpropagates into the backbone: experts with the iq
    terms or a discriminator that trains the backbone; negatives only with the latter (else they run without
    the backbone's graph, in micro-batches of their own). ``uniform``: every micro-batch keeps the backbone's
    graph (DeepSpeed across ranks reduces gradient buckets per micro-batch, which must match on every rank;
    detached rewards still keep the discriminator out of the backbone)."""
    lengths = row_lengths(enc)
    iq = cfg.objective in ("iq", "airl+iq") and (cfg.lm_weight > 0 or cfg.td_weight > 0)
    discriminator = cfg.objective in ("airl", "airl+iq")
    experts, negatives = list(range(n_experts)), list(range(n_experts, len(lengths)))
    if not discriminator:
        negatives = []  # the iq terms see experts only
    if (cfg.disc_backbone_grad or uniform) and discriminator:
        rows = experts + negatives
        return [([rows[i] for i in g], True) for g in micro_batches([lengths[r] for r in rows], max_tokens)]
    out = []
    for rows, grad in ((experts, iq or uniform), (negatives, False)):
        out += [([rows[i] for i in g], grad) for g in micro_batches([lengths[r] for r in rows], max_tokens)]
    return out


def reward_loss(rm, batch: RewardBatch, cfg: RewardConfig, *, pi_old=None,
                pi_old_logp: list[list[float]] | None = None, forward=None, acc=None,
                max_tokens: int = 0, pi_old_is_backbone: bool = False) -> tuple[torch.Tensor, dict]:
    """The reward objective on one batch: the discriminator (``airl``) and/or the iq terms (``iq``).

    ``pi_old`` is the frozen policy of the AIRL logit (it shares the reward backbone's tokenizer); or
    ``pi_old_logp``, log pi_old of every step of every chain of :func:`loss_chains` when already known.
    ``pi_old_is_backbone``: the reward backbone is pi_old (it does not train in this phase), so log pi_old
    comes from the same forward pass, detached, and pi_old never runs.
    ``forward`` is what runs the model (a DDP / DeepSpeed wrapper of ``rm``), ``rm`` itself by default.
    The batch runs in micro-batches of at most ``max_tokens`` padded tokens (0: one pass). With ``acc`` (an
    ``algo.microbatch.Accumulator``) each micro-batch's loss is backpropagated there and the loss returned is
    detached; without, the returned loss carries the graph.
    """
    n = len(batch.experts)
    chains, finished = loss_chains(batch, cfg)
    enc = encode_chains(rm.tokenizer, chains, rm.config.max_length, rm.config.separator, finished)
    is_expert = torch.tensor([1.0] * n + [0.0] * len(batch.negatives))
    loss_mask = negative_loss_mask(enc.step_mask, n, [neg.shared for neg in batch.negatives], cfg,
                                   [neg.label_all for neg in batch.negatives])
    discriminator = cfg.objective in ("airl", "airl+iq")
    iq = cfg.objective in ("iq", "airl+iq")
    pol_logp = None
    if discriminator and not cfg.gail and pi_old_logp is not None:
        pol_logp = torch.zeros(enc.step_mask.shape)
        for b, lp in enumerate(pi_old_logp):
            k = min(len(lp), pol_logp.shape[1])
            pol_logp[b, :k] = torch.tensor(lp[:k])
    expert_tokens = (enc.step_ids >= 0) & (is_expert[:, None] > 0)
    norms = level_counts(loss_mask, cfg.paragraph_steps)
    n_tokens = nll_count(expert_tokens)
    # DeepSpeed across ranks: every rank's micro-batch j must build the same graph (ZeRO-3 gathers parameters
    # and reduces gradient buckets as the backward reaches them; a rank that skips a term hangs the others)
    uniform = acc is not None and acc.across_ranks()
    groups = plan(acc, _reward_groups(enc, n, cfg, max_tokens, uniform=uniform))
    total: torch.Tensor | float = 0.0
    sums = {"reward_expert": [0.0, 0], "reward_negative": [0.0, 0]}
    parts: dict[str, float] = {}
    for j, ((rows, backbone_grad), weight) in enumerate(groups):
        sub = select_rows(enc, rows)
        idx = torch.tensor(rows)
        S, T = sub.step_mask.shape[1], sub.input_ids.shape[1]
        with acc.micro(j == len(groups) - 1) if acc is not None else contextlib.nullcontext():
            out = (forward or rm)(sub, detach_backbone=not cfg.disc_backbone_grad, backbone_grad=backbone_grad)
            dev = out["step_rewards"].device
            ids, mask = sub.input_ids.to(dev), loss_mask[idx, :S].to(dev)
            part = torch.zeros((), device=dev)
            if discriminator:
                lp = pol_logp[idx, :S].to(dev) if pol_logp is not None else None
                if lp is None and not cfg.gail and pi_old_is_backbone:
                    tok_lp = out.get("token_logp")
                    tok_lp = token_logprobs(out["logits"], ids) if tok_lp is None else tok_lp
                    lp = sum_by_step(tok_lp.detach(), sub.step_ids.to(dev), S)
                elif lp is None and not cfg.gail:
                    with torch.no_grad():
                        pol_logits = pi_old(input_ids=ids, attention_mask=sub.attention_mask.to(dev)).logits
                        lp = sum_by_step(token_logprobs(pol_logits, ids), sub.step_ids.to(dev), S)
                logits = discriminator_logits(out["step_rewards"], lp, cfg.alpha, cfg.gail)
                bce = level_bce(logits, mask, is_expert[idx].to(dev), cfg.label_smoothing, cfg.level_weights,
                                cfg.paragraph_steps, norms)
                part = part + bce["total"]
                for k, v in bce.items():
                    parts[f"bce_{k}"] = parts.get(f"bce_{k}", 0.0) + weight * v.item()
            e_tok = expert_tokens[idx, :T].to(dev)
            if iq and (cfg.lm_weight > 0 or cfg.td_weight > 0) and (uniform or bool(e_tok.any())):
                tok_lp, lse = lm_outputs(out, ids, cfg.disc_backbone_grad)
                m = e_tok[:, 1:].to(tok_lp.dtype)
                if cfg.lm_weight > 0:  # expert_nll, from the pass the rewards already took
                    nll = -(tok_lp[:, 1:] * m).sum() / max(1.0, float(n_tokens))
                    part = part + cfg.lm_weight * nll
                    parts["expert_nll"] = parts.get("expert_nll", 0.0) + weight * nll.item()
                if cfg.td_weight > 0:  # Q(s, a) = logit of the taken token = log pi + logsumexp; V(s') = logsumexp
                    q_taken = tok_lp[:, 1:] + lse[:, :-1]
                    td = td_penalty(q_taken - cfg.gamma * lse[:, 1:], e_tok[:, 1:], n_tokens)
                    part = part + cfg.td_weight * td
                    parts["td"] = parts.get("td", 0.0) + weight * td.item()
            with torch.no_grad():  # (a repeated micro-batch, weight 0, is not counted twice)
                r, sm, mask = out["step_rewards"], sub.step_mask.to(dev) & (weight > 0), mask & (weight > 0)
                ex = is_expert[idx].to(dev) > 0
                for key, sel in (("reward_expert", sm & ex[:, None]), ("reward_negative", mask & ~ex[:, None])):
                    sums[key][0] += float(r[sel].sum())
                    sums[key][1] += int(sel.sum())
            part = weight * part
            if acc is not None:
                acc.backward(part)
                total = total + part.detach()
            else:
                total = total + part
    metrics = {**parts, **{k: s / c if c else 0.0 for k, (s, c) in sums.items()}}
    total = total if isinstance(total, torch.Tensor) else torch.zeros(())
    metrics["loss"] = float(total.detach())
    metrics["tokens"] = int(enc.attention_mask.sum())
    return total, metrics


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.05, ptx_nll: torch.Tensor | None = None,
                ptx_coef: float = 0.0, normaliser: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO-clip on tokens + ``kl_coef`` * k3 KL(pi || pi_ref) + ``ptx_coef`` * ``ptx_nll``; tensors (B, T).

    ``normaliser``: the whole batch's completion tokens (a micro-batch's share); default this batch's."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1) if normaliser is None else torch.tensor(max(1.0, float(normaliser)))
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    # k3 estimator of KL(pi || pi_ref): unbiased and always >= 0 (Schulman, "Approximating KL divergence").
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    loss = (-(surrogate * m).sum() + kl_coef * (kl * m).sum()) / n
    with torch.no_grad():
        clipped = (((ratio - 1).abs() > clip).to(m.dtype) * m).sum() / n
        stats = {"kl": ((kl * m).sum() / n).item(), "clip_frac": clipped.item(), "ratio": ((ratio * m).sum() / n).item()}
    if ptx_nll is not None and ptx_coef > 0:
        loss = loss + ptx_coef * ptx_nll
        stats["ptx_nll"] = ptx_nll.item()
    stats["policy_loss"] = loss.item()
    return loss, stats
