"""Reward objectives (DESIGN §4): the AIRL discriminator over step / paragraph / task levels, the
GAIL-logit ablation, and the inverse soft-Q (IQ-Learn) terms read from the LM's own logits.

Discriminator logit of a step (AIRL):   D_k = R_k / alpha - log pi_old(step k)
GAIL-logit ablation:                    D_k = R_k / alpha
A paragraph's or a whole chain's logit is the sum of its steps' logits (the AIRL logit of a trajectory
segment), so one set of step rewards is trained at every level at once. Labels come only per chain:
expert = 1, policy sample or perturbed expert = 0; no step labels are ever used.

Inverse soft-Q with chi^2 regularisation on expert states reduces to
    -E[log pi_Q(a|s)] + c * E[(Q(s,a) - gamma V(s'))^2]
(the NLL of the LM read as a soft-Q function, plus a TD penalty keeping the implied reward small).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_logits(step_rewards: torch.Tensor, policy_step_logp: torch.Tensor | None,
                         alpha: float, gail: bool) -> torch.Tensor:
    """Per-step discriminator logits (B, S); ``policy_step_logp`` is detached log pi_old per step."""
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


def expert_nll(logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the masked (expert step) tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    m = token_mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp(min=1)


def td_penalty(token_rewards: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared implied reward (Q - gamma V') over the masked tokens: IQ-Learn's chi^2 term."""
    m = token_mask.to(token_rewards.dtype)
    return (token_rewards.pow(2) * m).sum() / m.sum().clamp(min=1)
