"""`make demo`'s online form on a tiny budget: the loop, the baselines beside it, the table and the reports."""

from __future__ import annotations

import json
import random

import pytest

from dense_irl.demos.online import run_online_demo
from dense_irl.eval.baselines import train_implicit_prm, train_orm

TINY = [
    "--data.synthetic.n_problems=120", "--data.calibration_chains=20", "--model.hidden_size=32",
    "--model.num_layers=1", "--model.num_heads=2", "--model.intermediate_size=64", "--sft.max_steps=3",
    "--sft.batch_size=8", "--prompts_per_iteration=4", "--rollout.samples_per_prompt=2",
    "--rollout.max_new_tokens=24", "--reward_steps=1", "--rl.ppo_steps=1", "--iterations=2", "--minutes=0",
    "--eval_every=2", "--eval_prompts=8", "--checkpoint_every=1",
]


@pytest.fixture(autouse=True)
def _no_serve(ray_session):
    from ray import serve

    serve.shutdown()


def test_online_demo_writes_the_table_and_the_reports(tmp_path):
    out = tmp_path / "demo"
    result = run_online_demo(str(out), overrides=TINY, test_chains=30, calibration_chains=20, accuracy_prompts=6,
                      bon_prompts=4, bon_n=3, baseline_steps=2)
    measures = [r["measure"] for r in result["table"]]
    for scorer in ("irl_reward_model", "policy_logprob_sft", "policy_logprob_after_irl", "implicit_prm",
                   "outcome_rm", "chance"):
        assert f"localisation F1: {scorer}" in measures
    assert "policy accuracy after SFT (greedy)" in measures and "policy accuracy after IRL (greedy)" in measures
    assert "policy accuracy after IRL (mean of 3 samples, T=1)" in measures
    assert all(0 <= v <= 1 for v in result["policy_accuracy_sampled"].values())
    assert "Best-of-3: min" in measures and "Best-of-3: random" in measures
    saved = json.loads((out / "eval.json").read_text())
    assert saved["timing"]["iterations"] == 2 and saved["timing"]["sft_steps"] == 3  # the SFT step budget
    assert (out / "eval.md").read_text().startswith("## dense-irl demo")
    assert (out / "checkpoints" / "iter_000002" / "reward_model" / "reward_config.json").is_file()
    assert (out / "plots" / "chain_0.png").is_file()
    # the loop's periodic evaluation ran and was logged
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/localisation_f1" in r and "eval/policy_accuracy" in r for r in rows)


def test_baselines_learn_the_outcome_labels(tmp_path):
    """Both baselines separate correct from perturbed chains after a little training (else they are no baseline)."""
    import torch

    from dense_irl.data.perturb import KINDS, perturb
    from dense_irl.data.synthetic import SyntheticConfig, generate
    from dense_irl.models.factory import ModelConfig, load_policy

    torch.manual_seed(0)
    demos = generate(SyntheticConfig(n_problems=200, seed=0))
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    policy, tok = load_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), texts)

    rng = random.Random(0)
    good = [(d.prompt, d.steps) for d in demos[:20]]
    bad = [(d.prompt, perturb(d, "wrong_final_answer", rng)[0]) for d in demos[:20]]
    prm = train_implicit_prm(policy, tok, demos, list(KINDS), beta=1.0, lr=3e-3, minutes=5, max_steps=60)
    orm = train_orm(policy, tok, demos, list(KINDS), lr=3e-3, minutes=5, max_steps=60)
    # the implicit PRM's chain logit is the sum of its step rewards; the ORM's verdict is its last value
    assert sum(map(sum, prm(good))) > sum(map(sum, prm(bad)))
    assert sum(s[-1] for s in orm(good)) > sum(s[-1] for s in orm(bad))
