"""The training entry point submitted through the real Ray Jobs API to a local `ray start --head`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dense_irl.runtime.learners import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ("--data.synthetic.n_problems=100 --data.calibration_chains=20 --model.hidden_size=32 --model.num_layers=1 "
        "--model.num_heads=2 --model.intermediate_size=64 --sft.max_steps=2 --sft.batch_size=8 --iterations=1 "
        "--prompts_per_iteration=4 --rollout.samples_per_prompt=2 --rollout.max_new_tokens=24 --reward_steps=1 "
        "--rl.ppo_steps=1 --eval_every=0 --checkpoint_every=1")


@pytest.fixture
def head_node():
    """A Ray head on 127.0.0.1 in its own process group and temp dir (so it never meets the test session's Ray)."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="rayjobs", dir="/tmp")
    dash = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # The session's own Ray (other test modules) holds the agents' default ports, e.g. 52365: without
         # ports of its own this head's job agent cannot start ("No available agent to submit job").
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # `ray start --block` takes its time over SIGTERM; its whole process group goes with SIGKILL
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_job_succeeds_through_the_jobs_api(head_node, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:  # the dashboard (which serves the Jobs API) takes a few seconds to come up
        try:
            client = JobSubmissionClient(head_node)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    out = tmp_path / "out"
    while True:  # the dashboard answers before the node's job agent registers ("No available agent ...")
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} {REPO / 'jobs' / 'train_irl.py'} {TINY} --output_dir={out}",
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 400
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status}:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (out / "checkpoints" / "iter_000001" / "reward_model" / "reward_config.json").is_file()
    assert '"samples"' in logs  # the final metrics the entry point prints
