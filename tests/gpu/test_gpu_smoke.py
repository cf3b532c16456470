"""GPU-only checks (run by scripts/gpu_smoke.sh on a GPU machine; skipped without CUDA).

Sized for one GPU: the loop's learners and rollout worker take fractional GPU shares (0.3 each, at most 0.9).
A package that is absent (DeepSpeed, vLLM) skips its check with a reason; one that is present but broken fails.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LOOP = [
    "--data.synthetic.n_problems=400",
    "--data.calibration_chains=40",
    "--sft.max_steps=50",
    "--iterations=2",
    "--prompts_per_iteration=16",
    "--rollout.samples_per_prompt=4",
    "--rollout.max_new_tokens=64",
    "--eval_every=2",
    "--eval_prompts=16",
    "--checkpoint_every=2",
    "--learner.num_gpus_per_worker=0.3",
    "--learner.num_cpus_per_worker=1",
    "--placement_timeout_s=60",  # an unplaceable group fails inside the per-test timeout, with Ray's resources
]


def _absent(name: str) -> bool:
    return importlib.util.find_spec(name) is None


@pytest.fixture
def ray_gpu():
    """A fresh local Ray per test, so a failed loop's actors and placement group cannot starve the next check.

    The GPU count is given, not detected: Ray finds GPUs through NVML, which a bare image may not expose, and
    an actor asking for a GPU share Ray does not know of waits for ever. The object store is 2 GiB: Ray sizes
    it from RAM by default and refuses to start when that is over 10 GB and over a small /dev/shm.
    """
    import ray

    ray.init(
        address="local",
        num_gpus=torch.cuda.device_count(),
        object_store_memory=2 << 30,
        include_dashboard=False,
    )
    yield ray
    ray.shutdown()


def _run_loop(tmp_path, args: list[str]) -> tuple[dict, float]:
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import train_online
    from dense_irl.runtime.loop_config import LoopConfig

    t0 = time.monotonic()
    last = train_online(load_config(LoopConfig, None, [*LOOP, *args, f"--output_dir={tmp_path}"]))
    assert last["samples"] > 0
    assert (tmp_path / "checkpoints" / "iter_000002" / "policy" / "model.safetensors").is_file()
    return last, round(time.monotonic() - t0, 1)


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "deepspeed", marks=pytest.mark.skipif(_absent("deepspeed"), reason="deepspeed is not installed")
        ),
    ],
)
def test_loop_on_cuda(ray_gpu, tmp_path, backend):
    """Two iterations with PPO-ptx, then a resume (both optimisers' state, DeepSpeed's from its ZeRO partitions)."""
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import train_online
    from dense_irl.runtime.loop_config import LoopConfig

    args = [f"--learner.backend={backend}", "--rl.ptx_coef=0.5", "--rl.warmup_steps=2"]
    last, seconds = _run_loop(tmp_path, args)
    assert last["policy/ptx_nll"] > 0
    train_online(load_config(LoopConfig, None, [*LOOP, *args, "--iterations=3", "--resume=auto", f"--output_dir={tmp_path}"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" and r["optimizer_state"] for r in rows)
    assert (tmp_path / "checkpoints" / "iter_000003" / "optimizer" / "policy").is_dir()
    print(
        json.dumps(
            {
                "check": f"loop-{backend}-cuda",
                "seconds": seconds,
                "policy_ratio": last["policy/ratio"],
                "samples": last["samples"],
            }
        )
    )


def test_collective_weight_sync_with_cuda_learners(ray_gpu, tmp_path):
    """Weights broadcast from a CUDA learner (gloo here: NCCL needs a whole GPU per member, so >= 3 GPUs)."""
    last, seconds = _run_loop(
        tmp_path, ["--rollout.weight_sync=collective", "--rollout.num_gpus_per_worker=0.3"]
    )
    print(
        json.dumps(
            {"check": "loop-collective-weight-sync-cuda", "seconds": seconds, "samples": last["samples"]}
        )
    )


@pytest.mark.skipif(
    torch.cuda.device_count() < 3, reason="NCCL weight sync needs 3 GPUs (a whole one per member)"
)
def test_nccl_weight_sync(ray_gpu, tmp_path):
    """The NCCL path: learners and the rollout worker each on a whole GPU."""
    _run_loop(
        tmp_path,
        [
            "--rollout.weight_sync=collective",
            "--learner.num_gpus_per_worker=1",
            "--rollout.num_gpus_per_worker=1",
        ],
    )


@pytest.mark.skipif(_absent("vllm"), reason="vllm is not installed (its CUDA wheel is too large to carry)")
def test_vllm_rollouts_on_cuda(ray_gpu, tmp_path):
    last, seconds = _run_loop(tmp_path, ["--rollout.engine=vllm", "--rollout.num_gpus_per_worker=0.3"])
    print(json.dumps({"check": "loop-vllm-cuda", "seconds": seconds, "samples": last["samples"]}))


def test_reward_model_scoring_throughput_on_cuda():
    """Step rewards on the GPU match the CPU's (float32), then the throughput of scoring 1024 chains."""
    from dense_irl.data.synthetic import SyntheticConfig, generate
    from dense_irl.models.factory import ModelConfig, load_policy
    from dense_irl.models.reward_model import RewardModel, RewardModelConfig

    demos = generate(SyntheticConfig(n_problems=1024))
    policy, tok = load_policy(ModelConfig(), [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    rm = RewardModel(policy, tok, RewardModelConfig())
    chains = [(d.prompt, d.steps) for d in demos]
    want = torch.tensor([r for s in rm.score(chains[:64]) for r in s.step_rewards], dtype=torch.float64)
    rm.to("cuda")
    got = torch.tensor([r for s in rm.score(chains[:64]) for r in s.step_rewards], dtype=torch.float64)
    assert got.shape == want.shape and torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, f"GPU step rewards differ from the CPU's: relative error {rel:.2e}"
    torch.cuda.synchronize()
    t0 = time.monotonic()
    scores = rm.score(chains, batch_size=256)
    torch.cuda.synchronize()
    dt = time.monotonic() - t0
    assert len(scores) == len(chains) and all(s.steps_scored > 0 for s in scores)
    print(
        json.dumps({"check": "score-cuda", "chains_per_s": round(len(chains) / dt, 1), "rel_err_vs_cpu": rel})
    )
