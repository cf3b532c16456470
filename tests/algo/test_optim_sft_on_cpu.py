"""The one optimiser step, the step budgets and the one SFT loop of ``dense_irl.algo`` (no Ray)."""

from __future__ import annotations

import time

import pytest
import torch

from dense_irl.algo.config import SFTConfig
from dense_irl.algo.optim import Optimizer
from dense_irl.algo.sft import budget, train_sft


def test_optimizer_warms_up_linearly_and_clips():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = Optimizer([w], lr=1.0, warmup_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.opt.param_groups[0]["lr"])
        opt.step((w * torch.tensor([100.0, 0.0, 0.0])).sum())
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    # Adam's first step moves a weight by about lr whatever the gradient's size: warm-up scales it
    v = torch.nn.Parameter(torch.zeros(1))
    Optimizer([v], lr=1.0, warmup_steps=10).step((v * 1e6).sum())
    assert abs(v.item()) == pytest.approx(0.1, rel=1e-3)
    # the gradient is clipped to norm 1 before the step (Adam's moments then see the clipped gradient)
    u = torch.nn.Parameter(torch.zeros(2))
    o = Optimizer([u], lr=1.0)
    o.step((u * torch.tensor([3.0, 4.0])).sum())
    assert o.opt.state[u]["exp_avg"].tolist() == pytest.approx([0.1 * 0.6, 0.1 * 0.8])


def test_optimizer_state_round_trip_continues_exactly():
    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 1)

    def loss(m):
        return (m(torch.ones(2, 3)) ** 2).sum()

    a, b = make(), make()
    oa = Optimizer(a.parameters(), 0.1, warmup_steps=3)
    for _ in range(4):
        oa.step(loss(a))
    ob = Optimizer(b.parameters(), 0.1, warmup_steps=3)
    for _ in range(2):
        ob.step(loss(b))
    state = ob.state_dict()
    b2 = make()
    b2.load_state_dict(b.state_dict())
    ob2 = Optimizer(b2.parameters(), 0.1, warmup_steps=3)
    ob2.load_state_dict(state)
    for _ in range(2):
        ob2.step(loss(b2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b2.parameters()))


def test_budget_stops_at_the_steps_or_the_minutes():
    assert [s for s, _ in budget(None, 5)] == [0, 1, 2, 3, 4]
    taken = 0
    for _ in budget(None, 10**9, minutes=0.3 / 60):  # a 0.3 s cap on a loop of 0.05 s steps
        time.sleep(0.05)
        taken += 1
    assert 1 <= taken <= 7
    assert len(list(budget(None, 3, minutes=0))) == 3  # 0 minutes: no cap


def test_sft_loop_draws_a_seeded_stream_and_resumes_it():
    demos = [type("D", (), {"prompt": f"p{i}", "steps": [f"s{i}"]})() for i in range(20)]
    seen = []

    def step(chains):
        seen.append([p for p, _ in chains])
        return {"sft_nll": 1.0, "tokens": 10}

    logs = []
    done = train_sft(step, demos, SFTConfig(max_steps=4, batch_size=3), seed=7, log=logs.append, log_every=2)
    assert done["steps"] == 4 and len(seen) == 4 and all(len(b) == 3 for b in seen)
    assert [m["step"] for m in logs] == [0, 2]
    whole = list(seen)
    seen.clear()
    half = train_sft(step, demos, SFTConfig(max_steps=2, batch_size=3), seed=7, log=logs.append)
    train_sft(step, demos, SFTConfig(max_steps=2, batch_size=3), seed=7, log=logs.append, rng_state=half["rng"])
    assert seen == whole  # two halves, the second resumed, draw the batches of one run
    seen.clear()
    train_sft(step, demos, SFTConfig(max_steps=0), seed=7, log=logs.append)
    assert seen == []
