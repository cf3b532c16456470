"""The policy objective with dense step rewards (DESIGN §4).

Advantages follow DeepSeekMath's process supervision (arXiv 2402.03300, §4.1.3), with a discount:
every step reward is normalised by the mean and std of all step rewards of its group (the G samples of
one prompt), then a token's advantage is the discounted sum of the normalised rewards of its own and
later steps. An optional outcome (verifier) reward is normalised the same way over the group (GRPO) and,
weighted, added to the advantage of every step, as PRIME (arXiv 2502.01456) combines implicit process
rewards with outcome rewards: on its own scale, so dense rewards of any magnitude cannot drown it.
The loss is PPO-clip on tokens with a k3 KL penalty to the reference policy.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def step_advantages(step_rewards: list[list[float]], groups: list[int], gamma: float = 1.0,
                    outcome: list[float] | None = None, outcome_weight: float = 0.0,
                    eps: float = 1e-6) -> list[list[float]]:
    """Per-step advantages: group-normalised step rewards, then discounted reward-to-go."""
    if len(step_rewards) != len(groups):
        raise ValueError(f"{len(step_rewards)} chains but {len(groups)} group ids")
    rewards = [list(r) for r in step_rewards]

    def group_stats(values: list[list[float]]) -> dict[int, tuple[float, float]]:
        pooled: dict[int, list[float]] = defaultdict(list)
        for v, g in zip(values, groups):
            pooled[g] += v
        out = {}
        for g, vals in pooled.items():
            mean = sum(vals) / len(vals)
            out[g] = (mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)))
        return out

    stats = group_stats(rewards)
    bonus = [0.0] * len(rewards)
    if outcome is not None and outcome_weight:
        o_stats = group_stats([[o] for o in outcome])
        bonus = [outcome_weight * (o - o_stats[g][0]) / (o_stats[g][1] + eps) for o, g in zip(outcome, groups)]
    out = []
    for r, g, b in zip(rewards, groups, bonus):
        mean, std = stats[g]
        norm = [(v - mean) / (std + eps) for v in r]
        adv, running = [0.0] * len(norm), 0.0
        for k in range(len(norm) - 1, -1, -1):
            running = norm[k] + gamma * running
            adv[k] = running + b
        out.append(adv)
    return out


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.05) -> tuple[torch.Tensor, dict]:
    """Token-level PPO-clip loss plus ``kl_coef`` * k3 KL(pi || pi_ref); all tensors (B, T)."""
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
    return loss, {"kl": ((kl * m).sum() / n).item(), "clip_frac": clipped.item(),
                  "ratio": ((ratio * m).sum() / n).item()}


def token_steps(tokenizer, token_ids: list[int], separator: str) -> list[int]:
    """The step index of every completion token (steps as ``split_completion`` counts them).

    A token belongs to the piece of text it starts in; blank pieces are not steps, so their tokens
    (and the closing ``</s>``) go to the nearest step before them (the first step if none).
    """
    out, piece_of_token = [], []
    for t in range(len(token_ids)):
        before = tokenizer.decode(token_ids[:t], skip_special_tokens=True)
        piece_of_token.append(before.count(separator))
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    pieces = text.split(separator)
    step_of_piece, k = [], -1
    for p in pieces:
        if p.strip():
            k += 1
        step_of_piece.append(max(k, 0))
    for p in piece_of_token:
        out.append(step_of_piece[min(p, len(step_of_piece) - 1)])
    return out


def policy_batch(tokenizer, rollouts: list[dict], separator: str, device) -> dict[str, torch.Tensor]:
    """Tensors for one PPO step: prompt + completion ids, behaviour log-probs and token advantages.

    Each rollout holds ``prompt``, ``token_ids`` and ``logprobs`` of its completion, and
    ``advantages`` per step; a token's advantage is the advantage of its step.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for r in rollouts:
        prompt = bos + tokenizer(r["prompt"] + separator, add_special_tokens=False)["input_ids"]
        steps_of = token_steps(tokenizer, r["token_ids"], separator)
        adv = r["advantages"] or [0.0]
        token_adv = [adv[min(k, len(adv) - 1)] for k in steps_of]
        rows.append((prompt, list(r["token_ids"]), list(r["logprobs"]), token_adv))
    T = max(len(p) + len(c) for p, c, _, _ in rows)
    B = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    old_logp = torch.zeros((B, T))
    advantages = torch.zeros((B, T))
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (prompt, comp, logps, token_adv) in enumerate(rows):
        n, m = len(prompt), len(comp)
        input_ids[b, : n + m] = torch.tensor(prompt + comp)
        attention[b, : n + m] = 1
        old_logp[b, n : n + m] = torch.tensor(logps[:m])
        advantages[b, n : n + m] = torch.tensor(token_adv)
        mask[b, n : n + m] = True
    return {k: v.to(device) for k, v in {"input_ids": input_ids, "attention_mask": attention,
                                          "old_logp": old_logp, "advantages": advantages, "mask": mask}.items()}
