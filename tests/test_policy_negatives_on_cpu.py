"""The offline run's policy negatives: the SFT policy continues expert prefixes, its wrong chains are negatives
whose every step after the expert's counts (``Negative.label_all``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dense_irl.algo.batches import Negative, RewardBatch
from dense_irl.algo.config import reward_model_config
from dense_irl.algo.losses import loss_chains, reward_loss
from dense_irl.config import load_config
from dense_irl.data.layout import prefix_ids
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.offline.config import OfflineRewardConfig, TrainRewardConfig
from dense_irl.offline.train import train_reward_model
from dense_irl.sampling.engines import HFEngine, RolloutConfig

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def demos():
    return generate(SyntheticConfig(n_problems=40, seed=3))


@pytest.fixture(scope="module")
def policy(demos):
    model, tok = load_policy(TINY, [d.prompt for d in demos] + [s for d in demos for s in d.steps], seed=0)
    return model.eval().requires_grad_(False), tok


def test_a_policy_continuation_counts_every_step_after_the_expert(policy, demos):
    model, tok = policy
    cfg = OfflineRewardConfig(mask_expert_prefix=True, divergence_only=True)
    rm = RewardModel(copy.deepcopy(model), tok, reward_model_config(cfg, "\n", 256)).eval()
    torch.nn.init.normal_(rm.g_head.weight, std=0.5)
    d = demos[0]
    experts = [(x.prompt, x.steps) for x in demos[:3]]
    first = [d.steps[0], "He finds 1 more: 1 + 1 = 7.", "The answer is 7."]
    other = first[:2] + ["The answer is 70."]
    losses = {}
    for label_all in (False, True):
        for name, steps in (("first", first), ("other", other)):
            batch = RewardBatch(experts, [Negative(d.prompt, steps, 1, label_all=label_all)])
            losses[label_all, name] = reward_loss(rm, batch, cfg, pi_old=model)[1]["bce_step"]
    # A perturbed expert is read at its divergent step only; a policy continuation at every step after it.
    assert losses[False, "first"] == pytest.approx(losses[False, "other"], rel=1e-5)
    assert losses[True, "first"] != pytest.approx(losses[True, "other"], rel=1e-4)
    chains, finished = loss_chains(RewardBatch(experts, [Negative(d.prompt, first, 1, label_all=True,
                                                                  finished=False)]), cfg)
    assert chains[-1][1] == first and finished[-1] is False  # whole, and closed by the separator (cut off)


def test_continuations_start_from_the_expert_prefix_ids(tmp_path, policy, demos):
    model, tok = policy
    save_policy(model, tok, tmp_path / "policy")
    engine = HFEngine(str(tmp_path / "policy"), seed=0, device="cpu")
    chains = [(demos[0].prompt, demos[0].steps[:1]), (demos[1].prompt, [])]
    out = engine.continue_chains(chains, 2, RolloutConfig(max_new_tokens=12, temperature=1.0), "\n", seed=0)
    assert [len(g) for g in out] == [2, 2]
    for (prompt, steps), group in zip(chains, out):
        for r in group:
            assert r.prompt_ids == prefix_ids(tok, prompt, steps, "\n")
            assert 0 < len(r.token_ids) <= 12


def _frozen_run(tmp_path, *extra):
    return load_config(TrainRewardConfig, None, [
        f"--output_dir={tmp_path / 'run'}", "--data.synthetic.n_problems=60", "--data.calibration_chains=10",
        "--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64",
        "--sft.max_steps=2", "--sft.batch_size=4", "--reward.max_steps=6", "--reward.batch_size=4",
        "--reward.lm_weight=0", "--reward.td_weight=0", "--reward.continue_sft_optimizer=false",
        "--reward.readout=logit", "--reward.head_layer=1", "--reward.expert_pool=8", "--reward.negative_pool=1",
        "--reward.policy_max_new_tokens=24", "--reward.policy_batch_size=5", "--log_every=0", *extra])


@pytest.mark.parametrize("keep", ["all", "incorrect"])
def test_the_offline_run_samples_keeps_and_records_policy_negatives(tmp_path, keep):
    cfg = _frozen_run(tmp_path, "--reward.policy_negatives=2", f"--reward.policy_negatives_keep={keep}")
    summary = train_reward_model(cfg)
    stats = summary["policy_negatives"]
    assert stats["sampled"] == 16 and summary["reward_steps"] == 6  # 2 continuations of each of 8 pool experts
    rows = [json.loads(line) for line in (tmp_path / "run" / "policy_negatives.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and sum(r["kept"] for r in rows) == stats["kept"] > 0
    for r in rows:
        assert 0 <= r["expert_steps_kept"] and len(r["steps"]) > r["expert_steps_kept"] or not r["kept"]
        if keep == "incorrect" and r["correct"]:
            assert not r["kept"]
    RewardModel.from_pretrained(tmp_path / "run" / "reward_model")  # trained and saved with them


def test_the_first_unsupported_step_is_the_first_wrong_note_or_new_result():
    from dense_irl.data.calc_notes import first_unsupported_step

    q = "Janet's ducks lay 16 eggs a day. She eats 3 and bakes with 4. She sells the rest at $2 each."
    expert = ["She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.", "She makes 9 * 2 = $<<9*2=18>>18.", "The answer is 18."]
    assert first_unsupported_step(q, expert, expert) is None
    assert first_unsupported_step(q, expert, ["She has 16 * 3 = <<16*3=48>>48 eggs.", "The answer is 96."]) == 0
    assert first_unsupported_step(q, expert, [expert[0], "She makes 9 * 2 = $<<9*2=19>>19.", "The answer is 19."]) == 1
    assert first_unsupported_step(q, expert, expert[:2] + ["The answer is 17."]) == 2  # only the answer is new
    assert first_unsupported_step(q, expert, ["So 16 * 2 = <<16*2=32>>32.", "The answer is 32."], start=1) == 1


def test_first_error_labels_read_one_step_of_each_policy_negative(tmp_path):
    cfg = _frozen_run(tmp_path, "--reward.policy_negatives=2", "--reward.policy_negatives_keep=all",
                      "--reward.policy_negatives_label=first_error")
    summary = train_reward_model(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "policy_negatives.jsonl").read_text().splitlines()]
    assert summary["reward_steps"] == 6 and sum(r["kept"] for r in rows) > 0
    for r in rows:  # labelled from where the chain leaves its expert on, at most its last step
        assert (r["first_error"] is None) == (not r["kept"])
        assert not r["kept"] or 0 <= r["first_error"] < len(r["steps"])


@pytest.mark.parametrize(("args", "msg"), [
    (["--reward.policy_negatives=-1"], "reward.policy_negatives must be >= 0"),
    (["--reward.policy_negatives=1", "--reward.negative_pool=0"], "need reward.negative_pool >= 1"),
    (["--reward.policy_negatives=1", "--reward.policy_max_new_tokens=0"], "reward.policy_max_new_tokens"),
    (["--reward.policy_negatives=1", "--reward.policy_negatives_label=every"], "policy_negatives_label"),
])
def test_bad_policy_negative_options_are_named(tmp_path, args, msg):
    with pytest.raises(ValueError, match=msg):
        train_reward_model(_frozen_run(tmp_path, *args))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_keep_rule_is_refused_when_loaded(tmp_path):
    with pytest.raises(ValueError, match="policy_negatives_keep"):
        train_reward_model(_frozen_run(tmp_path, "--reward.policy_negatives_keep=wrong"))
