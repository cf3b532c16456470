"""Micro-batches, accumulation, lr schedules, chunked log-probs, LoRA / frozen layers / checkpointing, bf16."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from dense_irl.algo.batches import RewardBatch
from dense_irl.algo.config import RewardConfig, SFTConfig, reward_model_config
from dense_irl.algo.experience import perturbed_negatives
from dense_irl.algo.losses import policy_loss, reward_loss
from dense_irl.algo.microbatch import Accumulator, even_out, micro_batches, select_rows
from dense_irl.algo.optim import Optimizer, lr_lambda
from dense_irl.algo.sft import sft_loss
from dense_irl.data.layout import ChainLayout, encode_chains
from dense_irl.data.perturb import KINDS
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.errors import CheckpointError, ConfigError
from dense_irl.models.chains import token_logprobs
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.models.training import ADAPTER_DIR, load_trainable, merged, prepare_for_training

TINY = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def demos():
    return generate(SyntheticConfig(n_problems=24, seed=3))


@pytest.fixture(scope="module")
def tiny(demos):
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    return load_policy(TINY, texts, seed=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    """Equal up to float summation order: the absolute slack grows with the tensor's largest entry (an
    embedding gradient reaches ~1e4 here, so an entry near 0 may differ by 1e-3 from adding in another order)."""
    assert a.keys() == b.keys() and a
    for k in a:
        slack = tol + 1e-6 * float(a[k].abs().max())
        assert torch.allclose(a[k], b[k], atol=slack, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()), slack)


def test_micro_batches_fit_the_budget_longest_first():
    lengths = [5, 40, 12, 33, 7, 40]
    groups = micro_batches(lengths, 80)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 80
    assert groups[0] == [1, 5]  # the two longest together
    assert micro_batches(lengths, 0) == [list(range(6))]
    assert micro_batches([100], 10) == [[0]]  # a row over the budget goes alone


def test_select_rows_trims_padding_and_steps(tiny, demos):
    tok = tiny[1]
    chains = [(d.prompt, d.steps) for d in demos[:4]] + [(demos[0].prompt, demos[0].steps[:1])]
    enc = encode_chains(tok, chains, 256, "\n")
    sub = select_rows(enc, [4])
    assert sub.input_ids.shape[1] == int(enc.attention_mask[4].sum()) < enc.input_ids.shape[1]
    assert sub.step_mask.shape[1] == 1 and sub.n_steps == [1]
    assert torch.equal(sub.input_ids[0], enc.input_ids[4, : sub.input_ids.shape[1]])


def test_even_out_splits_then_repeats_with_weight_zero():
    assert [w for _, w in even_out([[0, 1, 2, 3]], 3)] == [1.0, 1.0, 1.0]
    out = even_out([[0], [1]], 3)
    assert [g for g, _ in out] == [[0], [1], [1]] and [w for _, w in out] == [1.0, 1.0, 0.0]
    assert even_out([([0, 1], True)], 2) == [(([0], True), 1.0), (([1], True), 1.0)]


def test_sft_accumulation_equals_the_large_batch(tiny, demos):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    chains = [(d.prompt, d.steps) for d in demos[:8]]
    layout = ChainLayout("\n", 256)
    loss, _ = sft_loss(model, tok, chains, layout)
    loss.backward()
    one = _grads(model)
    model.zero_grad()
    acc = Accumulator(model, None)
    micro, _ = sft_loss(model, tok, chains, layout, acc=acc, max_tokens=64)
    assert acc.micro_steps > 2  # it really ran in several passes
    assert float(micro) == pytest.approx(loss.item(), rel=1e-5)
    _close(one, _grads(model))


def test_reward_accumulation_equals_the_large_batch(tiny, demos):
    for disc_grad in (True, False):
        cfg = RewardConfig(disc_backbone_grad=disc_grad, level_weights={"step": 1.0, "paragraph": 0.5, "task": 0.5})
        rm = RewardModel(copy.deepcopy(tiny[0]), tiny[1], reward_model_config(cfg, "\n", 256))
        torch.manual_seed(0)
        for head in (rm.g_head, rm.h_head, rm.t_head):
            torch.nn.init.normal_(head.weight, std=0.3)
        rm.eval()
        batch = RewardBatch([(d.prompt, d.steps) for d in demos[:6]],
                            perturbed_negatives(demos[:6], list(KINDS), random.Random(0)))
        pi_old = copy.deepcopy(tiny[0]).requires_grad_(False)
        loss, m1 = reward_loss(rm, batch, cfg, pi_old=pi_old)
        loss.backward()
        one = _grads(rm)
        rm.zero_grad()
        acc = Accumulator(rm, None)
        micro, m2 = reward_loss(rm, batch, cfg, pi_old=pi_old, acc=acc, max_tokens=60)
        assert acc.micro_steps > 3
        assert float(micro) == pytest.approx(loss.item(), rel=1e-5)
        assert m2["reward_negative"] == pytest.approx(m1["reward_negative"], rel=1e-4, abs=1e-6)
        _close(one, _grads(rm))


def test_policy_loss_parts_add_up_to_the_whole():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, requires_grad=True)
    old, ref, adv = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    whole, stats = policy_loss(logp, old, ref, adv, mask, 0.2, 0.1)
    n = float(mask.sum())
    parts = [policy_loss(logp[r], old[r], ref[r], adv[r], mask[r], 0.2, 0.1, normaliser=n) for r in ([0, 1], [2, 3])]
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(whole), rel=1e-5)
    assert sum(p[1]["kl"] for p in parts) == pytest.approx(stats["kl"], rel=1e-5)


def test_lr_schedules_warm_up_then_decay():
    cos = lr_lambda(2, "cosine", 10, 0.1)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = lr_lambda(0, "linear", 4)
    assert [lin(i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    w = torch.nn.Parameter(torch.ones(1))
    opt = Optimizer([w], 1.0, 1, "linear", 3)
    lrs = []
    for _ in range(3):
        lrs.append(opt.lr())
        opt.step((w * 0).sum())
    assert lrs == pytest.approx([1.0, 1.0, 0.5])
    with pytest.raises(ConfigError, match="total steps"):
        lr_lambda(5, "cosine", 5)
    with pytest.raises(ConfigError, match="sft.lr_schedule"):
        SFTConfig(lr_schedule="step").check()


def test_chunked_logprobs_equal_the_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 50, requires_grad=True)
    ids = torch.randint(0, 50, (2, 9))
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = token_logprobs(logits, ids, chunk=3)
    assert torch.allclose(got[:, 1:], full, atol=1e-6) and torch.equal(got[:, 0], torch.zeros(2))
    g1 = torch.autograd.grad(full.sum(), logits)[0]
    g2 = torch.autograd.grad(got.sum(), logits)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    half = logits.detach().to(torch.bfloat16).requires_grad_(True)  # recomputed chunks: same values, grads
    lp = token_logprobs(half, ids, chunk=4)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16
    lp, lse = token_logprobs(logits, ids, 4, with_lse=True)  # one pass gives both, at every position
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-6) and torch.allclose(lp, got, atol=1e-6)
    lp16, lse16 = token_logprobs(half, ids, 4, with_lse=True)
    assert lse16.shape == (2, 9) and torch.allclose(lse16, torch.logsumexp(half.float(), -1), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny, demos):
    chains = [(d.prompt, d.steps) for d in demos[:4]]
    plain = copy.deepcopy(tiny[0])
    ckpt = prepare_for_training(copy.deepcopy(tiny[0]), ModelConfig(gradient_checkpointing=True))
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    for m in (plain, ckpt):
        m.train()
        sft_loss(m, tiny[1], chains, ChainLayout("\n", 256))[0].backward()
    _close(_grads(plain), _grads(ckpt))


def test_trainable_layers_freeze_the_layers_below(tiny):
    model = prepare_for_training(copy.deepcopy(tiny[0]), ModelConfig(trainable_layers=1))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.2.", "model.norm")) for n in trained)


def test_lora_round_trip_through_save_and_load(tiny, demos, tmp_path):
    base_dir = tmp_path / "base"
    save_policy(tiny[0], tiny[1], base_dir)
    cfg = ModelConfig(lora_r=4, lora_alpha=8, trainable_layers=2)
    model = load_trainable(base_dir, cfg)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not any(".layers.0." in n for n in trained)  # only the top 2 of 3 layers carry adapters
    opt = Optimizer([p for p in model.parameters() if p.requires_grad], 1e-2)
    chains = [(d.prompt, d.steps) for d in demos[:4]]
    for _ in range(2):
        opt.step(sft_loss(model, tiny[1], chains, ChainLayout("\n", 256))[0])
    save_policy(model, tiny[1], tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / ADAPTER_DIR / "adapter_config.json").is_file()
    enc = encode_chains(tiny[1], chains, 256, "\n")
    model.eval()
    with torch.no_grad():
        want = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        # the merged folder serves the same function as base + adapters
        served = type(merged(model)).from_pretrained(tmp_path / "ckpt")
        assert torch.allclose(served(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits, want, atol=1e-4)
        again = load_trainable(tmp_path / "ckpt", cfg).eval()  # training goes on from the very adapters
        assert torch.allclose(again(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits, want, atol=1e-5)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(trained)
    (tmp_path / "base" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="base model folder"):
        load_trainable(tmp_path / "ckpt", cfg)


def test_lora_reward_model_saves_merged_and_adapters(tiny, tmp_path):
    save_policy(tiny[0], tiny[1], tmp_path / "base")
    backbone = load_trainable(tmp_path / "base", ModelConfig(lora_r=2))
    rm = RewardModel(backbone, tiny[1], reward_model_config(RewardConfig(), "\n", 256))
    rm.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / ADAPTER_DIR).is_dir()
    loaded = RewardModel.from_pretrained(tmp_path / "rm")  # serving reads the merged backbone
    assert not hasattr(loaded.backbone, "peft_config")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is for GPUs (no CUDA device here)")
def test_bf16_autocast_trains_on_gpu(tiny, demos):
    model = copy.deepcopy(tiny[0]).cuda()
    opt = Optimizer(model.parameters(), 1e-3)
    acc = Accumulator(model, opt, autocast_dtype=torch.bfloat16, device_type="cuda")
    chains = [(d.prompt, d.steps) for d in demos[:8]]
    loss, _ = sft_loss(model, tiny[1], chains, ChainLayout("\n", 256), torch.device("cuda"), acc=acc, max_tokens=64)
    acc.step()
    assert math.isfinite(float(loss)) and all(p.dtype == torch.float32 for p in model.parameters())
