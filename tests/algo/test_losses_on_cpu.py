"""Every loss of ``dense_irl.algo.losses`` on small hand-computed cases (no Ray, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from dense_irl.algo.config import RewardConfig
from dense_irl.algo.losses import (
    discriminator_logits,
    expert_nll,
    level_bce,
    negative_loss_mask,
    policy_loss,
    td_penalty,
)


def _bce(logit: float, y: float) -> float:
    return -(y * math.log(1 / (1 + math.exp(-logit))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_expert_nll_averages_the_masked_next_token_losses():
    # vocab 2; position t's logits predict token t+1. Uniform logits: every target costs log 2.
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0)])  # p(token 1 | t=1) = 3/4
    ids = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[False, True, True]])  # targets at positions 1 and 2
    want = (math.log(2.0) + -math.log(0.75)) / 2
    assert expert_nll(logits, ids, mask).item() == pytest.approx(want, rel=1e-6)
    # the first position is never a target, whatever the mask says
    assert expert_nll(logits, ids, torch.tensor([[True, False, False]])).item() == 0.0


def test_discriminator_logit_is_reward_over_alpha_minus_pi_old():
    r = torch.tensor([[2.0, -1.0]], requires_grad=True)
    lp = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    got = discriminator_logits(r, lp, alpha=2.0, gail=False)
    assert got[0].tolist() == pytest.approx([1.0 + 0.5, -0.5 + 3.0])
    got.sum().backward()
    assert lp.grad is None and r.grad.tolist() == [[0.5, 0.5]]  # pi_old is detached
    assert discriminator_logits(r, lp, alpha=2.0, gail=True)[0].tolist() == pytest.approx([1.0, -0.5])


def test_level_bce_at_step_paragraph_and_task_levels():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    is_expert = torch.tensor([1.0, 0.0])
    out = level_bce(logits, mask, is_expert, label_smoothing=0.2, weights={"step": 1.0, "task": 2.0},
                    paragraph_steps=2)
    y1, y0 = 0.9, 0.1  # smoothed targets
    step = (_bce(1.0, y1) + _bce(-2.0, y1) + _bce(0.5, y1) + _bce(0.0, y0) + _bce(3.0, y0)) / 5
    par = (_bce(-1.0, y1) + _bce(0.5, y1) + _bce(3.0, y0)) / 3  # [1-2, 0.5] and [0+3] (its 2nd paragraph is empty)
    task = (_bce(-0.5, y1) + _bce(3.0, y0)) / 2
    assert out["step"].item() == pytest.approx(step, rel=1e-5)
    assert out["paragraph"].item() == pytest.approx(par, rel=1e-5)
    assert out["task"].item() == pytest.approx(task, rel=1e-5)
    assert out["total"].item() == pytest.approx(step + 2 * task, rel=1e-5)


def test_td_penalty_is_the_mean_squared_masked_reward():
    r = torch.tensor([[1.0, 2.0, 10.0]])
    assert td_penalty(r, torch.tensor([[True, True, False]])).item() == pytest.approx(2.5)


def test_negative_loss_mask_keeps_the_step_where_a_negative_leaves_its_expert():
    step_mask = torch.ones(3, 4, dtype=torch.bool)  # 1 expert, 2 negatives
    cfg = RewardConfig(mask_expert_prefix=True, divergence_only=True)
    got = negative_loss_mask(step_mask, 1, [2, 0], cfg)
    assert got.tolist() == [[True] * 4, [False, False, True, False], [True, False, False, False]]
    cfg = RewardConfig(mask_expert_prefix=True, divergence_only=False)
    assert negative_loss_mask(step_mask, 1, [2, 0], cfg)[1].tolist() == [False, False, True, True]
    cfg = RewardConfig(mask_expert_prefix=False, divergence_only=False)
    assert negative_loss_mask(step_mask, 1, [2, 0], cfg).all()


def test_policy_loss_clips_penalises_kl_and_adds_ptx():
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[1, 1]])
    loss, stats = policy_loss(logp, old, ref_logp=logp.detach(), advantages=adv, mask=mask, clip=0.2, kl_coef=0.0)
    # token 0: ratio e > 1.2, clipped to 1.2; token 1: ratio 1
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2, abs=1e-5)
    assert stats["clip_frac"] == pytest.approx(0.5) and stats["ratio"] == pytest.approx((math.e + 1) / 2)
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] != 0.0  # the clipped token passes no gradient
    # k3 KL: exp(ref - logp) - (ref - logp) - 1, masked mean
    ref = torch.tensor([[-1.0, -1.0]])
    _, stats = policy_loss(logp.detach(), old, ref_logp=ref, advantages=adv * 0, mask=mask, kl_coef=0.1)
    assert stats["kl"] == pytest.approx((math.exp(-1) + 1 - 1) / 2, rel=1e-5)
    # PPO-ptx: the expert NLL, weighted, added to the same loss
    base, _ = policy_loss(logp.detach(), old, ref, adv, mask, 0.2, 0.1)
    with_ptx, stats = policy_loss(logp.detach(), old, ref, adv, mask, 0.2, 0.1, torch.tensor(2.0), 0.5)
    assert with_ptx.item() == pytest.approx(base.item() + 1.0) and stats["ptx_nll"] == 2.0
    # padding does not count
    loss_pad, _ = policy_loss(torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[-1.0, -1.0, 0.0]]),
                              torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[1.0, 1.0, 9.0]]),
                              torch.tensor([[1, 1, 0]]), 0.2, 0.0)
    assert loss_pad.item() == pytest.approx(-(1.2 + 1.0) / 2, abs=1e-5)


def test_lm_outputs_give_the_nll_and_the_td_terms_of_one_vocabulary_pass():
    """The iq terms from one pass (log-probs + logsumexp) equal their definitions on the raw logits."""
    from dense_irl.algo.losses import lm_outputs

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    lp, lse = lm_outputs({"logits": logits, "token_lse": None}, ids, backbone_grad=True)
    q_taken = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # Q(s, a): the taken token's logit
    v_next = torch.logsumexp(logits[:, 1:], -1)  # V(s') = logsumexp of the next position
    assert torch.allclose(lp[:, 1:] + lse[:, :-1] - 0.9 * lse[:, 1:], q_taken - 0.9 * v_next, atol=1e-5)
    assert torch.allclose(-(lp[:, 1:]).sum() / 12, expert_nll(logits, ids, mask), atol=1e-6)
    # the reward model's own pass is reused only when it carries the backbone's graph
    own = {"logits": logits, "token_logp": lp * 0, "token_lse": lse * 0}
    assert lm_outputs(own, ids, backbone_grad=True)[0].abs().sum() == 0
    assert torch.allclose(lm_outputs(own, ids, backbone_grad=False)[0], lp)
