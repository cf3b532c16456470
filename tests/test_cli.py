"""The `dense-irl` command end to end on tiny data: data tools, train-reward, eval, and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dense_irl.cli import main

GSM8K = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"

TINY_RUN = [
    "--data.synthetic.n_problems=80",
    "--data.calibration_chains=20",
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=2",
    "--model.intermediate_size=64",
    "--sft.max_steps=3",
    "--sft.batch_size=8",
    "--reward.max_steps=3",
    "--reward.batch_size=8",
]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny offline run shared by the eval tests."""
    out = tmp_path_factory.mktemp("run")
    cfg = out / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(out / "reward"), "seed": 1}))
    assert main(["train-reward", "--config", str(cfg), *TINY_RUN]) == 0
    return out / "reward"


def test_train_reward_writes_checkpoints_metrics_and_config(trained):
    assert (trained / "reward_model" / "reward_config.json").is_file()
    assert (trained / "reward_model" / "model.safetensors").is_file()
    assert (trained / "sft_policy" / "config.json").is_file()
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"sft", "reward"}
    assert any(p.name.startswith("events") for p in (trained / "tb").iterdir())
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["seed"] == 1 and saved["sft"]["max_steps"] == 3
    summary = json.loads((trained / "summary.json").read_text())
    assert isinstance(summary["threshold"], float)


def test_synth_perturb_stats_and_eval_localisation(trained, tmp_path, capsys):
    code, out, _ = _run(capsys, "data", "synth", tmp_path / "test.parquet", "--n", 40, "--seed", 99)
    assert code == 0 and json.loads(out)["rows"] == 40
    code, out, _ = _run(capsys, "data", "perturb", tmp_path / "test.parquet", tmp_path / "pb.jsonl", "--seed", 1)
    assert code == 0 and json.loads(out)["erroneous"] == 20
    _run(capsys, "data", "synth", tmp_path / "cal.parquet", "--n", 30, "--seed", 98)
    code, _, err = _run(capsys, "data", "synth", tmp_path / "bad.parquet", "--n", 3, "--step-styles", 9)
    assert code == 2 and "SyntheticConfig.step_styles = 9" in err and not (tmp_path / "bad.parquet").exists()
    _run(capsys, "data", "perturb", tmp_path / "cal.parquet", tmp_path / "cal.jsonl")
    code, out, _ = _run(capsys, "data", "stats", tmp_path / "pb.jsonl")
    assert code == 0 and json.loads(out)["rows"] == 40

    code, out, err = _run(
        capsys, "eval", "localisation", "--reward-model", trained / "reward_model", "--data", tmp_path / "pb.jsonl",
        "--calibration", tmp_path / "cal.jsonl", "--policy", trained / "sft_policy", "--out", tmp_path / "rep.json",
        "--plots", 2,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "rep.json").read_text())
    assert set(report) == {"reward_model", "policy_logprob", "chance"}
    assert 0.0 <= report["reward_model"]["f1"] <= 1.0 and report["reward_model"]["n"] == 40
    assert (tmp_path / "rep.md").read_text().count("|") > 10
    assert (tmp_path / "plots" / "chain_0.png").read_bytes()[:4] == b"\x89PNG"
    assert "f1" in out


def test_eval_bon_generic_file(trained, tmp_path, capsys):
    rows = [{"problem": "Sam has 2 apples. He finds 3 more. How many apples does Sam have now?",
             "candidates": [{"steps": ["He finds 3 more: 2 + 3 = 5.", "The answer is 5."], "is_correct": True},
                            {"steps": ["He finds 3 more: 2 + 3 = 6.", "The answer is 6."], "is_correct": False}]}]
    (tmp_path / "bon.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = _run(capsys, "eval", "bon", "--reward-model", trained / "reward_model",
                          "--data", tmp_path / "bon.jsonl", "--out", tmp_path / "bon.json")
    assert code == 0, err
    rep = json.loads((tmp_path / "bon.json").read_text())["reward_model"]
    assert rep["accuracy"]["oracle"] == 1.0 and rep["accuracy"]["random"] == 0.5


def test_label_writes_trl_and_processbench_rows_that_load_back(trained, tmp_path, capsys):
    from dense_irl.data.readers import load_demonstrations
    from dense_irl.models.reward_model import RewardModel

    _run(capsys, "data", "synth", tmp_path / "chains.parquet", "--n", 12, "--seed", 7)
    rm = RewardModel.from_pretrained(trained / "reward_model")
    for fmt in ("trl", "processbench"):
        out = tmp_path / f"labels_{fmt}.jsonl"
        code, printed, err = _run(capsys, "label", tmp_path / "chains.parquet", out, "--reward-model",
                                  trained / "reward_model", "--as", fmt)
        assert code == 0, err
        assert json.loads(printed)["chains"] == 12
        demos, _ = load_demonstrations(out, fmt=fmt)  # our own readers take them back
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        source, _ = load_demonstrations(tmp_path / "chains.parquet")
        scores = rm.score([(d.prompt, d.steps) for d in source])
        for d, row, s in zip(demos, rows, scores):
            assert row["step_scores"] == pytest.approx(s.step_rewards, abs=1e-5)
            if fmt == "trl":
                assert d.meta["labels"] == [x >= rm.config.threshold for x in s.step_rewards]
            else:
                assert d.meta["label"] == s.first_error and row["final_answer_correct"] == (s.first_error == -1)
    code, _, err = _run(capsys, "label", tmp_path / "chains.parquet", tmp_path / "x.csv", "--reward-model",
                        trained / "reward_model")
    assert code == 2 and "give a .jsonl path" in err


def test_label_output_loads_with_trl_dataset_code(trained, tmp_path, capsys):
    """TRL's own path: HF datasets reads the JSONL, PRMTrainer.tokenize_row turns each row into token labels."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.prm import PRMTrainer

    from dense_irl.models.reward_model import RewardModel

    _run(capsys, "data", "synth", tmp_path / "chains.parquet", "--n", 6, "--seed", 3)
    out = tmp_path / "trl.jsonl"
    code, _, err = _run(capsys, "label", tmp_path / "chains.parquet", out, "--reward-model", trained / "reward_model")
    assert code == 0, err
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == 6 and {"prompt", "completions", "labels"} <= set(ds.column_names)
    tok = RewardModel.from_pretrained(trained / "reward_model").tokenizer
    # What PRMTrainer.__init__ maps over its train_dataset (TRL 1.10, trl/experimental/prm/prm_trainer.py).
    ints = datasets.Features({"labels": datasets.Sequence(datasets.Value("int64")),
                              "input_ids": datasets.Sequence(datasets.Value("int64"))})
    tokenized = ds.map(PRMTrainer.tokenize_row, remove_columns=ds.features, features=ints, fn_kwargs={
        "tokenizer": tok, "step_separator": "\n", "max_length": None, "max_completion_length": None,
        "train_on_last_step_only": False, "is_eval": False})
    for row, t in zip(ds, tokenized):
        marked = [x for x in t["labels"] if x != -100]
        assert marked == [int(v) for v in row["labels"]] and len(t["input_ids"]) == len(t["labels"])


def test_unknown_config_key_is_one_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reward:\n  objectve: airl\n")
    code, _, err = _run(capsys, "train-reward", "--config", cfg)
    assert code == 2 and "unknown config key reward.objectve" in err and "objective" in err
    code, _, err = _run(capsys, "train-reward", "--reward.lr=fast")
    assert code == 2 and "reward.lr" in err and "expected float" in err
    code, _, err = _run(capsys, "train-reward", "--reward.objective=maxent")
    assert code == 2 and "'maxent' is not one of" in err


def test_missing_files_are_named(tmp_path, capsys):
    code, _, err = _run(capsys, "train-reward", "--config", tmp_path / "nope.yaml")
    assert code == 2 and "config file not found" in err and "nope.yaml" in err
    code, _, err = _run(capsys, "eval", "localisation", "--reward-model", tmp_path / "ckpt", "--data", "x.jsonl")
    assert code == 2 and "checkpoint not found" in err
    code, _, err = _run(capsys, "data", "stats", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl" in err


def test_bad_row_names_file_line_and_field_and_skip_bad_counts(tmp_path, capsys):
    bad = tmp_path / "gsm.jsonl"
    bad.write_text(
        json.dumps({"question": "2+2?", "answer": "2+2 = <<2+2=4>>4\n#### 4"}) + "\n"
        + json.dumps({"question": "3+3?"}) + "\n"
    )
    code, _, err = _run(capsys, "data", "convert", bad, tmp_path / "out.parquet")
    assert code == 2 and "gsm.jsonl" in err and "line 2" in err and "'answer'" in err
    assert not (tmp_path / "out.parquet").exists()
    code, out, _ = _run(capsys, "data", "convert", bad, tmp_path / "out.parquet", "--skip-bad")
    assert code == 0 and json.loads(out)["skipped"] == 1 and json.loads(out)["rows"] == 1


def test_stray_arguments_are_rejected(capsys):
    code, _, err = _run(capsys, "data", "stats", "x", "--bogus")
    assert code == 2 and "--bogus" in err


@pytest.mark.skipif(not GSM8K.is_dir(), reason=f"GSM8K folder absent: {GSM8K}")
def test_gsm8k_test_set_to_processbench(tmp_path, capsys):
    code, out, err = _run(capsys, "data", "perturb", GSM8K / "test.jsonl", tmp_path / "gsm_pb.jsonl")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["rows"] == 1319 and summary["erroneous"] >= 600
    rows = [json.loads(line) for line in (tmp_path / "gsm_pb.jsonl").read_text().splitlines()]
    assert all(-1 <= r["label"] < len(r["steps"]) for r in rows)


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    """`dense-irl demo --offline` with tiny sizes: trains, trains the as-long baseline, evaluates, writes reports."""
    code, out, err = _run(capsys, "demo", "--offline", "--out", tmp_path / "demo", *TINY_RUN, "--reward.minutes=0.02")
    assert code == 0, err
    result = json.loads((tmp_path / "demo" / "eval.json").read_text())
    names = [row["scorer"] for row in result["table"]]
    assert names == ["reward_model", "sft_logprob_as_long", "sft_logprob_warm_start", "chance"]
    assert (tmp_path / "demo" / "sft_as_long" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "plots" / "chain_0.png").is_file()
    assert "reward_model" in out
    # The preset's step budgets were overridden by the tiny ones; the summary says how many steps ran.
    steps = result["budget"]["steps"]
    assert steps["sft_steps"] == 3 and 1 <= steps["reward_steps"] <= 3


def test_output_is_quiet_unless_verbose(monkeypatch):
    from dense_irl import logs

    for var in (logs.VERBOSE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logs.quiet(False)
        # what peft triggers on every LoRA model under transformers 5.2x: silenced; other warnings are not
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=2)
        warnings.warn("something else", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something else"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert logs.ray_init_kwargs()["log_to_driver"] is False  # worker output (and Ray's dedup notices) stay off
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    logs.quiet(True)
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and logs.ray_init_kwargs()["log_to_driver"] is True


def test_verbose_is_taken_anywhere_and_internal_errors_keep_their_traceback(monkeypatch, capsys, tmp_path):
    from dense_irl import cli, logs

    seen = []
    monkeypatch.setattr(logs, "quiet", seen.append)
    # as the Jobs entry points call it: the command first, then --verbose
    assert cli.main(["data", "synth", str(tmp_path / "d.jsonl"), "--n", "3", "--verbose"]) == 0
    assert seen == [True]

    def broken(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "_data", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["data", "synth", str(tmp_path / "e.jsonl")])
