"""Clean shutdown: `dense-irl serve` stopped with SIGTERM (what `ray job stop`, systemd and Kubernetes send)
answers the request in flight, then exits 0 (Ray's core worker would otherwise abort the process: 134)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel, RewardModelConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    demos = generate(SyntheticConfig(n_problems=40, seed=2))
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    policy, tok = load_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), texts)
    root = tmp_path_factory.mktemp("run")
    save_policy(policy, tok, root / "policy")
    RewardModel(policy, tok, RewardModelConfig()).save_pretrained(root / "rm")
    return root, demos[0].prompt


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_drains_the_request_in_flight_and_exits_0_on_sigterm(run):
    """Through the default ingress (HAProxy straight to the replica): the search in flight is answered."""
    root, prompt = run
    port = _port()
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, not the test session's
    proc = subprocess.Popen([sys.executable, "-m", "dense_irl.cli", "serve", "--reward-model", str(root / "rm"),
                             "--policy", str(root / "policy"), "--port", str(port), "--num-cpus", "0.5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        ready = proc.stdout.readline()  # its URLs, printed once the app is up and the handlers are set
        assert json.loads(ready)["url"] == url, proc.stderr.read()
        # the default ingress: HAProxy (a child of Ray's processes, which are this server's) on the port
        names = {p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        assert "haproxy" in names, names
        answers = []
        body = {"prompt": prompt, "n": 8, "max_new_tokens": 200, "temperature": 1.0}

        def search():
            try:
                answers.append(httpx.post(url + "/v1/search", json=body, timeout=120))
            except httpx.HTTPError as e:
                answers.append(e)

        slow = threading.Thread(target=search)
        slow.start()
        time.sleep(0.5)  # the search is running on the replica
        proc.send_signal(signal.SIGTERM)
        slow.join(120)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answers and isinstance(answers[0], httpx.Response), answers
    assert answers[0].status_code == 200, answers[0].text
    assert len(answers[0].json()["results"][0]["candidates"]) >= 1
    assert proc.returncode == 0, err[-2000:]
    assert "draining in-flight requests" in err
