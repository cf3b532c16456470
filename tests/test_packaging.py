"""A non-editable install (a built wheel) carries the presets: `dense-irl demo --help` and preset names work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_runs_the_cli_and_finds_its_presets(tmp_path):
    # Built from a copy: a build in the checkout would leave build/ and egg-info behind.
    src = tmp_path / "src_tree"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dense_irl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("demo_online", "offline_tiny", "search_tiny"):
        assert f"dense_irl/presets/{preset}.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}  # before the editable checkout on sys.path
    out = subprocess.run([sys.executable, "-c", "import dense_irl.config as c; print(c.__file__); "
                          "print(c.resolve_config('demo_online')); print(c.preset_names())"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)) and "offline_tiny" in out[2]
    run = subprocess.run([sys.executable, "-m", "dense_irl.cli", "demo", "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "--offline" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "dense_irl.cli", "train", "--config", "no_such_preset"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "no_such_preset" in bad.stderr and "demo_online" in bad.stderr
