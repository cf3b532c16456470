"""GPU-only checks (run by scripts/gpu_smoke.sh on a GPU machine; skipped without CUDA)."""

from __future__ import annotations

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
]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init(include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_loop_on_cuda(ray_gpu, tmp_path, backend):
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import LoopConfig, run

    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    t0 = time.monotonic()
    cfg = load_config(LoopConfig, None, [*LOOP, f"--learner.backend={backend}", f"--output_dir={tmp_path}"])
    last = run(cfg)
    print(json.dumps({"check": f"loop-{backend}-cuda", "seconds": round(time.monotonic() - t0, 1),
                      "policy_ratio": last["policy/ratio"], "samples": last["samples"]}))
    assert last["samples"] > 0


def test_collective_weight_sync_with_cuda_learners(ray_gpu, tmp_path):
    """Weights broadcast from a CUDA learner (gloo here: NCCL needs a whole GPU per member, so >= 2 GPUs)."""
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import LoopConfig, run

    t0 = time.monotonic()
    cfg = load_config(LoopConfig, None, [*LOOP, "--rollout.weight_sync=collective", "--rollout.num_gpus_per_worker=0.3",
                                         f"--output_dir={tmp_path}"])
    last = run(cfg)
    print(json.dumps({"check": "loop-collective-weight-sync-cuda", "seconds": round(time.monotonic() - t0, 1),
                      "samples": last["samples"]}))
    assert last["samples"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="NCCL weight sync needs 3 GPUs (a whole one per member)")
def test_nccl_weight_sync(ray_gpu, tmp_path):
    """The NCCL path: learners and the rollout worker each on a whole GPU."""
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import LoopConfig, run

    cfg = load_config(LoopConfig, None, [*LOOP, "--rollout.weight_sync=collective", "--learner.num_gpus_per_worker=1",
                                         "--rollout.num_gpus_per_worker=1", f"--output_dir={tmp_path}"])
    assert run(cfg)["samples"] > 0


def test_vllm_rollouts_on_cuda(ray_gpu, tmp_path):
    pytest.importorskip("vllm")
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import LoopConfig, run

    t0 = time.monotonic()
    cfg = load_config(LoopConfig, None, [*LOOP, "--rollout.engine=vllm", "--rollout.num_gpus_per_worker=0.3",
                                         f"--output_dir={tmp_path}"])
    last = run(cfg)
    print(json.dumps({"check": "loop-vllm-cuda", "seconds": round(time.monotonic() - t0, 1),
                      "samples": last["samples"]}))
    assert last["samples"] > 0


def test_reward_model_scoring_throughput_on_cuda(tmp_path):
    from dense_irl.data.synthetic import SyntheticConfig, generate
    from dense_irl.models.factory import ModelConfig, load_policy
    from dense_irl.models.reward_model import RewardModel, RewardModelConfig

    demos = generate(SyntheticConfig(n_problems=1024))
    policy, tok = load_policy(ModelConfig(), [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    rm = RewardModel(policy, tok, RewardModelConfig()).to("cuda")
    chains = [(d.prompt, d.steps) for d in demos]
    rm.score(chains[:64])
    torch.cuda.synchronize()
    t0 = time.monotonic()
    rm.score(chains, batch_size=256)
    torch.cuda.synchronize()
    dt = time.monotonic() - t0
    print(json.dumps({"check": "score-cuda", "chains_per_s": round(len(chains) / dt, 1)}))
