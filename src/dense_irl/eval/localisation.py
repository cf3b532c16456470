"""Error localisation in the ProcessBench format (arXiv 2412.06559).

A row is one reasoning chain ``{problem, steps, label, error_type?}`` where ``label`` is the 0-based
index of the earliest wrong step, or -1 when every step is correct. A scorer gives one score per
step (higher = better); the predicted first error is the first step scoring below a threshold.

ProcessBench's metrics: accuracy on erroneous chains (prediction == label), accuracy on correct
chains (prediction == -1), and F1 = their harmonic mean. We report them as fractions in [0, 1]
(the paper prints x100).

Truncation (:data:`TRUNCATION_RULE`): a chain longer than the scorer's ``max_length`` is scored on the
leading steps that fit (the chain layout drops whole steps from the end, ``data.layout``), so its score
list is shorter than its steps. That is never fatal: the first error is predicted on the scored steps
(-1 when none is below the threshold, so an error in a cut-off step counts as missed), and every report
counts such chains (``n_truncated``). Where a scorer knows its tokenizer (:func:`with_layout`), the
lengths are checked before any compute and a one-line note says how many chains will be cut.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dense_irl.data.layout import ChainLayout
from dense_irl.data.readers import jsonl_rows
from dense_irl.errors import ConfigError, DataError, MissingFileError

# Given chains (prompt, steps), one score per step; higher = better step.
ScoreFn = Callable[[list[tuple[str, list[str]]]], list[list[float]]]

FIRST_ERROR_RULE = "predicted first error = first step whose score < threshold; -1 (no error) if none"
TRUNCATION_RULE = (
    "a chain longer than max_length is scored on the leading steps that fit; its first error is predicted on "
    "those steps (-1 if none is below the threshold, so an error in a cut-off step counts as missed)"
)
MAX_CANDIDATES = 512


# ------------------------------------------------------------------------------------------- truncation
def with_layout(score_fn: ScoreFn, tokenizer, max_length: int, separator: str = "\n") -> ScoreFn:
    """Tag ``score_fn`` with the tokenizer and layout it scores with, so that evaluations can count the
    chains it will truncate before running it (:func:`count_truncated`). Returns ``score_fn``."""
    score_fn.tokenizer = tokenizer
    score_fn.layout = ChainLayout(separator, max_length)
    return score_fn


def count_truncated(score_fn: ScoreFn, chains: list[tuple[str, list[str]]]) -> int | None:
    """How many of ``chains`` ``score_fn`` will score on fewer steps than given (longer than its
    ``max_length``), by tokenising only; None when the scorer's tokenizer is unknown (no :func:`with_layout`)."""
    if getattr(score_fn, "layout", None) is None:
        return None
    if not chains:
        return 0
    from dense_irl.models.chains import truncated_chains

    return len(truncated_chains(score_fn.tokenizer, chains, score_fn.layout))


def note_truncated(name: str, counts: dict[str, tuple[int | None, int]], max_length: int | None = None) -> None:
    """One line on stderr when a scorer will truncate chains: ``counts`` maps a set's name to (truncated, n).
    Never fatal; nothing is printed when no chain is cut or the counts are unknown."""
    parts = [f"{k} of {n} {what}" for what, (k, n) in counts.items() if k]
    if parts:
        limit = f" {max_length} tokens" if max_length else ""
        print(f"note: {name}: {', '.join(parts)} chains are longer than max_length{limit}; they are scored on "
              "the steps that fit and counted as n_truncated", file=sys.stderr, flush=True)


def check_lengths(score_fn: ScoreFn, sets: dict[str, list[tuple[str, list[str]]]], name: str = "scorer"
                  ) -> dict[str, int | None]:
    """Count, before any compute, the chains of each named set that ``score_fn`` will truncate; print one
    note line when there are any. Returns the counts (None per set when the tokenizer is unknown)."""
    counts = {what: count_truncated(score_fn, chains) for what, chains in sets.items()}
    layout = getattr(score_fn, "layout", None)
    note_truncated(name, {w: (k, len(sets[w])) for w, k in counts.items()}, layout.max_length if layout else None)
    return counts


def first_error(step_scores: list[float], threshold: float) -> int:
    """Predicted first erroneous step: the index of the first step whose score is strictly below
    ``threshold``, or -1 when no step is (the chain is judged correct).

    This is the one rule used for every reward model and baseline, so their numbers compare.
    """
    for i, s in enumerate(step_scores):
        if s < threshold:
            return i
    return -1


def _check_labels(labels: list[int], what: str = "labels") -> None:
    for i, lab in enumerate(labels):
        if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)) or lab < -1:
            raise ValueError(f"{what}[{i}] = {lab!r}: a label must be an int >= -1")


def _acc(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _f1(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None  # F1 needs both erroneous and correct chains
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def processbench_metrics(preds: list[int], labels: list[int], error_types: list[str] | None = None) -> dict:
    """ProcessBench metrics of predicted first errors against labels (-1 = chain correct).

    ``error_acc``: accuracy (pred == label) on chains with label >= 0; ``correct_acc``: accuracy
    (pred == -1) on chains with label -1; ``f1``: their harmonic mean (0 when both are 0; None when
    one class is absent). Erroneous chains are also split into ``n_early`` (flagged before the
    true error), ``n_late`` (flagged after it) and ``n_missed`` (not flagged). ``per_error_type``
    gives error_acc and n for each error type over the erroneous chains (None types are skipped).
    """
    if len(preds) != len(labels):
        raise ValueError(f"preds has {len(preds)} entries but labels has {len(labels)}")
    if error_types is not None and len(error_types) != len(labels):
        raise ValueError(f"error_types has {len(error_types)} entries but labels has {len(labels)}")
    _check_labels(labels)
    _check_labels(preds, "preds")
    err = [(p, y) for p, y in zip(preds, labels) if y >= 0]
    cor = [p for p, y in zip(preds, labels) if y == -1]
    error_acc = _acc(sum(p == y for p, y in err), len(err))
    correct_acc = _acc(sum(p == -1 for p in cor), len(cor))
    per_type: dict[str, dict] = {}
    if error_types is not None:
        for p, y, t in zip(preds, labels, error_types):
            if y < 0 or t is None:
                continue
            d = per_type.setdefault(str(t), {"hits": 0, "n": 0})
            d["hits"] += int(p == y)
            d["n"] += 1
    return {
        "error_acc": error_acc,
        "correct_acc": correct_acc,
        "f1": _f1(error_acc, correct_acc),
        "n": len(labels),
        "n_error": len(err),
        "n_correct": len(cor),
        "n_early": sum(0 <= p < y for p, y in err),
        "n_late": sum(p > y for p, y in err),
        "n_missed": sum(p == -1 for p, _ in err),
        "per_error_type": {
            t: {"error_acc": d["hits"] / d["n"], "n": d["n"]} for t, d in sorted(per_type.items())
        },
    }


def calibrate_threshold(scores: list[list[float]], labels: list[int], n_steps: list[int] | None = None) -> float:
    """The threshold that maximises ProcessBench F1 of :func:`first_error` on these chains.

    A truncated chain (fewer scores than steps) whose label lies beyond its scored steps can never be
    predicted right (:data:`TRUNCATION_RULE`): it counts among the erroneous chains and never as a hit, as
    :func:`processbench_metrics` counts it. With ``n_steps`` (the steps each chain has), a label beyond the
    scores of a chain that was *not* truncated is a ValueError (a scorer that dropped steps).

    Candidates: one value below every score, the midpoints of the sorted unique step scores
    (evenly subsampled so that there are at most 512 candidates) and one value above every score.
    Among candidates of equal F1 those with the highest sum of the two accuracies are kept (so that a
    scorer that finds no error at all is left judging chains correct, not flagging every first step),
    and the middle one of them is returned, leaving a margin on both sides.

    Vectorised: chain c with label L >= 0 is right exactly when s[L] < t <= min(s[:L]), and a
    correct chain exactly when t <= min(s); counting such intervals over all candidates is a
    pair of searchsorted calls.
    """
    if len(scores) != len(labels):
        raise ValueError(f"scores has {len(scores)} chains but labels has {len(labels)}")
    if n_steps is not None and len(n_steps) != len(labels):
        raise ValueError(f"n_steps has {len(n_steps)} entries but labels has {len(labels)}")
    _check_labels(labels)
    lo, hi, mins = [], [], []
    for i, (s, y) in enumerate(zip(scores, labels)):
        if y >= len(s):
            if n_steps is not None and len(s) >= n_steps[i]:
                raise ValueError(f"chain {i}: label {y} but only {len(s)} step scores for {n_steps[i]} steps")
            lo.append(math.inf)  # the error step was cut off: no threshold finds it
            hi.append(-math.inf)
        elif y >= 0:
            lo.append(s[y])
            hi.append(min(s[:y]) if y > 0 else math.inf)
        else:
            mins.append(min(s) if len(s) else math.inf)
    if not lo or not mins:
        raise ValueError(
            f"calibration needs both erroneous and correct chains (got {len(lo)} erroneous, {len(mins)} correct)"
        )
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores if len(s)] or [np.zeros(0)])
    if np.isnan(flat).any():
        raise ValueError("step scores contain NaN")
    u = np.unique(flat[np.isfinite(flat)])
    if len(u) == 0:
        raise ValueError("no finite step scores to calibrate on")
    mid = (u[:-1] + u[1:]) / 2
    if len(mid) > MAX_CANDIDATES - 2:
        mid = mid[np.unique(np.linspace(0, len(mid) - 1, MAX_CANDIDATES - 2).round().astype(int))]
    cand = np.concatenate([[u[0] - 1.0], mid, [u[-1] + 1.0]])

    lo_a, hi_a = np.asarray(lo), np.asarray(hi)
    ok = lo_a < hi_a  # an empty interval can never be right
    lo_s, hi_s = np.sort(lo_a[ok]), np.sort(hi_a[ok])
    # #{lo < t <= hi} = #{lo < t} - #{hi < t}, since hi < t implies lo < t.
    err_hits = np.searchsorted(lo_s, cand, side="left") - np.searchsorted(hi_s, cand, side="left")
    mins_s = np.sort(np.asarray(mins))
    cor_hits = len(mins_s) - np.searchsorted(mins_s, cand, side="left")  # #{min >= t}
    a, b = err_hits / len(lo), cor_hits / len(mins)
    f1 = np.where(a + b > 0, 2 * a * b / np.maximum(a + b, 1e-300), 0.0)
    best = np.flatnonzero(f1 == f1.max())
    best = best[(a + b)[best] == (a + b)[best].max()]  # equal F1 (e.g. all 0): the more accurate on both classes
    return float(cand[best[len(best) // 2]])


def score_in_batches(
    score_fn: ScoreFn, chains: list[tuple[str, list[str]]], batch_size: int = 64, progress: str | None = None
) -> list[list[float]]:
    """Call ``score_fn`` on ``chains`` in batches and check its output: at most one number per step.

    Fewer scores than steps is a truncated chain (scored on its leading steps, :data:`TRUNCATION_RULE`),
    never an error; more scores than steps, or a NaN, is a ValueError. ``progress``: the label of a tqdm
    bar over the chains (None: no bar).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm import tqdm

    out: list[list[float]] = []
    with tqdm(total=len(chains), desc=progress, unit="chain", disable=progress is None, mininterval=2) as bar:
        for start in range(0, len(chains), batch_size):
            batch = chains[start : start + batch_size]
            got = score_fn(batch)
            if len(got) != len(batch):
                raise ValueError(f"score_fn returned {len(got)} score lists for a batch of {len(batch)} chains")
            for j, ((_, steps), s) in enumerate(zip(batch, got)):
                s = [float(x) for x in s]
                if len(s) > len(steps):
                    raise ValueError(
                        f"score_fn gave {len(s)} scores for chain {start + j} with {len(steps)} steps"
                    )
                if any(math.isnan(x) for x in s):
                    raise ValueError(f"score_fn gave NaN for chain {start + j}")
                out.append(s)
            bar.update(len(batch))
    return out


def n_truncated(chains: list[tuple[str, list[str]]], scores: list[list[float]]) -> int:
    """How many chains were scored on fewer steps than they have."""
    return sum(len(s) < len(steps) for (_, steps), s in zip(chains, scores))


def _chain_key(row: dict) -> tuple:
    return (row["problem"], tuple(row["steps"]))


def _check_rows(rows: list[dict], what: str) -> None:
    for i, r in enumerate(rows):
        for k in ("problem", "steps", "label"):
            if k not in r:
                raise ValueError(f"{what}[{i}]: missing field '{k}'")
        if not -1 <= r["label"] < len(r["steps"]):
            raise ValueError(f"{what}[{i}]: label {r['label']} out of range for {len(r['steps'])} steps")


def evaluate_localisation(
    score_fn: ScoreFn,
    rows: list[dict],
    threshold: float | None = None,
    calibration_rows: list[dict] | None = None,
    batch_size: int = 64,
    keep_scores: bool = True,
    name: str = "scorer",
    check: bool = True,
    progress: str | None = None,
) -> dict:
    """Score ProcessBench rows, predict first errors with :func:`first_error`, report the metrics.

    Threshold: ``threshold`` if given; else calibrated on ``calibration_rows`` (which must not
    share chains with ``rows``) to maximise F1; else 0.0. The report holds the metrics of
    :func:`processbench_metrics`, ``threshold``, ``threshold_rule`` (the rule in words) and ``n``;
    with ``keep_scores`` also ``step_scores``, ``preds`` and ``labels`` so callers can plot.

    Truncated chains (:data:`TRUNCATION_RULE`) are scored on the steps that fit and counted:
    ``n_truncated`` (evaluated rows), ``n_truncated_calibration`` (None without calibration) and
    ``n_error_cut`` (erroneous rows whose first error lies in a cut-off step: they cannot be found).
    With ``check`` and a scorer that knows its tokenizer (:func:`with_layout`), the lengths are
    checked before any compute and a one-line note names the counts (``name``: the scorer's name in it).
    ``progress``: a tqdm label for the scoring bars.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    _check_rows(rows, "rows")
    calibrate = threshold is None and bool(calibration_rows)
    if check:
        sets = {"evaluated": [(r["problem"], list(r["steps"])) for r in rows]}
        if calibrate:
            sets["calibration"] = [(r["problem"], list(r["steps"])) for r in calibration_rows]
        check_lengths(score_fn, sets, name)
    n_trunc_cal = None
    if threshold is not None:
        rule = f"fixed threshold {threshold:g} given by the caller"
    elif calibration_rows:
        _check_rows(calibration_rows, "calibration_rows")
        shared = {_chain_key(r) for r in rows} & {_chain_key(r) for r in calibration_rows}
        if shared:
            raise ConfigError(
                f"calibration_rows share {len(shared)} chains with the evaluated rows; calibrate on held-out chains"
            )
        cal_chains = [(r["problem"], list(r["steps"])) for r in calibration_rows]
        cal_scores = score_in_batches(score_fn, cal_chains, batch_size,
                                      progress and f"{progress} (calibration)")
        n_trunc_cal = n_truncated(cal_chains, cal_scores)
        threshold = calibrate_threshold(cal_scores, [r["label"] for r in calibration_rows],
                                        [len(r["steps"]) for r in calibration_rows])
        rule = f"threshold {threshold:g} calibrated on {len(calibration_rows)} held-out calibration chains to maximise F1"
    else:
        threshold = 0.0
        rule = "default threshold 0 (no threshold given and no calibration chains)"
    chains = [(r["problem"], list(r["steps"])) for r in rows]
    scores = score_in_batches(score_fn, chains, batch_size, progress)
    preds = [first_error(s, threshold) for s in scores]
    labels = [r["label"] for r in rows]
    types = [r.get("error_type") for r in rows]
    metrics = processbench_metrics(preds, labels, types if any(t is not None for t in types) else None)
    report = {
        **metrics,
        "threshold": float(threshold),
        "threshold_rule": f"{rule}; {FIRST_ERROR_RULE}",
        "n_truncated": n_truncated(chains, scores),
        "n_truncated_calibration": n_trunc_cal,
        "n_error_cut": sum(y >= len(s) for s, y in zip(scores, labels)),
        "truncation_rule": TRUNCATION_RULE,
    }
    if keep_scores:
        report.update(step_scores=scores, preds=preds, labels=labels)
    return report


def load_processbench_rows(path: str | Path) -> list[dict]:
    """Read a ProcessBench JSONL file: each line ``{problem: str, steps: [str], label: int}`` with
    -1 <= label < len(steps), and optionally ``error_type`` (str or null). Other keys are kept.

    A bad row raises :class:`DataError` naming the file, the 1-based line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ProcessBench file not found: {path}")
    rows = []
    for ln, row in jsonl_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row.get("problem"), str):
            raise DataError(path, ln, "problem", "missing or not a string")
        steps = row.get("steps")
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(path, ln, "steps", "missing or not a list of strings")
        lab = row.get("label")
        if isinstance(lab, bool) or not isinstance(lab, int):
            raise DataError(path, ln, "label", f"missing or not an int: {lab!r}")
        if not -1 <= lab < len(steps):
            raise DataError(
                path, ln, "label", f"{lab} out of range for {len(steps)} steps (-1 = no error)"
            )
        if row.get("error_type") is not None and not isinstance(row["error_type"], str):
            raise DataError(path, ln, "error_type", "not a string")
        rows.append(row)
    if not rows:
        raise DataError(path, None, None, "no rows in file")
    return rows
