"""Offline IRL options: fewer negatives per step, cached pi_old log-probs, the calibrated heads weight,
the masked expert prefix of a negative, and a discriminator that trains only the heads."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch

from dense_irl.algo.batches import Negative, RewardBatch
from dense_irl.algo.config import SFTConfig, reward_model_config
from dense_irl.algo.experience import perturbed_negatives, shared_prefix
from dense_irl.algo.frozen_features import FrozenFeatures
from dense_irl.algo.losses import loss_chains, reward_loss
from dense_irl.algo.sft import LocalSFT, train_sft
from dense_irl.data.layout import ChainLayout, encode_chains
from dense_irl.data.perturb import KINDS, make_processbench
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.branching import branch_start
from dense_irl.models.chains import step_logprobs
from dense_irl.models.factory import ModelConfig, load_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.offline.config import OfflineRewardConfig as RewardConfig
from dense_irl.offline.config import TrainRewardConfig
from dense_irl.offline.train import calibrate_readout, train_reward, train_reward_model

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def demos():
    return generate(SyntheticConfig(n_problems=60, seed=5))


@pytest.fixture(scope="module")
def policy(demos):
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    model, tok = load_policy(TINY, texts, seed=0)
    return model.eval().requires_grad_(False), tok


def _rm(policy, cfg: RewardConfig) -> RewardModel:
    model, tok = policy
    rm = RewardModel(copy.deepcopy(model).requires_grad_(True), tok, reward_model_config(cfg, "\n", 256))
    torch.manual_seed(0)
    for head in (rm.g_head, rm.h_head):
        torch.nn.init.normal_(head.weight, std=0.5)
    return rm


def test_cached_pi_old_logprobs_give_the_same_loss(policy, demos):
    cfg = RewardConfig()
    rm = _rm(policy, cfg)
    experts = [(d.prompt, d.steps) for d in demos[:6]]
    negatives = perturbed_negatives(demos[:6], list(KINDS), random.Random(0))
    rm.eval()  # no dropout: both losses see the same forward
    run_loss, _ = reward_loss(rm, RewardBatch(experts, negatives), cfg, pi_old=policy[0])
    logp = step_logprobs(policy[0], rm.tokenizer, RewardBatch(experts, negatives).chains(), 256)
    cached_loss, _ = reward_loss(rm, RewardBatch(experts, negatives), cfg, pi_old_logp=logp)
    assert torch.allclose(run_loss, cached_loss, atol=1e-5)


def test_fewer_negatives_and_a_pool_train_and_change_the_model(policy, demos):
    cfg = RewardConfig(max_steps=3, batch_size=8, negatives_per_expert=0.25, negative_pool=2,
                       continue_sft_optimizer=False)
    rm = _rm(policy, cfg)
    before = [p.clone() for p in rm.parameters()]
    logs = []
    train_reward(rm, policy[0], demos, cfg, list(KINDS), logs.append)
    assert logs and all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, rm.parameters()))


def test_readout_weight_is_folded_into_the_heads(policy, demos):
    rm = _rm(policy, RewardConfig())
    rows = make_processbench(demos[:40], seed=1)
    chains = [(r["problem"], r["steps"]) for r in rows]
    lm_rm, heads_rm = copy.deepcopy(rm), copy.deepcopy(rm)
    lm_rm.config.terms, heads_rm.config.terms = "lm", "heads"
    lm, heads = [s.step_rewards for s in lm_rm.score(chains)], [s.step_rewards for s in heads_rm.score(chains)]
    w = calibrate_readout(rm, rows, [0.0, 0.5, 3.0])
    assert w in (0.0, 0.5, 3.0) and f"heads weight {w:g}" in rm.config.threshold_rule
    got = [s.step_rewards for s in rm.score(chains)]
    for g, a, b in zip(got, lm, heads):
        assert g == pytest.approx([x + w * y for x, y in zip(a, b)], abs=1e-4)
    # The default [1.0] leaves the heads as trained.
    rm2 = _rm(policy, RewardConfig())
    head = rm2.g_head.weight.clone()
    assert calibrate_readout(rm2, rows, [1.0]) == 1.0
    assert torch.equal(head, rm2.g_head.weight)


def test_warmup_scales_the_first_steps(policy, demos):
    # Adam's first step moves every weight by about lr; with warm-up, by lr / warmup_steps.
    moved = {}
    for warmup in (0, 1000):
        cfg = RewardConfig(max_steps=1, batch_size=8, warmup_steps=warmup, lr=1e-3, continue_sft_optimizer=False)
        rm = _rm(policy, cfg)
        before = [p.detach().clone() for p in rm.backbone.parameters()]
        train_reward(rm, policy[0], demos, cfg, list(KINDS), lambda m: None)
        moved[warmup] = max((a - b).abs().max().item() for a, b in zip(before, rm.backbone.parameters()))
    assert moved[0] > 5e-4 and moved[1000] < moved[0] / 100


def test_negatives_know_where_they_leave_the_expert(demos):
    assert shared_prefix(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert shared_prefix(["a", "b"], ["a", "b", "c"]) == 2
    negs = perturbed_negatives(demos[:20], list(KINDS), random.Random(3))
    assert len(negs) == 20
    for demo, neg in zip(demos[:20], negs):
        prompt, steps, shared = neg.prompt, neg.steps, neg.shared
        assert prompt == demo.prompt and steps[:shared] == demo.steps[:shared]
        assert shared < len(steps) and (shared == len(demo.steps) or steps[shared] != demo.steps[shared])


def test_masked_expert_prefix_is_left_out_of_the_negative_loss(policy, demos):
    experts = [(d.prompt, d.steps) for d in demos[:4]]
    # A "negative" that is the expert's own chain, whole: masked, it adds nothing to the step loss.
    copy_neg = [Negative(demos[0].prompt, demos[0].steps, len(demos[0].steps))]
    masked, plain = RewardConfig(mask_expert_prefix=True), RewardConfig(mask_expert_prefix=False)
    rm = _rm(policy, plain)
    rm.eval()
    _, alone = reward_loss(rm, RewardBatch(experts, []), plain, pi_old=policy[0])
    _, with_mask = reward_loss(rm, RewardBatch(experts, copy_neg), masked, pi_old=policy[0])
    _, without = reward_loss(rm, RewardBatch(experts, copy_neg), plain, pi_old=policy[0])
    assert with_mask["bce_step"] == pytest.approx(alone["bce_step"], rel=1e-5)
    assert without["bce_step"] != pytest.approx(alone["bce_step"], rel=1e-3)


def _sft(model, tok, demos, cfg, state=None):
    """SFT ``model`` in process; returns (optimiser state, rng state) to go on with."""
    step = LocalSFT(model, tok, ChainLayout("\n", 256), cfg)
    if state is not None:
        step.opt.load_state_dict(state[0])
    done = train_sft(step, demos, cfg, seed=0, log=lambda m: None, rng_state=state[1] if state else None)
    return step.opt.state_dict(), done["rng"]


def test_sft_resumed_from_its_state_equals_one_run(policy, demos):
    cfg = SFTConfig(max_steps=4, batch_size=4, lr=1e-2)
    whole, parts = (copy.deepcopy(policy[0]).requires_grad_(True) for _ in range(2))
    _sft(whole, policy[1], demos, cfg)
    half = SFTConfig(max_steps=2, batch_size=4, lr=1e-2)
    _sft(parts, policy[1], demos, half, _sft(parts, policy[1], demos, half))
    for a, b in zip(whole.parameters(), parts.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # A fresh optimiser (no resume) does not give the same weights: the baseline would restart.
    fresh = copy.deepcopy(policy[0]).requires_grad_(True)
    _sft(fresh, policy[1], demos, half)
    _sft(fresh, policy[1], demos, half)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(whole.parameters(), fresh.parameters()))


def test_divergence_only_scores_a_negative_at_its_first_new_step(policy, demos):
    experts = [(d.prompt, d.steps) for d in demos[:4]]
    d = demos[0]
    rm = _rm(policy, RewardConfig())
    rm.eval()
    # Two negatives that leave the expert at step 1 the same way and differ only after it.
    first = [d.steps[0], "He finds 1 more: 1 + 1 = 7.", "The answer is 7."]
    other = first[:2] + ["The answer is 70."]
    cfg = RewardConfig(mask_expert_prefix=True, divergence_only=True)
    _, a = reward_loss(rm, RewardBatch(experts, [Negative(d.prompt, first, 1)]), cfg, pi_old=policy[0])
    _, b = reward_loss(rm, RewardBatch(experts, [Negative(d.prompt, other, 1)]), cfg, pi_old=policy[0])
    assert a["bce_step"] == pytest.approx(b["bce_step"], rel=1e-5)
    cfg.divergence_only = False
    _, a = reward_loss(rm, RewardBatch(experts, [Negative(d.prompt, first, 1)]), cfg, pi_old=policy[0])
    _, b = reward_loss(rm, RewardBatch(experts, [Negative(d.prompt, other, 1)]), cfg, pi_old=policy[0])
    assert a["bce_step"] != pytest.approx(b["bce_step"], rel=1e-4)


def test_token_temperature_head_learns_from_the_discriminator(policy, demos):
    cfg = RewardConfig(token_temperature=True, lm_weight=0.0, td_weight=0.0)
    rm = _rm(policy, cfg)
    assert rm.config.token_temperature
    negatives = perturbed_negatives(demos[:6], list(KINDS), random.Random(0))
    loss, _ = reward_loss(rm, RewardBatch([(d.prompt, d.steps) for d in demos[:6]], negatives), cfg, pi_old=policy[0])
    loss.backward()
    assert rm.t_head.weight.grad.abs().sum() > 0
    # off, the head is not part of the reward
    rm.zero_grad()
    rm.config.token_temperature = False
    reward_loss(rm, RewardBatch([(d.prompt, d.steps) for d in demos[:6]], negatives), cfg, pi_old=policy[0])[0].backward()
    assert rm.t_head.weight.grad is None or not rm.t_head.weight.grad.any()


def test_discriminator_without_backbone_grad_trains_only_the_heads(policy, demos):
    cfg = RewardConfig(disc_backbone_grad=False, lm_weight=0.0, td_weight=0.0)
    rm = _rm(policy, cfg)
    negatives = perturbed_negatives(demos[:6], list(KINDS), random.Random(0))
    loss, _ = reward_loss(rm, RewardBatch([(d.prompt, d.steps) for d in demos[:6]], negatives), cfg, pi_old=policy[0])
    loss.backward()
    assert rm.g_head.weight.grad.abs().sum() > 0 and rm.h_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in rm.backbone.parameters())
    # With the expert NLL the backbone learns, from that term alone.
    cfg.lm_weight = 1.0
    rm.zero_grad()
    reward_loss(rm, RewardBatch([(d.prompt, d.steps) for d in demos[:6]], negatives), cfg, pi_old=policy[0])[0].backward()
    assert any(p.grad is not None and p.grad.any() for p in rm.backbone.parameters())


def test_a_frozen_backbone_is_pi_old_and_only_the_heads_train(policy, demos):
    cfg = RewardConfig(disc_backbone_grad=False, lm_weight=0.0, td_weight=0.0, continue_sft_optimizer=False,
                       max_steps=3, batch_size=6)
    assert cfg.backbone_frozen() and not RewardConfig().backbone_frozen()
    rm = _rm(policy, cfg)
    rm.eval()
    batch = RewardBatch([(d.prompt, d.steps) for d in demos[:6]],
                        perturbed_negatives(demos[:6], list(KINDS), random.Random(0)))
    # The backbone is still the policy: its own log-probs stand in for pi_old's, from the same pass.
    own, _ = reward_loss(rm, batch, cfg, pi_old_is_backbone=True)
    run, _ = reward_loss(rm, batch, cfg, pi_old=policy[0])
    assert torch.allclose(own, run, atol=1e-5)
    # Its outputs, cached once per chain (float32 here: exact), give the same loss, and the gradient reaches the heads.
    features = FrozenFeatures(rm, dtype=torch.float32)
    cached, _ = reward_loss(rm, batch, cfg, forward=features, pi_old_is_backbone=True, max_tokens=400)
    assert torch.allclose(own, cached, atol=1e-5)
    computed = features.tokens_computed
    chains, finished = loss_chains(batch, cfg)  # each chain once, a negative up to where it leaves its expert
    assert computed == int(encode_chains(rm.tokenizer, chains, 256, "\n", finished).attention_mask.sum())
    assert computed < int(encode_chains(rm.tokenizer, batch.chains(), 256, "\n").attention_mask.sum())
    reward_loss(rm, batch, cfg, forward=features, pi_old_is_backbone=True)[0].backward()
    assert features.tokens_computed == computed  # the second pass ran no backbone
    assert rm.t_head.weight.grad.abs().sum() > 0 and rm.g_head.weight.grad.abs().sum() > 0
    rm.backbone.requires_grad_(False)
    backbone, heads = [p.clone() for p in rm.backbone.parameters()], rm.g_head.weight.clone()
    assert train_reward(rm, None, demos, cfg, list(KINDS), lambda m: None) == 3
    assert all(torch.equal(a, b) for a, b in zip(backbone, rm.backbone.parameters()))
    assert not torch.equal(heads, rm.g_head.weight)


@pytest.mark.parametrize("max_tokens", [0, 60])
def test_negatives_run_from_where_they_leave_their_expert_with_the_same_features(policy, demos, max_tokens):
    """fill_family: the experts once, each negative over its expert's key/value cache from where it leaves it;
    the cached states and log-probs equal a pass over each whole chain, for far fewer tokens."""
    cfg = RewardConfig(disc_backbone_grad=False, lm_weight=0.0, td_weight=0.0, continue_sft_optimizer=False)
    rm = _rm(policy, cfg)
    rm.eval()
    rng = random.Random(3)
    experts = [(d.prompt, d.steps) for d in demos[:5]]
    negatives = [perturbed_negatives([d], list(KINDS), rng) for d in demos[:5] for _ in range(3)]
    chains, finished = loss_chains(RewardBatch(experts, [n for ns in negatives for n in ns]), cfg)
    whole = FrozenFeatures(rm, dtype=torch.float32)
    whole.fill(encode_chains(rm.tokenizer, chains, 256, "\n", finished))
    shared = FrozenFeatures(rm, dtype=torch.float32)
    expert_keys = shared.keys_of(experts)
    parents = [i // 3 for i in range(15) for _ in negatives[i]]  # negatives[i] perturbs expert i // 3
    branches = list(zip(parents, shared.keys_of(chains[5:], finished[5:])))
    assert len(branches) == len(chains) - 5 and any(branch_start(expert_keys[b], k) > 10 for b, k in branches)
    shared.fill_family(encode_chains(rm.tokenizer, experts, 256, "\n"), branches, max_tokens)
    assert shared.cache.keys() == whole.cache.keys()
    for k, (h, lp) in whole.cache.items():
        assert torch.allclose(shared.cache[k][0], h, atol=1e-4) and torch.allclose(shared.cache[k][1], lp, atol=1e-4)
    assert shared.tokens_computed < 0.7 * whole.tokens_computed
    assert shared.tokens_computed == sum(map(len, expert_keys)) + sum(
        len(k) - branch_start(expert_keys[b], k) for b, k in {k: (b, k) for b, k in branches}.values())


def test_branch_start_is_the_last_shared_token():
    assert branch_start((1, 2, 3, 4), (1, 2, 9)) == 1  # the logits at 2 give 9's log-prob
    assert branch_start((1, 2, 3), (1, 2, 3, 4)) == 2
    assert branch_start((1, 2), (5, 6)) == 0


def test_the_frozen_recipe_end_to_end(tmp_path, demos):
    """SFT, then heads only on cached features of a middle layer, standardised, served as the logit readout."""
    from dense_irl.config import load_config
    from dense_irl.models.factory import load_policy as load

    cfg = load_config(TrainRewardConfig, None, [
        f"--output_dir={tmp_path / 'run'}", "--data.synthetic.n_problems=60", "--data.calibration_chains=10",
        "--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64",
        "--sft.max_steps=2", "--sft.batch_size=4", "--reward.max_steps=6", "--reward.batch_size=4",
        "--reward.lm_weight=0", "--reward.td_weight=0", "--reward.continue_sft_optimizer=false",
        "--reward.readout=logit", "--reward.head_norm=true", "--reward.head_layer=1", "--reward.expert_pool=8",
        "--reward.negative_pool=1", "--log_every=0"])
    summary = train_reward_model(cfg)
    assert summary["reward_steps"] == 6
    # What the README's tables report: throughput of each phase and the peak memory (CPU: resident only).
    assert summary["sft_tokens_per_s"] > 0 and summary["reward_tokens_per_s"] > 0
    assert set(summary["peak_memory_gb"]) == {"host_rss"} and summary["peak_memory_gb"]["host_rss"] > 0.1
    rm = RewardModel.from_pretrained(tmp_path / "run" / "reward_model")
    assert rm.config.readout == "logit" and rm.config.head_layer == 1
    assert not torch.equal(rm.head_scale, torch.ones_like(rm.head_scale))  # fitted, saved and loaded
    sft, _ = load(replace(cfg.model, name=str(tmp_path / "run" / "sft_policy")))
    # Nothing trained the backbone: the reward model's is the SFT policy's.
    assert all(torch.equal(a, b) for a, b in zip(sft.state_dict().values(), rm.backbone.state_dict().values()))


def test_head_norm_with_a_trainable_lora_backbone_is_fitted_once_and_saved(tmp_path):
    """The GPU preset's recipe in small: LoRA on the policy and the reward backbone, the discriminator's gradient
    in the adapters, the heads' input standardised by the warm start's layer-1 states."""
    from dense_irl.config import load_config
    from dense_irl.models.factory import load_policy as load

    cfg = load_config(TrainRewardConfig, None, [
        f"--output_dir={tmp_path / 'run'}", "--data.synthetic.n_problems=60", "--data.calibration_chains=10",
        "--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64",
        "--model.lora_r=4", "--sft.max_steps=2", "--sft.batch_size=4", "--reward.max_steps=3",
        "--reward.batch_size=4", "--reward.disc_backbone_grad=true", "--reward.head_norm=true",
        "--reward.head_layer=1", "--reward.readout=logit", "--log_every=0"])
    summary = train_reward_model(cfg)
    assert summary["reward_steps"] == 3
    rm = RewardModel.from_pretrained(tmp_path / "run" / "reward_model")
    assert not torch.equal(rm.head_scale, torch.ones_like(rm.head_scale))  # fitted, saved and loaded
    assert not torch.equal(rm.head_shift, torch.zeros_like(rm.head_shift))
    sft, _ = load(replace(cfg.model, name=str(tmp_path / "run" / "sft_policy")))
    # The backbone trained (its adapters, merged into the saved reward model), unlike the frozen recipe's.
    assert any(not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), rm.backbone.state_dict().values()))


def test_continue_sft_optimizer_with_a_frozen_backbone_is_refused(tmp_path):
    cfg = TrainRewardConfig(output_dir=str(tmp_path / "run"),
                            reward=RewardConfig(disc_backbone_grad=False, lm_weight=0.0, td_weight=0.0))
    with pytest.raises(ValueError, match="nothing trains the backbone here"):
        train_reward_model(cfg)


@pytest.mark.parametrize(("key", "value", "msg"), [
    ("negatives_per_expert", 0.0, "reward.negatives_per_expert"),
    ("negative_pool", -1, "reward.negative_pool"),
    ("expert_pool", -1, "reward.expert_pool"),
    ("warmup_steps", -1, "reward.warmup_steps"),
    ("readout_weights", [], "reward.readout_weights"),
    ("readout_weights", [1.0, -2.0], "reward.readout_weights"),
    ("token_temperature", True, "reward.token_temperature scales the lm term"),
    ("mask_expert_prefix", False, "reward.divergence_only needs reward.mask_expert_prefix"),
    ("readout", "mean", "reward.readout must be one of"),
    ("head_norm", True, "reward.head_norm fits the heads' input on the warm-started backbone"),
])
def test_bad_option_values_are_named(tmp_path, key, value, msg):
    cfg = TrainRewardConfig(output_dir=str(tmp_path / "out"))
    cfg.reward.objective = "airl" if key == "token_temperature" else cfg.reward.objective
    cfg.reward.init = "random" if key == "head_norm" else cfg.reward.init
    setattr(cfg.reward, key, value)
    with pytest.raises(ValueError, match=msg):
        train_reward_model(cfg)



def test_reward_training_can_continue_the_sft_optimiser(policy, demos):
    cfg = RewardConfig(max_steps=2, batch_size=4, continue_sft_optimizer=True)
    warm = copy.deepcopy(policy[0]).requires_grad_(True)
    state = {"optimizer": _sft(warm, policy[1], demos, SFTConfig(max_steps=2, batch_size=4))[0]}
    with pytest.raises(ValueError, match="continue_sft_optimizer needs an SFT warm start"):
        train_reward(_rm(policy, cfg), policy[0], demos, cfg, list(KINDS), lambda m: None)
    # Second moments made huge: if the backbone really goes on with the warm start's AdamW state, its steps
    # shrink to nothing, while the heads (a fresh optimiser group) still move.
    for moments in state["optimizer"]["optimizer"]["state"].values():
        moments["exp_avg_sq"] = moments["exp_avg_sq"] + 1e12
    rm = _rm(policy, cfg)
    backbone, heads = [p.clone() for p in rm.backbone.parameters()], rm.g_head.weight.clone()
    assert train_reward(rm, policy[0], demos, cfg, list(KINDS), lambda m: None, sft=(state, 1e-2)) == 2
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(backbone, rm.backbone.parameters()))
    assert not torch.allclose(heads, rm.g_head.weight)
    fresh = _rm(policy, replace(cfg, continue_sft_optimizer=False))
    train_reward(fresh, policy[0], demos, replace(cfg, continue_sft_optimizer=False), list(KINDS), lambda m: None)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(backbone, fresh.backbone.parameters()))


def test_continue_sft_optimizer_without_a_warm_start_fails_before_training(tmp_path):
    cfg = TrainRewardConfig(output_dir=str(tmp_path / "run"), sft=SFTConfig(max_steps=0),
                            reward=RewardConfig(continue_sft_optimizer=True))
    with pytest.raises(ValueError, match="continue_sft_optimizer needs an SFT warm start"):
        train_reward_model(cfg)
    assert not (tmp_path / "run").exists()  # nothing started: no data loaded, no folder written


def test_a_negative_runs_only_up_to_where_it_leaves_its_expert(policy, demos, monkeypatch):
    """The loss reads a negative's divergent step only, so it runs cut after it: fewer tokens, and the loss and
    every gradient equal the whole chains' (every level of the BCE, the potentials and the iq terms)."""
    import dense_irl.algo.losses as losses

    cfg = RewardConfig(batch_size=8, level_weights={"step": 1.0, "paragraph": 0.5, "task": 0.5})
    rm = _rm(policy, cfg)
    torch.nn.init.normal_(rm.t_head.weight, std=0.5)
    batch = RewardBatch([(d.prompt, d.steps) for d in demos[:8]],
                        perturbed_negatives(demos[:8], list(KINDS), random.Random(3)))
    chains, finished = loss_chains(batch, cfg)
    assert not all(finished) and all(finished[: len(batch.experts)])
    assert all(len(c[1]) == n.shared + 1 for c, n, f in zip(chains[8:], batch.negatives, finished[8:]) if not f)

    def run():
        rm.zero_grad()
        loss, metrics = reward_loss(rm, batch, cfg, pi_old=policy[0], max_tokens=300)
        loss.backward()
        return loss.detach(), metrics, [p.grad.clone() for p in rm.parameters() if p.grad is not None]

    cut, cut_metrics, cut_grads = run()
    monkeypatch.setattr(losses, "loss_chains", lambda b, c: (b.chains(), [True] * len(b.chains())))
    whole, whole_metrics, whole_grads = run()
    assert cut_metrics["tokens"] < whole_metrics["tokens"]
    assert torch.allclose(cut, whole, atol=1e-5)
    assert cut_metrics["reward_negative"] == pytest.approx(whole_metrics["reward_negative"], abs=1e-5)
    assert len(cut_grads) == len(whole_grads)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cut_grads, whole_grads))
    # off when the loss reads a negative's every step
    plain = replace(cfg, divergence_only=False)
    assert all(loss_chains(batch, plain)[1]) and loss_chains(batch, plain)[0] == batch.chains()
