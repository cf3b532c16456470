"""Offline evaluation: ProcessBench localisation metrics, Best-of-N reranking, reports and plots."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from dense_irl.data.answers import normalise_answer
from dense_irl.errors import DataError
from dense_irl.eval.bon import evaluate_bon, load_bon, majority_hit
from dense_irl.eval.localisation import (
    calibrate_threshold,
    count_truncated,
    evaluate_localisation,
    first_error,
    load_processbench_rows,
    processbench_metrics,
    with_layout,
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
    # Told the chain has only 2 steps, a label 3 beyond its 2 scores is a scorer bug, not truncation.
    with pytest.raises(ValueError, match="label 3 but only 2 step scores for 2 steps"):
        calibrate_threshold([[1.0, 2.0], [1.0]], [3, -1], n_steps=[2, 1])


def test_calibrate_threshold_breaks_f1_ties_by_accuracy():
    # A rule that sees none of these errors (every step 0): F1 is 0 at every threshold. Flagging every first
    # step would be right on the label-0 chain only (accuracies 0.5 + 0); judging all correct gets 0 + 1.
    scores, labels = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [1, 0, -1]
    t = calibrate_threshold(scores, labels)
    assert [first_error(s, t) for s in scores] == [-1, -1, -1]


def test_calibrate_threshold_counts_a_cut_off_error_as_unreachable():
    # Chain 0 is truncated (2 of 5 steps scored) and its error (step 3) was cut off: no threshold can be
    # right on it, so the best F1 is that of the other chains with chain 0 a miss, and nothing raises.
    scores, labels = [[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], [3, 1, -1]
    t = calibrate_threshold(scores, labels, n_steps=[5, 2, 2])
    assert t == calibrate_threshold(scores, labels)  # without n_steps: the same rule
    m = processbench_metrics([first_error(s, t) for s in scores], labels)
    assert -1.0 < t <= 1.0 and m["error_acc"] == 0.5 and m["correct_acc"] == 1.0
    # A correct chain of which no step fit counts as judged correct.
    assert calibrate_threshold([[], [0.5, -2.0]], [-1, 1], n_steps=[3, 2]) > -2.0


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
    def long(chains):
        return [s + [1.0] for s in marker_scorer(chains)]

    with pytest.raises(ValueError, match="gave 4 scores for chain 0 with 3 steps"):
        evaluate_localisation(long, _pb_rows())
    with pytest.raises(ValueError, match="NaN"):
        evaluate_localisation(lambda c: [[float("nan")] * len(s) for _, s in c], _pb_rows())


def _keep(n):
    """A scorer that behaves like a model with a short max_length: the marker scores of the first n steps."""
    return lambda chains: [s[:n] for s in marker_scorer(chains)]


def test_truncated_chain_is_scored_on_the_steps_that_fit_and_counted():
    rows = _pb_rows() + [
        # The error (step 3) lies past the 2 steps that fit: it cannot be found, the chain is predicted -1.
        {"problem": "p5", "steps": ["a", "b", "c", "d WRONG"], "label": 3, "error_type": "calc"},
        # The error lies inside the kept steps: found as usual although the chain is truncated.
        {"problem": "p6", "steps": ["a WRONG", "b", "c", "d"], "label": 0, "error_type": "calc"},
    ]
    rep = evaluate_localisation(_keep(2), rows, batch_size=3)  # the case: 7 scores for 9 steps
    assert [len(s) for s in rep["step_scores"]] == [2, 2, 2, 2, 1, 2, 2]
    assert rep["preds"] == [1, -1, -1, 0, -1, -1, 0]
    assert rep["n_truncated"] == 5 and rep["n_error_cut"] == 1  # p0, p1, p2, p5, p6 cut; p5's error with them
    assert rep["n_truncated_calibration"] is None
    assert "scored on the leading steps that fit" in rep["truncation_rule"]
    m = processbench_metrics(rep["preds"], rep["labels"])
    assert rep["f1"] == m["f1"] and rep["n_missed"] == 2  # p2 (its marker was cut) and p5

    cal = [
        {"problem": "q0", "steps": ["x", "y", "z WRONG"], "label": 2},  # error cut off in calibration too
        {"problem": "q1", "steps": ["x WRONG", "y"], "label": 0},
        {"problem": "q2", "steps": ["x", "y", "z"], "label": -1},
    ]
    rep = evaluate_localisation(_keep(2), rows, calibration_rows=cal)
    assert rep["n_truncated_calibration"] == 2 and rep["n_truncated"] == 5
    assert -1.0 < rep["threshold"] <= 1.0
    md = localisation_markdown(rep)
    assert "| threshold | n_truncated |" in md
    assert "5 evaluated and 2 calibration chains were longer than max_length (1 with their first error" in md


def _layout_scorer(tok, max_length, calls):
    """A real scorer with a real tokenizer: +1 for every step that fits in max_length (the chain layout)."""
    from dense_irl.data.layout import encode_chains

    def score(chains):
        calls.append(len(chains))
        enc = encode_chains(tok, chains, max_length)
        return [[1.0] * n for n in enc.n_steps]

    return with_layout(score, tok, max_length)


@pytest.fixture(scope="module")
def small_tok():
    from dense_irl.models.factory import train_tokenizer

    return train_tokenizer(["a b c d e f g h 12 + 3 = 15", "the answer is 7", "x y z"] * 10, 300)


def test_lengths_are_checked_before_any_compute(small_tok, capsys):
    calls: list[int] = []
    rows = [
        {"problem": "p", "steps": ["a b c", "d e f g h " * 6, "the answer is 7"], "label": 1},
        {"problem": "q", "steps": ["x y z", "the answer is 7"], "label": -1},
        {"problem": "r", "steps": ["x y z"] * 12, "label": 11},
    ]
    fn = _layout_scorer(small_tok, 40, calls)
    assert count_truncated(fn, [(r["problem"], r["steps"]) for r in rows]) == 2
    assert count_truncated(marker_scorer, [("p", ["a"])]) is None  # tokenizer unknown: not counted up front

    seen: list[str] = []

    def watched(chains):
        seen.append(capsys.readouterr().err)  # what was printed before the first forward pass
        return fn(chains)

    with_layout(watched, small_tok, 40)
    rep = evaluate_localisation(watched, rows, name="tiny-rm")
    assert "note: tiny-rm: 2 of 3 evaluated chains are longer than max_length 40 tokens" in seen[0]
    assert rep["n_truncated"] == 2 and calls  # the up-front count is what scoring found
    assert rep["preds"] == [-1, -1, -1]
    capsys.readouterr()
    evaluate_localisation(fn, rows[1:2])  # nothing cut: nothing printed
    assert capsys.readouterr().err == ""


def test_compare_counts_every_scorers_truncation_before_any_runs(small_tok, capsys):
    from dense_irl.eval import compare

    rows = [
        {"problem": "p", "steps": ["a b c"] * 10, "label": 9},
        {"problem": "q", "steps": ["x y z", "the answer is 7"], "label": -1},
    ]
    cal = [{"problem": "c", "steps": ["a b c"] * 10, "label": 2},
           {"problem": "d", "steps": ["x"], "label": -1}]
    order: list[str] = []

    def tracked(name, max_length):
        inner = _layout_scorer(small_tok, max_length, [])

        def score(chains):
            order.append(f"{name} scores; notes so far: {capsys.readouterr().err.count('note:')}")
            return inner(chains)

        return with_layout(score, small_tok, max_length)

    reps = compare.compare_localisation({"a": tracked("a", 30), "b": tracked("b", 20)}, rows, cal)
    assert order[0] == "a scores; notes so far: 2"  # both scorers' notes came before a's first call
    assert reps["a"]["n_truncated"] == 1 and reps["b"]["n_truncated_calibration"] == 1
    table = compare.localisation_rows(reps)
    assert table[0]["n_truncated"] == 1 and table[1]["n_truncated_calibration"] == 1


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
    # A: "1,000" and "$1000" agree: the answer's mean correctness 1/2. B: a 1-1 tie: 1/2. C: "4" wins: wrong.
    assert acc["majority"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert acc["oracle"] == 1.0
    assert (rep["n"], rep["N"], rep["N_min"], rep["N_max"]) == (3, pytest.approx(8 / 3), 2, 3)
    lo, hi = rep["ci95"]["min"]
    assert 0.0 <= lo <= acc["min"] <= hi <= 1.0
    assert rep == evaluate_bon(numeric_scorer, problems)  # seeded: reproducible
    assert "scores" not in rep
    assert evaluate_bon(numeric_scorer, problems, keep_scores=True)["scores"][1] == [[3.0, 3.0, 3.0], [4.0, 4.0]]
    # Weighted vote at threshold 0, weights sigmoid(min step). A: "1000" (c0 + c1: 0.73 + 0.05) beats "7" (0.27),
    # half its voters correct. B: "6" (0.98) beats "5.0" (0.95). C: "4" (2 x 0.88) beats "3".
    # Majority vote, its ties broken by the best candidate's min step. A: "1000" has 2 votes: 1/2. B: the 1-1 tie
    # goes to "6" (min 4 against 3): wrong, where majority vote counts 1/2. C: "4" has 2 votes: wrong.
    assert acc["vote_then_reward"] == pytest.approx(0.5 / 3)
    voted = evaluate_bon(numeric_scorer, problems, threshold=0.0)["accuracy"]
    assert voted["weighted_vote"] == pytest.approx(0.5 / 3) and "weighted_vote" not in acc
    with pytest.raises(ValueError, match="unknown aggregation"):
        evaluate_bon(numeric_scorer, problems, aggregations=("max",))


def test_bon_truncated_candidates_are_aggregated_over_the_steps_that_fit(tmp_path):
    problems = load_bon(write_jsonl(tmp_path / "bon.jsonl", _bon_rows()))

    def first_step_only(chains):  # a short max_length: only the first step fits (none for a 3-step chain)
        return [[] if len(s) == 3 else [float(s[0])] for _, s in chains]

    rep = evaluate_bon(first_step_only, problems)
    # A: scores 1, 5, -1 -> c1 (wrong) for every aggregation. B: c0 has no step scored, ranks last -> c1
    # (wrong). C: all tied at 2 -> 1/3.
    for agg in ("min", "last", "sum", "mean"):
        assert rep["accuracy"][agg] == pytest.approx((0 + 0 + 1 / 3) / 3)
    assert (rep["n_candidates"], rep["n_truncated"], rep["n_unscored"]) == (8, 5, 1)
    assert "aggregated over the steps that fit" in rep["truncation_rule"]
    assert "5 of 8 candidates were longer than max_length" in bon_markdown(rep)
    assert evaluate_bon(numeric_scorer, problems)["n_truncated"] == 0


def test_answer_normalisation_and_majority():
    assert normalise_answer(" $1,234.00 ") == "1234"
    assert normalise_answer("3.5") == "3.5"
    def c(answer, ok):
        return {"answer": answer, "is_correct": ok}

    assert majority_hit([c(None, True), c("2", True), c("3", False), c("3", False)]) == 0.0
    # a 2-2 tie does not depend on which answer comes first
    assert majority_hit([c("2", True), c("3", False), c("2", True), c("3", False)]) == 0.5
    assert majority_hit([c("3", False), c("2", True), c("3", False), c("2", True)]) == 0.5
    assert majority_hit([c(None, True), c(None, False)]) == 0.5


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
    assert best["steps"][-1] == "The answer is 18." and best["answer"] == "18" and len(best["steps"]) == 4
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
    assert "| min | reward model | 0.444 |" in bmd and "| majority | baseline | 0.333 |" in bmd
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


# ---------------------------------------------------------------- the CLI on chains longer than max_length


def test_cli_eval_on_chains_longer_than_max_length_is_not_fatal(tmp_path, capsys):
    """The issue's failure (`score_fn gave 7 scores for chain 310 with 9 steps`): `dense-irl eval` with a
    model whose max_length cuts chains now scores them on the steps that fit, counts them, says so up front."""
    from dataclasses import replace

    from dense_irl.cli import main
    from dense_irl.data.perturb import make_processbench, write_processbench
    from dense_irl.data.synthetic import SyntheticConfig, generate
    from dense_irl.models.factory import ModelConfig, build_tiny, save_policy
    from dense_irl.models.reward_model import RewardModel, RewardModelConfig

    syn = SyntheticConfig(n_problems=40, seed=5, min_steps=3, max_steps=4)
    demos = generate(syn)
    tiny = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=48)
    model, tok = build_tiny(tiny, [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    RewardModel(model, tok, RewardModelConfig(max_length=48)).save_pretrained(tmp_path / "rm")
    save_policy(model, tok, tmp_path / "policy")
    write_processbench(make_processbench(demos, seed=1), tmp_path / "pb.jsonl")
    write_processbench(make_processbench(generate(replace(syn, seed=6)), seed=2), tmp_path / "cal.jsonl")

    code = main(["eval", "localisation", "--reward-model", str(tmp_path / "rm"), "--data", str(tmp_path / "pb.jsonl"),
                 "--calibration", str(tmp_path / "cal.jsonl"), "--policy", str(tmp_path / "policy"),
                 "--out", str(tmp_path / "rep.json"), "--plots", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["reward_model"]["n_truncated"] > 0 and rep["policy_logprob"]["n_truncated_calibration"] > 0
    assert rep["chance"]["n_truncated"] == 0  # no tokenizer, nothing cut
    assert "note: reward_model:" in err and "longer than max_length 48 tokens" in err
    assert "n_truncated" in out and (tmp_path / "plots" / "chain_0.png").read_bytes()[:8] == PNG_MAGIC

    bon = [{"problem": d.prompt, "candidates": [{"steps": d.steps, "is_correct": True},
                                                 {"steps": d.steps[:1], "is_correct": False}]} for d in demos[:5]]
    write_jsonl(tmp_path / "bon.jsonl", bon)
    code = main(["eval", "bon", "--reward-model", str(tmp_path / "rm"), "--data", str(tmp_path / "bon.jsonl"),
                 "--out", str(tmp_path / "bon.json")])
    assert code == 0
    assert json.loads((tmp_path / "bon.json").read_text())["reward_model"]["n_truncated"] > 0
