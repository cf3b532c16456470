"""`dense-irl tune` on a real local Ray: a tiny ASHA search, interrupted and resumed, its reports, its errors."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from ray import tune

from dense_irl.cli import main
from dense_irl.config import ConfigError, load_config
from dense_irl.runtime.driver import train_online
from dense_irl.runtime.loop_config import LoopConfig
from dense_irl.runtime.tune import (
    ResourcesConfig,
    TuneConfig,
    load_tune_config,
    resolve_base,
    run_tune,
    search_space,
    trial_bundles,
)

REPO = Path(__file__).resolve().parents[1]
SEARCH_TINY = REPO / "src/dense_irl/presets/search_tiny.yaml"
# The tiny preset made small and fast (as tests/test_loop.py), evaluated and checkpointed every iteration.
FAST = {
    "data.synthetic.n_problems": 100,
    "data.calibration_chains": 40,
    "model.hidden_size": 32,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.intermediate_size": 64,
    "sft.max_steps": 10,
    "sft.batch_size": 8,
    "prompts_per_iteration": 4,
    "rollout.samples_per_prompt": 2,
    "rollout.max_new_tokens": 24,
    "reward_steps": 1,
    "rl.ppo_steps": 1,
    "iterations": 6,
    "eval_every": 1,
    "eval_prompts": 40,
    "checkpoint_every": 1,
    # A frozen reward model makes every trial's F1 a fixed number, so ASHA's decision is certain: the
    # log-prob reading (airl+iq) flags some errors (F1 > 0); the zero-initialised heads alone (airl) score
    # every step 0 (F1 = 0). The grid puts a good trial before each bad one, so the second bad trial meets
    # a rung that already holds a better F1 and is stopped (the first bad one may be too).
    "reward.lr": 0.0,
    "reward.token_temperature": False,  # the heads-only objective (airl) has no lm term to scale
}
SPACE = {"reward.objective": {"grid": ["airl+iq", "airl"]}}


@pytest.fixture
def _no_serve(ray_session):
    """Serve apps from other test modules hold CPUs; the trials need both."""
    from ray import serve

    serve.shutdown()


def _search_file(tmp_path: Path) -> Path:
    spec = yaml.safe_load(SEARCH_TINY.read_text())
    spec["base"] = str(REPO / "src/dense_irl/presets" / spec["base"])
    spec["overrides"] = {**spec["overrides"], **FAST}
    spec.update(
        {
            "space": SPACE,
            "num_samples": 2,
            "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": 6},
            "storage_path": str(tmp_path / "tune"),
        }
    )
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _summary(out: str) -> dict:
    """The summary JSON the command prints last (Tune's progress tables come before it)."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


class _CtrlCAtFirstCheckpoint(tune.Callback):
    """Interrupts the search like Ctrl-C (Tune takes SIGUSR1 as its stop signal too) right after Tune
    registered a trial's first checkpoint. Tune pickles callbacks with the search and a restored search
    gets this one back, so whether it already fired lives in a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
@pytest.mark.usefixtures("_no_serve")
def test_tiny_search_interrupted_resumed_asha_stops_and_best_config_trains(tmp_path, capsys):
    search = _search_file(tmp_path)
    exp = tmp_path / "tune" / "search_tiny"
    ctrl_c = _CtrlCAtFirstCheckpoint(tmp_path / "interrupted")
    interrupted = run_tune(load_tune_config(search), callbacks=[ctrl_c])
    assert interrupted["interrupted"] is True and interrupted["unfinished"] >= 1
    assert interrupted["experiment"] == str(exp)
    assert not (exp / "results.csv").exists()
    # A second start without --resume would mix two searches in one folder.
    assert main(["tune", "--search", str(search)]) == 2
    assert "--resume" in capsys.readouterr().err

    assert main(["tune", "--search", str(search), "--resume"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["trials"] == 4 and summary["errors"] == 0
    rows = list(csv.DictReader((exp / "results.csv").open()))
    assert len(rows) == 4 and {r["reward.objective"] for r in rows} == {"airl+iq", "airl"}
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and summary["stopped_early"] == len(stopped)
    assert all(r["reward.objective"] == "airl" and int(r["iterations"]) < 6 for r in stopped)
    assert all(r["status"] == "completed" for r in rows if r["reward.objective"] == "airl+iq")
    # The interrupted trial went on from its checkpoint, not from scratch.
    events = [
        json.loads(line).get("event")
        for p in (exp / "runs").glob("*/metrics.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert "resumed" in events
    # Each trial ran in a placement group of 4 bundles: the trial function, 2 learners, 1 rollout worker.
    result = json.loads(next(exp.glob("_trial_*/result.json")).read_text().splitlines()[0])
    assert result["trial/bundles"] == 4
    md = (exp / "results.md").read_text()
    assert "stopped early" in md and "dense-irl train --config" in md
    assert (exp / "metric_vs_iteration.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["best_params"] == {"reward.objective": "airl+iq"} and summary["best_metric"] > 0

    # The best YAML is a full `dense-irl train` config with a fresh output folder; it trains.
    best = load_config(LoopConfig, exp / "best_config.yaml", ["--iterations=1", "--eval_every=0"])
    assert best.reward.objective == "airl+iq" and best.resume == "no"
    assert best.learner.num_cpus_per_worker == 0.25  # the search YAML's overrides are in
    assert Path(best.output_dir) == exp / "best_run" and not Path(best.output_dir).exists()
    last = train_online(best)
    assert last["samples"] > 0 and (Path(best.output_dir) / "checkpoints" / "iter_000001").is_dir()


def test_trial_bundles_hold_the_trial_function_and_every_actor():
    loop = load_config(
        LoopConfig,
        REPO / "src/dense_irl/presets/irl_tiny.yaml",
        ["--learner.num_workers=2", "--learner.num_gpus_per_worker=0.5", "--rollout.num_workers=3"],
    )
    bundles = trial_bundles(loop, ResourcesConfig(trial_cpus=1.0))
    assert bundles == [{"CPU": 1.0}] + [{"CPU": 0.5, "GPU": 0.5}] * 4 + [{"CPU": 0.5}] * 3
    assert trial_bundles(loop, ResourcesConfig(bundles=[{"CPU": 4}])) == [{"CPU": 4}]
    tiny = load_tune_config(SEARCH_TINY)
    per_trial = trial_bundles(resolve_base(tiny), tiny.resources)
    # Two trials at a time fit the 2-CPU test Ray.
    assert sum(b.get("CPU", 0) for b in per_trial) * tiny.max_concurrent_trials <= 2


def test_search_tiny_yaml_loads_and_its_space_is_valid():
    cfg = load_tune_config(SEARCH_TINY)
    assert cfg.num_samples == 4 and cfg.max_concurrent_trials == 2
    base = resolve_base(cfg)
    assert base.iterations == 8 and base.model.name == "tiny"
    assert set(search_space(cfg, base)) == set(cfg.space)


def test_inline_base_and_overrides():
    cfg = TuneConfig(base={"iterations": 4, "reward": {"lr": 0.01}}, overrides={"rl.lr": 1.0e-5})
    base = resolve_base(cfg, ["--eval_every=2"])
    assert (base.iterations, base.reward.lr, base.rl.lr, base.eval_every) == (4, 0.01, 1.0e-5, 2)
    with pytest.raises(ConfigError, match="no base config"):
        resolve_base(TuneConfig())


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"reward.lrr": {"loguniform": [1.0e-4, 1.0e-2]}},
            "unknown config key reward.lrr; valid keys of reward",
        ),
        ({"reward.lr": {"logunifrom": [1.0e-4, 1.0e-2]}}, "unknown distribution 'logunifrom'"),
        ({"reward.lr": {"loguniform": ["1e-4", "1e-2"]}}, "write floats with a dot"),
        ({"reward.lr": {"loguniform": [0.0, 1.0]}}, "bad arguments"),
        ({"prompts_per_iteration": {"uniform": [2, 8]}}, "expected int"),
        ({"rl.kl_coef": {"choice": []}}, "non-empty list"),
        ({"rl.kl_coef": [0.01, 0.1]}, "expected one distribution like"),
        ({"output_dir": {"choice": ["a", "b"]}}, "set by the search itself"),
        # loads, but cannot run with the recipe's token_temperature: caught before any trial starts
        ({"reward.objective": {"grid": ["airl+iq", "airl"]}}, r"token_temperature .* needs objective 'airl\+iq'"),
    ],
)
def test_bad_search_space_is_a_clear_error(space, message):
    cfg = TuneConfig(base=str(REPO / "src/dense_irl/presets/irl_tiny.yaml"), space=space)
    with pytest.raises(ConfigError, match=message):
        search_space(cfg, resolve_base(cfg))


def test_cli_errors_before_anything_starts(tmp_path, capsys):
    search = tmp_path / "s.yaml"
    search.write_text(yaml.safe_dump({"base": "missing.yaml", "space": {}}))
    assert main(["tune", "--search", str(search)]) == 2
    assert f"error: base config not found: {tmp_path / 'missing.yaml'}" in capsys.readouterr().err
    assert main(["tune", "--search", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    search.write_text(yaml.safe_dump({"base": str(REPO / "src/dense_irl/presets/irl_tiny.yaml"), "metrc": "x"}))
    assert main(["tune", "--search", str(search)]) == 2
    assert "unknown config key metrc" in capsys.readouterr().err
    search.write_text(
        yaml.safe_dump(
            {"base": str(REPO / "src/dense_irl/presets/irl_tiny.yaml"), "space": {"reward.lrr": {"choice": [0.1]}}}
        )
    )
    assert main(["tune", "--search", str(search), "--storage-path", str(tmp_path)]) == 2
    assert "unknown config key reward.lrr" in capsys.readouterr().err
    search.write_text(yaml.safe_dump({"base": str(REPO / "src/dense_irl/presets/irl_tiny.yaml")}))
    # The tiny preset runs 20 iterations: an evaluation every 3 would leave the last ones unreported.
    assert main(["tune", "--search", str(search), "--eval_every=3"]) == 2
    assert "eval_every (3) must be >= 1 and divide iterations (20)" in capsys.readouterr().err
    assert main(["tune", "--search", str(search), "--eval_every=4", "--minutes=5"]) == 2
    assert "minutes (5.0) must be 0 in a search" in capsys.readouterr().err
    assert main(["tune", "--search", str(search), "--storage-path", str(tmp_path), "--resume"]) == 2
    assert f"no search to continue in {tmp_path / 'search'}" in capsys.readouterr().err
