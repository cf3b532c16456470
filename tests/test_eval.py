"""Offline evaluation: ProcessBench localisation metrics, Best-of-N reranking, reports and plots."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from dense_irl.data.answers import normalise_answer
from dense_irl.errors import DataError
from dense_irl.eval.bon import evaluate_bon, load_bon, majority_pick
from dense_irl.eval.localisation import (
    calibrate_threshold,
    evaluate_localisation,
    first_error,
    load_processbench_rows,
    processbench_metrics,
)
from dense_irl.eval.report import (
    bon_markdown,
    localisation_markdown,
    markdown_table,
    plot_step_rewards,
    write_report,
)

GSM8K = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def marker_scorer(chains):
    """A real, simple scorer: a step containing WRONG scores -1, any other step +1."""
    return [[-1.0 if "WRONG" in s else 1.0 for s in steps] for _, steps in chains]


def numeric_scorer(chains):
    """Each step's text is its score, so the expected picks can be worked out by hand."""
    return [[float(s) for s in steps] for _, steps in chains]


# ---------------------------------------------------------------- localisation


def test_first_error_edge_cases():
    assert first_error([], 0.0) == -1
    assert first_error([1.0, 2.0], 0.0) == -1
    assert first_error([0.0, 0.0], 0.0) == -1  # equal to the threshold is not below it
    assert first_error([-0.1, -5.0], 0.0) == 0
    assert first_error([3.0, 0.0, -2.0], 0.5) == 1  # the first below, not the lowest
    assert first_error([-3.0, -2.0], -2.5) == 0
    assert first_error([-2.0, -3.0], -2.5) == 1


def test_processbench_metrics_hand_computed():
    # Chains 0,1 erroneous (labels 1, 3): one hit (0), one early flag (pred 2 < 3).
    # Chains 2,3 correct: one right (-1), one false alarm (pred 0).
    m = processbench_metrics([1, 2, -1, 0], [1, 3, -1, -1], ["calc", "logic", None, None])
    assert m["error_acc"] == 0.5
    assert m["correct_acc"] == 0.5
    assert m["f1"] == pytest.approx(0.5)
    assert (m["n"], m["n_error"], m["n_correct"]) == (4, 2, 2)
    assert (m["n_early"], m["n_late"], m["n_missed"]) == (1, 0, 0)
    assert m["per_error_type"] == {"calc": {"error_acc": 1.0, "n": 1}, "logic": {"error_acc": 0.0, "n": 1}}

    m = processbench_metrics([1, -1, 4, -1, -1], [1, 2, 2, -1, -1])
    assert m["error_acc"] == pytest.approx(1 / 3)
    assert m["correct_acc"] == 1.0
    assert m["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert (m["n_early"], m["n_late"], m["n_missed"]) == (0, 1, 1)
    assert m["per_error_type"] == {}


def test_processbench_metrics_degenerate_and_bad_args():
    m = processbench_metrics([-1, 0], [1, -1])
    assert (m["error_acc"], m["correct_acc"], m["f1"]) == (0.0, 0.0, 0.0)
    m = processbench_metrics([-1], [-1])  # no erroneous chains: F1 undefined
    assert m["error_acc"] is None and m["f1"] is None and m["correct_acc"] == 1.0
    with pytest.raises(ValueError, match="preds has 1 entries but labels has 2"):
        processbench_metrics([0], [0, 1])
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        processbench_metrics([0], [-2])


def test_calibrate_threshold_finds_a_perfect_separator():
    rng = random.Random(0)
    scores, labels = [], []
    for i in range(200):
        n = rng.randint(1, 7)
        lab = -1 if i % 2 else rng.randrange(n)
        good = [rng.uniform(0.3, 2.0) for _ in range(n)]
        if lab >= 0:  # wrong step clearly low; later steps anything
            good[lab] = rng.uniform(-2.0, -0.3)
            good[lab + 1 :] = [rng.uniform(-2.0, 2.0) for _ in good[lab + 1 :]]
        scores.append(good)
        labels.append(lab)
    t = calibrate_threshold(scores, labels)
    assert -0.3 < t < 0.3
    m = processbench_metrics([first_error(s, t) for s in scores], labels)
    assert m["f1"] == 1.0


def test_calibrate_threshold_matches_brute_force_and_is_fast():
    rng = random.Random(1)
    scores = [[float(rng.randint(0, 5)) for _ in range(rng.randint(1, 6))] for _ in range(300)]
    labels = [rng.choice([-1, rng.randrange(len(s))]) for s in scores]
    t = calibrate_threshold(scores, labels)

    def f1(th):
        return processbench_metrics([first_error(s, th) for s in scores], labels)["f1"]

    # F1 only changes between score values, so these thresholds cover every possible outcome.
    grid = [v + d for v in range(-1, 7) for d in (0.0, 0.5)]
    assert f1(t) == pytest.approx(max(f1(g) for g in grid))

    big = [[rng.gauss(0, 1) for _ in range(6)] for _ in range(2000)]
    big_labels = [rng.randrange(-1, 6) for _ in big]
    start = time.perf_counter()
    calibrate_threshold(big, big_labels)
    assert time.perf_counter() - start < 1.0


def test_calibrate_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both erroneous and correct"):
        calibrate_threshold([[1.0], [2.0]], [-1, -1])
    with pytest.raises(ValueError, match="label 3 but only 2 step scores"):
        calibrate_threshold([[1.0, 2.0], [1.0]], [3, -1])


def _pb_rows():
    return [
        {"problem": "p0", "steps": ["a", "b WRONG", "c"], "label": 1, "error_type": "calc"},
        {"problem": "p1", "steps": ["a", "b", "c"], "label": -1},
        # The marker sits after the real error: predicted 2, label 0 -> a miss (late).
        {"problem": "p2", "steps": ["a", "b", "c WRONG"], "label": 0, "error_type": "logic"},
        {"problem": "p3", "steps": ["a WRONG", "b"], "label": -1},  # false alarm
        {"problem": "p4", "steps": ["a"], "label": -1},
    ]


def test_evaluate_localisation_with_marker_scorer(tmp_path):
    path = write_jsonl(tmp_path / "pb.jsonl", _pb_rows())
    rows = load_processbench_rows(path)
    rep = evaluate_localisation(marker_scorer, rows, batch_size=2)
    assert rep["threshold"] == 0.0 and "default threshold 0" in rep["threshold_rule"]
    assert "first step whose score < threshold" in rep["threshold_rule"]
    assert rep["preds"] == [1, -1, 2, 0, -1]
    assert rep["error_acc"] == 0.5 and rep["correct_acc"] == pytest.approx(2 / 3)
    assert rep["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert rep["n"] == 5 and rep["n_late"] == 1
    assert rep["per_error_type"] == {"calc": {"error_acc": 1.0, "n": 1}, "logic": {"error_acc": 0.0, "n": 1}}
    assert rep["step_scores"][0] == [1.0, -1.0, 1.0]

    # A threshold above every score flags step 0 everywhere.
    rep = evaluate_localisation(marker_scorer, rows, threshold=5.0, keep_scores=False)
    assert "step_scores" not in rep and rep["threshold"] == 5.0 and rep["correct_acc"] == 0.0

    cal = [
        {"problem": "q0", "steps": ["x WRONG"], "label": 0},
        {"problem": "q1", "steps": ["x", "y"], "label": -1},
    ]
    rep = evaluate_localisation(marker_scorer, rows, calibration_rows=cal)
    assert "calibrated on 2 held-out calibration chains to maximise F1" in rep["threshold_rule"]
    assert -1.0 < rep["threshold"] <= 1.0
    with pytest.raises(ValueError, match="share 1 chains"):
        evaluate_localisation(marker_scorer, rows, calibration_rows=cal + [rows[0]])


def test_evaluate_localisation_rejects_bad_scorer_output():
    def short(chains):
        return [s[:-1] for s in marker_scorer(chains)]

    with pytest.raises(ValueError, match="gave 2 scores for chain 0 with 3 steps"):
        evaluate_localisation(short, _pb_rows())
    with pytest.raises(ValueError, match="NaN"):
        evaluate_localisation(lambda c: [[float("nan")] * len(s) for _, s in c], _pb_rows())


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"steps": ["a"], "label": -1}', "problem"),
        ('{"problem": "p", "steps": "a", "label": -1}', "steps"),
        ('{"problem": "p", "steps": ["a"], "label": 1}', "label"),
        ('{"problem": "p", "steps": ["a"], "label": true}', "label"),
        ('{"problem": "p", "steps": ["a"], "label": 0, "error_type": 3}', "error_type"),
        ("{not json", None),
    ],
)
def test_load_processbench_rows_bad_rows(tmp_path, line, field):
    path = write_jsonl(tmp_path / "pb.jsonl", [_pb_rows()[0], line])
    with pytest.raises(DataError, match=r"pb\.jsonl, line 2") as e:
        load_processbench_rows(path)
    assert e.value.line == 2 and e.value.field == field
    with pytest.raises(FileNotFoundError):
        load_processbench_rows(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- Best-of-N


def _bon_rows():
    def c(scores, ok, answer):
        return {"steps": [str(s) for s in scores], "is_correct": ok, "answer": answer}

    return [
        {
            "problem": "A",
            "candidates": [c([1, 1], True, "1,000"), c([5, -3], False, "$1000"), c([-1, 4], False, "7")],
        },
        {"problem": "B", "candidates": [c([3, 3, 3], True, "5.0"), c([4, 4], False, "6")]},
        {"problem": "C", "candidates": [c([2], True, "3"), c([2], False, "4"), c([2], False, " 4 ")]},
    ]


def test_evaluate_bon_exact_accuracies(tmp_path):
    problems = load_bon(write_jsonl(tmp_path / "bon.jsonl", _bon_rows()))
    rep = evaluate_bon(numeric_scorer, problems, batch_size=3)
    acc = rep["accuracy"]
    # By hand. A: min->c0 (ok), last/sum/mean->c2. B: sum->c0 (ok), others c1. C: all tied, 1/3 correct.
    assert acc["min"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert acc["last"] == pytest.approx((0 + 0 + 1 / 3) / 3)
    assert acc["sum"] == pytest.approx((0 + 1 + 1 / 3) / 3)
    assert acc["mean"] == pytest.approx((0 + 0 + 1 / 3) / 3)
    assert acc["random"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    # A: "1,000" and "$1000" agree -> c0. B: 1-1 tie -> first ("5.0" == "5") -> c0. C: "4" wins -> wrong.
    assert acc["majority"] == pytest.approx(2 / 3)
    assert acc["oracle"] == 1.0
    assert (rep["n"], rep["N"], rep["N_min"], rep["N_max"]) == (3, pytest.approx(8 / 3), 2, 3)
    lo, hi = rep["ci95"]["min"]
    assert 0.0 <= lo <= acc["min"] <= hi <= 1.0
    assert rep == evaluate_bon(numeric_scorer, problems)  # seeded: reproducible
    with pytest.raises(ValueError, match="unknown aggregation"):
        evaluate_bon(numeric_scorer, problems, aggregations=("max",))


def test_answer_normalisation_and_majority():
    assert normalise_answer(" $1,234.00 ") == "1234"
    assert normalise_answer("3.5") == "3.5"
    assert majority_pick([{"answer": None}, {"answer": "2"}, {"answer": "3"}, {"answer": "3"}]) == 2
    assert majority_pick([{"answer": None}, {"answer": None}]) == 0


def test_load_bon_generic_reads_answer_from_last_step(tmp_path):
    row = {
        "problem": "p",
        "candidates": [{"steps": ["x", "A: 12"], "is_correct": True}, {"steps": ["y"], "is_correct": False}],
    }
    (p,) = load_bon(write_jsonl(tmp_path / "g.jsonl", [row]))
    assert [c["answer"] for c in p["candidates"]] == ["12", None]


@pytest.mark.parametrize(
    "row, field",
    [
        ({"problem": "p", "candidates": []}, "candidates"),
        ({"problem": "p", "candidates": [{"steps": [], "is_correct": True}]}, "candidates[0].steps"),
        ({"problem": "p", "candidates": [{"steps": ["a"], "is_correct": "yes"}]}, "candidates[0].is_correct"),
        ({"candidates": [{"steps": ["a"], "is_correct": True}]}, "problem"),
        (
            {"question": "q", "ground_truth": "A: 1", "6b_finetuning": {"solution": "A: 1"}},
            "6b_finetuning.is_correct",
        ),
        ({"question": "q", "m": {"is_correct": True, "solution": 3}}, "m.solution"),
        ({"prompt": "q"}, "candidates"),
    ],
)
def test_load_bon_bad_rows(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [_bon_rows()[0], row])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2") as e:
        load_bon(path)
    assert e.value.field == field


@pytest.mark.skipif(
    not (GSM8K / "example_model_solutions.jsonl").is_file(), reason=f"GSM8K data absent at {GSM8K}"
)
def test_load_bon_real_gsm8k():
    path = GSM8K / "example_model_solutions.jsonl"
    problems = load_bon(path)
    assert len(problems) == 1319
    assert all(len(p["candidates"]) == 4 for p in problems)
    first = problems[0]
    assert first["problem"].startswith("Janet")
    assert first["reference_answer"] == "18"
    best = first["candidates"][3]  # 175b_verification, the correct one
    assert best["model"] == "175b_verification" and best["is_correct"]
    assert best["steps"][-1] == "A: 18" and best["answer"] == "18" and len(best["steps"]) == 4
    # Truncated solutions (no final A: line) load with answer None.
    assert any(c["answer"] is None for p in problems for c in p["candidates"])

    raw = [json.loads(line) for line in path.read_text().splitlines()]
    frac = [sum(v["is_correct"] for v in r.values() if isinstance(v, dict)) / 4 for r in raw]
    rep = evaluate_bon(
        lambda chains: [[float(len(s)) for s in st] for _, st in chains], problems, batch_size=512
    )
    assert rep["accuracy"]["random"] == pytest.approx(sum(frac) / len(frac))
    assert rep["accuracy"]["oracle"] == pytest.approx(sum(f > 0 for f in frac) / len(frac))
    assert rep["n"] == 1319 and rep["N"] == 4.0


# ---------------------------------------------------------------- reports


def test_markdown_table_and_summaries(tmp_path):
    t = markdown_table([{"a": 1, "b": 0.12345}, {"a": "x|y", "c": None}])
    assert t.splitlines()[0] == "| a | b | c |"
    assert "| 1 | 0.123 | - |" in t and "x\\|y" in t
    assert markdown_table([{"a": 1, "b": 2}], ["b"]).splitlines()[2] == "| 2 |"

    rep = evaluate_localisation(marker_scorer, _pb_rows())
    md = localisation_markdown(rep)
    assert "0.500" in md and "0.667" in md and "0.571" in md and "default threshold 0" in md
    assert "| logic | 0.000 | 1 |" in md

    brep = evaluate_bon(numeric_scorer, load_bon(write_jsonl(tmp_path / "b.jsonl", _bon_rows())))
    bmd = bon_markdown(brep)
    assert "| min | reward model | 0.444 |" in bmd and "| majority | baseline | 0.667 |" in bmd
    assert "3 problems" in bmd

    out = tmp_path / "out" / "loc.json"
    write_report({**rep, "nan": float("nan")}, out, md)
    back = json.loads(out.read_text())
    assert back["f1"] == pytest.approx(rep["f1"]) and back["nan"] is None
    assert out.with_suffix(".md").read_text() == md
    with pytest.raises(ValueError, match="ends in .md"):
        write_report(rep, tmp_path / "x.md", md)


def test_plot_step_rewards_writes_png(tmp_path):
    path = tmp_path / "plots" / "chain.png"
    plot_step_rewards(
        ["a", "b", "c WRONG"], [0.5, -0.2, 1.0], path, title="t", threshold=0.0, first_error_label=1
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in path.parent.iterdir()) == ["chain.png"]  # no temp file left
    plot_step_rewards([f"s{i}" for i in range(30)], [float(i) for i in range(30)], tmp_path / "long.png")
    assert (tmp_path / "long.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="3 steps but 2 rewards"):
        plot_step_rewards(["a", "b", "c"], [1.0, 2.0], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="first_error_label 5"):
        plot_step_rewards(["a"], [1.0], tmp_path / "bad.png", first_error_label=5)
