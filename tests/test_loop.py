"""The online IRL loop on a real local Ray: a few iterations, checkpoints, exact resume, a killed worker."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import ray
import torch

from dense_irl.algo.experience import next_prompts
from dense_irl.config import load_config
from dense_irl.data.demos import load_data
from dense_irl.errors import ActorDiedError, ConfigError
from dense_irl.runtime.driver import run_iterations, start_driver, train_online
from dense_irl.runtime.loop_config import LoopConfig

TINY_LOOP = [
    "--data.synthetic.n_problems=100",
    "--data.calibration_chains=20",
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=2",
    "--model.intermediate_size=64",
    "--sft.max_steps=2",
    "--sft.batch_size=8",
    "--prompts_per_iteration=4",
    "--rollout.samples_per_prompt=2",
    "--rollout.max_new_tokens=24",
    "--reward_steps=1",
    "--rl.ppo_steps=1",
    "--eval_every=0",
    "--checkpoint_every=1",
]


@pytest.fixture(autouse=True)
def _no_serve(ray_session):
    """Serve apps from other test modules hold CPUs; the loop needs them."""
    from ray import serve

    serve.shutdown()


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return {f"{f.parent.name}/{f.name}/{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def test_loop_runs_checkpoints_and_resumes_exactly(tmp_path):
    import os
    import signal

    out = tmp_path / "run"
    # The warm-up schedule's state travels in the checkpoint too. SIGTERM (ray job stop, Kubernetes) while
    # iteration 1 reports: the run ends after it, with its checkpoint, and returns normally.
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=2", "--reward.warmup_steps=3",
                                         "--rl.warmup_steps=3", f"--output_dir={out}"])
    last = train_online(cfg, report=lambda metrics, ckpt: os.kill(os.getpid(), signal.SIGTERM))
    stopped = [r for r in _metrics(out) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM" and stopped[0]["iteration"] == 1
    assert last["samples"] > 0 and "policy/kl" in last and "reward/bce_total" in last
    ckpt = out / "checkpoints" / "iter_000001"
    assert (ckpt / "policy" / "model.safetensors").is_file()
    assert (ckpt / "reward_model" / "reward_config.json").is_file()
    assert (ckpt / "optimizer" / "policy" / "optimizer.pt").is_file()
    assert (ckpt / "optimizer" / "reward" / "optimizer.pt").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "iter_000001"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["iteration"] == 1 and state["reference"] == str((out / "init" / "sft_policy").resolve())

    # Resume to iteration 2: the batch of iteration 2 is the one the cursor promised.
    cfg2 = load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=2", "--reward.warmup_steps=3", "--rl.warmup_steps=3",
                                          f"--output_dir={out}", "--resume=auto"])
    train_online(cfg2)
    rows = [r for r in _metrics(out) if "batch_ids" in r]
    assert [r["iteration"] for r in rows] == [1, 2]
    drv_demos = load_data(cfg.data)
    random.Random(cfg.seed).shuffle(drv_demos)
    train = drv_demos[min(cfg.data.calibration_chains, len(drv_demos) // 5):]
    first, cursor = next_prompts(train, {"epoch": 0, "pos": 0}, 4, cfg.seed)
    second, _ = next_prompts(train, cursor, 4, cfg.seed)
    assert rows[0]["batch_ids"] == [d.id for d in first]
    assert rows[1]["batch_ids"] == [d.id for d in second]
    assert any(r.get("event") == "resumed" and r["optimizer_state"] for r in _metrics(out))

    # The same two iterations without a stop: the same samples, the same weights, bit for bit (the reference,
    # the optimisers' moments, the samplers' seeds and the driver's RNG all came back). This run also publishes
    # each checkpoint to a server that is not there: each publish is tried, logged as failed, and not fatal.
    straight = tmp_path / "straight"
    train_online(load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=2", "--reward.warmup_steps=3",
                                       "--rl.warmup_steps=3", f"--output_dir={straight}",
                                       "--serve.publish_url=http://127.0.0.1:9", "--serve.timeout_s=2"]))
    failed = [r for r in _metrics(straight) if r.get("event") == "publish_failed"]
    assert [Path(r["reward_model"]).parent.name for r in failed] == ["iter_000001", "iter_000002"]
    rows_straight = [r for r in _metrics(straight) if "batch_ids" in r]
    # Each iteration's wall time, each phase's, and the actors' own compute inside (bench/iteration_bench.py).
    for r in rows_straight:
        phases = ("rollout", "reward", "score", "advantages", "policy", "sync")
        assert r["time_iteration_s"] >= sum(r[f"time_{p}_s"] for p in phases)
        for p in ("rollout", "reward", "score", "policy", "sync"):
            assert 0 < r[f"compute_{p}_s"] <= r[f"time_{p}_s"], p
    ckpts = [r for r in _metrics(straight) if r.get("event") == "checkpoint"]
    assert [Path(r["path"]).name for r in ckpts] == ["iter_000001", "iter_000002"]
    assert all(r["time_checkpoint_s"] > 0 for r in ckpts)
    assert rows_straight[1]["step_reward_mean"] == rows[1]["step_reward_mean"]
    a, b = _weights(out / "checkpoints" / "iter_000002"), _weights(straight / "checkpoints" / "iter_000002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_process_stopped_then_killed_while_checkpointing_resumes_exactly(tmp_path):
    """``dense-irl train`` as its own process: SIGTERM ends it with exit 0 after a checkpoint; a resumed process
    then SIGKILLed while it writes its next checkpoint leaves a half-written folder that is never picked; and
    ``--resume=auto`` goes on from the last whole checkpoint. Every attempt at an iteration draws its batch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [*TINY_LOOP, "--iterations=3", "--checkpoint_every=1", f"--output_dir={out}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # this session's cluster

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", "dense_irl.cli", "train", *args, *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(proc, done, what):
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not done():
            time.sleep(0.002)
        if not done():
            proc.kill()
            pytest.fail(f"the train process ended or timed out before {what}")

    proc = start()
    wait_for(proc, lambda: (out / "metrics.jsonl").is_file() and any("batch_ids" in r for r in _metrics(out)),
             "its first iteration")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    stopped = [r for r in _metrics(out) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    k = int((ckpts / "latest").read_text().removeprefix("iter_"))
    assert stopped[0]["checkpoint"].endswith(f"iter_{k:06d}") and k < 3

    proc = start("--resume=auto")
    partial = ckpts / f".iter_{k + 1:06d}.tmp"
    wait_for(proc, partial.exists, "it wrote its next checkpoint")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL and not (ckpts / f"iter_{k + 1:06d}").exists()
    assert (ckpts / "latest").read_text() == f"iter_{k:06d}"

    cfg = load_config(LoopConfig, None, [*args, "--resume=auto"])
    train_online(cfg)
    rows = [r for r in _metrics(out) if "batch_ids" in r]
    assert [r["iteration"] for r in rows] == [*range(1, k + 2), *range(k + 1, 4)]  # iteration k+1 twice
    resumed = [r["from"] for r in _metrics(out) if r.get("event") == "resumed"]
    assert [Path(r).name for r in resumed] == [f"iter_{k:06d}"] * 2
    drv_demos = load_data(cfg.data)
    random.Random(cfg.seed).shuffle(drv_demos)
    train = drv_demos[min(cfg.data.calibration_chains, len(drv_demos) // 5):]
    cursor, want = {"epoch": 0, "pos": 0}, []
    for _ in range(3):
        batch, cursor = next_prompts(train, cursor, 4, cfg.seed)
        want.append([d.id for d in batch])
    assert all(r["batch_ids"] == want[r["iteration"] - 1] for r in rows)
    assert (ckpts / "latest").read_text() == "iter_000003" and not partial.exists()


def test_resume_without_the_reference_policy_is_a_clear_error(tmp_path):
    import shutil

    out = tmp_path / "run"
    train_online(load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=1", f"--output_dir={out}"]))
    shutil.rmtree(out / "init" / "sft_policy")
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=2", f"--output_dir={out}", "--resume=auto"])
    with pytest.raises(FileNotFoundError, match="KL reference policy .*sft_policy.* is gone"):
        train_online(cfg)


def test_killed_actors(tmp_path):
    """A killed rollout worker is replaced; a killed learner stops the run with a message naming it and the
    checkpoint to resume from (the resume itself is the one test_loop_runs_checkpoints_and_resumes_exactly
    shows exact)."""
    out = tmp_path / "run"
    # (with policy_negatives=incorrect: only the samples the verifier rejects are the discriminator's negatives)
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=3", "--policy_negatives=incorrect",
                                         f"--output_dir={out}"])
    drv = start_driver(cfg)
    drv.iteration()
    ray.kill(drv.workers[0])
    m = drv.iteration()  # the dead worker is replaced and the iteration completes
    assert m["samples"] > 0 and drv.state["iteration"] == 2
    events = [r for r in _metrics(out) if r.get("event") == "rollout_worker_replaced"]
    assert len(events) == 1
    assert ray.get(drv.workers[0].ping.remote()) == 2  # the new worker has the latest weights
    drv.checkpoint()
    ray.kill(drv.reward[0])
    with pytest.raises(ActorDiedError, match=r"the reward learner rank 0 died during iteration 3 .*--resume=auto: "
                                             r"it continues from .*iter_000002"):
        run_iterations(drv)


def test_unknown_policy_negatives_is_a_clear_error(tmp_path):
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, f"--output_dir={tmp_path}", "--policy_negatives=some"])
    with pytest.raises(ValueError, match="policy_negatives must be 'all' or 'incorrect'"):
        train_online(cfg)


@pytest.mark.parametrize(("flag", "msg"), [("--reward.alpha=0", "reward.alpha must be > 0"),
                                           ("--reward.warmup_steps=-1", "reward.warmup_steps must be >= 0"),
                                           ("--rl.ptx_coef=-1", "rl.ptx_coef must be >= 0"),
                                           ("--rl.warmup_steps=-2", "rl.warmup_steps must be >= 0"),
                                           ("--placement_strategy=FOO", "placement_strategy must be one of"),
                                           ("--serve.publish_url=localhost:8000", "serve.publish_url must be the http"),
                                           ])
def test_bad_reward_option_is_a_clear_error(tmp_path, flag, msg):
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, f"--output_dir={tmp_path}", flag])
    with pytest.raises(ValueError, match=msg):
        train_online(cfg)


def test_offline_only_reward_keys_are_unknown_online():
    with pytest.raises(ConfigError, match="unknown config key reward.continue_sft_optimizer"):
        load_config(LoopConfig, None, ["--reward.continue_sft_optimizer=true"])
    with pytest.raises(ConfigError, match="unknown config key reward.negative_pool"):
        load_config(LoopConfig, None, ["--reward.negative_pool=2"])


def test_resume_from_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, f"--output_dir={tmp_path}", f"--resume={tmp_path / 'x'}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_online(cfg)


@pytest.mark.parametrize(
    "backend_args",
    [
        ["--learner.backend=deepspeed", "--learner.zero_stage=3", "--learner.num_workers=2",
         "--learner.num_cpus_per_worker=0.25", "--reward.warmup_steps=3", "--rl.ptx_coef=0.5"],
        ["--learner.backend=torch", "--learner.num_workers=2", "--learner.num_cpus_per_worker=0.25",
         "--reward.warmup_steps=3", "--rl.ptx_coef=0.5"],
    ],
    ids=["deepspeed-zero3-2-ranks", "torch-ddp-2-ranks"],
)
def test_loop_backends(tmp_path, backend_args):
    """One iteration on each learner backend this machine runs (DeepSpeed on CPU uses gloo), with the reward
    learner's warm-up schedule (DeepSpeed's WarmupLR, torch's LambdaLR) and PPO-ptx, then a resume for a second
    one."""
    pytest.importorskip("deepspeed") if "deepspeed" in backend_args[0] else None
    out = tmp_path / "run"
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, *backend_args, "--iterations=1", f"--output_dir={out}"])
    last = train_online(cfg)
    assert last["samples"] > 0 and last["policy/ratio"] == pytest.approx(1.0, abs=0.05)
    assert last["policy/ptx_nll"] > 0  # PPO-ptx: policy and expert rows in one forward pass, on both backends
    assert (out / "checkpoints" / "iter_000001" / "policy" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "iter_000001" / "reward_model" / "reward_head.safetensors").is_file()
    # Resumed on the same backend and ranks: the optimiser state (DeepSpeed: each rank's ZeRO partition) loads.
    train_online(load_config(LoopConfig, None, [*TINY_LOOP, *backend_args, "--iterations=2", f"--output_dir={out}",
                                       "--resume=auto"]))
    assert any(r.get("event") == "resumed" and r["optimizer_state"] for r in _metrics(out))
    assert (out / "checkpoints" / "latest").read_text() == "iter_000002"


def test_roles_are_pinned_to_one_placement_group(tmp_path):
    """Every role lives in the driver's placement group; colocated learners share a bundle."""
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, "--colocate_learners=true", "--learner.num_cpus_per_worker=0.25",
                                         f"--output_dir={tmp_path}"])
    drv = start_driver(cfg)
    try:
        pg_id = drv.pg.id.hex()
        for a in drv.policy + drv.reward + drv.workers:
            got = ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_placement_group_id()))
            assert got == pg_id
        assert drv.bundle_of[("policy", 0)] == drv.bundle_of[("reward", 0)] == 0
        assert drv.bundle_of[("rollout", 0)] == 1
    finally:
        drv.close()


def test_unplaceable_roles_are_a_clear_error(tmp_path):
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, "--rollout.num_cpus_per_worker=8", "--placement_timeout_s=3",
                                         "--sft.max_steps=1", f"--output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="could not be placed"):
        start_driver(cfg)


def test_collective_weight_sync_reaches_workers_and_pi_old(tmp_path):
    """`rollout.weight_sync: collective`: a broadcast group (gloo here, NCCL on GPUs) carries the weights."""
    cfg = load_config(LoopConfig, None, [*TINY_LOOP, "--rollout.weight_sync=collective", "--rollout.num_workers=2",
                                         "--rollout.num_cpus_per_worker=0.25", f"--output_dir={tmp_path}"])
    drv = start_driver(cfg)
    try:
        drv.iteration()  # PPO changes the policy, then the push broadcasts it
        assert drv.weight_spec is not None
        sums = lambda model: {k: round(v.double().sum().item(), 6) for k, v in model.state_dict().items()}  # noqa: E731
        want = ray.get(drv.policy[0].__ray_call__.remote(lambda self: sums(self.module)))
        for w in drv.workers:
            assert ray.get(w.__ray_call__.remote(lambda self: sums(self.engine.model))) == want
        assert ray.get(drv.reward[0].__ray_call__.remote(lambda self: sums(self.pi_old))) == want
        ray.kill(drv.workers[1])
        drv.iteration()  # the replaced worker gets the weights and the group is rebuilt at the next push
        want = ray.get(drv.policy[0].__ray_call__.remote(lambda self: sums(self.module)))
        assert ray.get(drv.workers[1].__ray_call__.remote(lambda self: sums(self.engine.model))) == want
        assert ray.get(drv.workers[1].ping.remote()) == 2
    finally:
        drv.close()


def test_reward_backbone_of_another_size(tmp_path):
    """A smaller reward backbone beside the policy (same tokenizer); a foreign tokenizer is a clear error."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    first = tmp_path / "first"
    drv = start_driver(load_config(LoopConfig, None, [*TINY_LOOP, f"--output_dir={first}"]))
    drv.close()
    tok = AutoTokenizer.from_pretrained(first / "init" / "policy")
    small = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    small.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    out = tmp_path / "run"
    train_online(load_config(LoopConfig, None, [*TINY_LOOP, "--iterations=1", f"--reward_backbone={tmp_path / 'small'}",
                                      f"--output_dir={out}"]))
    cfg = json.loads((out / "checkpoints" / "iter_000001" / "reward_model" / "config.json").read_text())
    assert cfg["hidden_size"] == 16

    other = AutoTokenizer.from_pretrained(first / "init" / "policy")
    other.add_tokens(["<unseen>"])
    other.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="tokenizer differs"):
        start_driver(load_config(LoopConfig, None, [*TINY_LOOP, f"--reward_backbone={tmp_path / 'small'}",
                                            f"--output_dir={tmp_path / 'bad'}"]))
    with pytest.raises(FileNotFoundError, match="reward_backbone: no HF model folder"):
        start_driver(load_config(LoopConfig, None, [*TINY_LOOP, f"--reward_backbone={tmp_path / 'none'}",
                                            f"--output_dir={tmp_path / 'bad'}"]))
