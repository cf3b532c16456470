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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dense_irl.algo.batches import RewardBatch
from dense_irl.algo.config import RewardConfig
from dense_irl.data.layout import encode_chains, sum_by_step
from dense_irl.models.chains import token_logprobs


def expert_nll(logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the masked (expert step) tokens: the SFT loss, PPO-ptx and the iq term."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    m = token_mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp(min=1)


def discriminator_logits(step_rewards: torch.Tensor, policy_step_logp: torch.Tensor | None,
                         alpha: float, gail: bool) -> torch.Tensor:
    """Per-step discriminator logits (B, S); ``policy_step_logp`` is log pi_old per step (detached here)."""
    logits = step_rewards / alpha
    if not gail and policy_step_logp is not None:
        logits = logits - policy_step_logp.detach()
    return logits


def level_bce(step_logits: torch.Tensor, step_mask: torch.Tensor, is_expert: torch.Tensor,
              label_smoothing: float, weights: dict[str, float], paragraph_steps: int) -> dict[str, torch.Tensor]:
    """BCE of expert-vs-negative at the step, paragraph and task levels; returns each and the weighted total."""
    mask = step_mask.to(step_logits.dtype)
    y = is_expert.to(step_logits.dtype)[:, None]
    # Smoothed targets: experts are noisy too (the max-ent view); negatives are not all wrong.
    y = y * (1 - label_smoothing) + 0.5 * label_smoothing
    logits = step_logits * mask
    out: dict[str, torch.Tensor] = {}
    bce = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    out["step"] = (bce * mask).sum() / mask.sum().clamp(min=1)
    B, S = logits.shape
    p = max(1, paragraph_steps)
    n_par = (S + p - 1) // p
    pad = n_par * p - S
    par_logits = F.pad(logits, (0, pad)).view(B, n_par, p).sum(-1)
    par_mask = (F.pad(mask, (0, pad)).view(B, n_par, p).sum(-1) > 0).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(par_logits, y.expand_as(par_logits), reduction="none")
    out["paragraph"] = (bce * par_mask).sum() / par_mask.sum().clamp(min=1)
    out["task"] = F.binary_cross_entropy_with_logits(logits.sum(1), y[:, 0])
    out["total"] = sum(weights.get(k, 0.0) * out[k] for k in ("step", "paragraph", "task"))
    return out


def td_penalty(token_rewards: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared implied reward (Q - gamma V') over the masked tokens: IQ-Learn's chi^2 term."""
    m = token_mask.to(token_rewards.dtype)
    return (token_rewards.pow(2) * m).sum() / m.sum().clamp(min=1)


def negative_loss_mask(step_mask: torch.Tensor, n_experts: int, shared: list[int], cfg: RewardConfig
                       ) -> torch.Tensor:
    """Which steps count in the discriminator loss: every expert step; of a negative, with
    ``mask_expert_prefix`` not its first ``shared`` (expert) steps, and with ``divergence_only`` only the
    step where it leaves its expert."""
    if not cfg.mask_expert_prefix:
        return step_mask
    mask = step_mask.clone()
    for b, k in enumerate(shared):
        mask[n_experts + b, :k] = False
        if cfg.divergence_only:
            mask[n_experts + b, k + 1 :] = False
    return mask


def reward_loss(rm, batch: RewardBatch, cfg: RewardConfig, *, pi_old=None,
                pi_old_logp: list[list[float]] | None = None, forward=None) -> tuple[torch.Tensor, dict]:
    """The reward objective on one batch: the discriminator (``airl``) and/or the iq terms (``iq``).

    ``pi_old`` is the frozen policy of the AIRL logit (it shares the reward backbone's tokenizer); or
    ``pi_old_logp``, log pi_old of every step of every chain (experts then negatives) when already known.
    ``forward`` is what runs the model (a DDP / DeepSpeed wrapper of ``rm``), ``rm`` itself by default.
    """
    n = len(batch.experts)
    enc = encode_chains(rm.tokenizer, batch.chains(), rm.config.max_length, rm.config.separator)
    out = (forward or rm)(enc, detach_backbone=not cfg.disc_backbone_grad)
    S, dev = enc.step_mask.shape[1], out["logits"].device
    ids, step_ids, step_mask = enc.input_ids.to(dev), enc.step_ids.to(dev), enc.step_mask.to(dev)
    is_expert = torch.tensor([1.0] * n + [0.0] * len(batch.negatives), device=dev)
    pol_logp = None
    discriminator = cfg.objective in ("airl", "airl+iq")
    if not discriminator or cfg.gail:
        pass  # no -log pi_old term in the loss
    elif pi_old_logp is not None:
        pol_logp = torch.zeros(step_mask.shape, device=dev)
        for b, lp in enumerate(pi_old_logp):
            k = min(len(lp), S)
            pol_logp[b, :k] = torch.tensor(lp[:k], device=dev)
    else:
        with torch.no_grad():
            pol_logits = pi_old(input_ids=ids, attention_mask=enc.attention_mask.to(dev)).logits
            pol_logp = sum_by_step(token_logprobs(pol_logits, ids), step_ids, S)
    loss_mask = negative_loss_mask(step_mask, n, [neg.shared for neg in batch.negatives], cfg)
    loss = torch.zeros((), device=dev)
    metrics: dict = {}
    if discriminator:
        logits = discriminator_logits(out["step_rewards"], pol_logp, cfg.alpha, cfg.gail)
        bce = level_bce(logits, loss_mask, is_expert, cfg.label_smoothing, cfg.level_weights, cfg.paragraph_steps)
        loss = loss + bce["total"]
        metrics |= {f"bce_{k}": v.item() for k, v in bce.items()}
    with torch.no_grad():
        r = out["step_rewards"]
        metrics["reward_expert"] = r[:n][step_mask[:n]].mean().item() if n else 0.0
        neg = r[n:][loss_mask[n:]]  # the steps where negatives leave the expert's path
        metrics["reward_negative"] = neg.mean().item() if neg.numel() else 0.0
    expert_tokens = (step_ids >= 0) & (is_expert[:, None] > 0)
    if cfg.objective in ("iq", "airl+iq") and cfg.lm_weight > 0:
        nll = expert_nll(out["logits"], ids, expert_tokens)
        loss = loss + cfg.lm_weight * nll
        metrics["expert_nll"] = nll.item()
    if cfg.objective in ("iq", "airl+iq") and cfg.td_weight > 0:
        q_taken = out["logits"][:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        v_next = torch.logsumexp(out["logits"][:, 1:], dim=-1)
        td = td_penalty(q_taken - cfg.gamma * v_next, expert_tokens[:, 1:])
        loss = loss + cfg.td_weight * td
        metrics["td"] = td.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.05, ptx_nll: torch.Tensor | None = None,
                ptx_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """PPO-clip on tokens + ``kl_coef`` * k3 KL(pi || pi_ref) + ``ptx_coef`` * ``ptx_nll``; tensors (B, T)."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1)
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
