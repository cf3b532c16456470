"""Best-of-N reranking: does the reward model pick the correct one among N candidate solutions?

Input is a list of problems ``{problem, candidates: [{steps, is_correct, answer}]}``, read from
GSM8K's ``example_model_solutions.jsonl`` (four model solutions per test question, each marked
correct or not) or from a generic JSONL of that same shape.

A candidate longer than the scorer's ``max_length`` is scored on the leading steps that fit and its
aggregate is taken over those steps (``last`` is then the last scored step); one with no step scored at
all ranks below every scored candidate. Such candidates are counted (``n_truncated``), never fatal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dense_irl.data.answers import normalise_answer
from dense_irl.data.layout import split_steps
from dense_irl.data.readers import ANSWER_STEP, jsonl_rows
from dense_irl.errors import ConfigError, DataError, MissingFileError
from dense_irl.eval.localisation import ScoreFn, check_lengths, n_truncated, score_in_batches

AGGREGATIONS = {
    "min": lambda s: min(s),
    "last": lambda s: s[-1],
    "sum": lambda s: sum(s),
    "mean": lambda s: sum(s) / len(s),
}
GSM8K_META_KEYS = ("question", "ground_truth")
TIE_RULE = (
    "ties among the top-scoring candidates count as a uniform random pick among them (exact expectation)"
)
BON_TRUNCATION_RULE = (
    "a candidate longer than max_length is aggregated over the steps that fit; one with no step scored ranks last"
)


def aggregate(agg: str, scores: list[float]) -> float:
    """A candidate's score under aggregation ``agg`` of its (scored) step scores; -inf when none was scored."""
    return AGGREGATIONS[agg](scores) if scores else -np.inf


def _answer_of(steps: list[str]) -> str | None:
    """The final answer in a last step ``A: <answer>``, else None (e.g. a truncated solution)."""
    if steps and steps[-1].startswith("A:"):
        return steps[-1][2:].strip()
    return None


def _gsm8k_problem(row: dict, path: Path, ln: int) -> dict:
    if not isinstance(row["question"], str):
        raise DataError(path, ln, "question", "not a string")
    models = [k for k in row if k not in GSM8K_META_KEYS]
    if not models:
        raise DataError(path, ln, None, "no model solutions (expected keys like '6b_finetuning')")
    cands = []
    for m in models:
        sol = row[m]
        if not isinstance(sol, dict):
            raise DataError(path, ln, m, "expected an object {is_correct, solution}")
        if not isinstance(sol.get("is_correct"), bool):
            raise DataError(path, ln, f"{m}.is_correct", "missing or not a boolean")
        if not isinstance(sol.get("solution"), str):
            raise DataError(path, ln, f"{m}.solution", "missing or not a string")
        steps = split_steps(sol["solution"], "\n")
        if not steps:
            raise DataError(path, ln, f"{m}.solution", "empty solution")
        answer = _answer_of(steps)
        if answer is not None:  # the final-answer step as every GSM8K chain here ends (data.readers.ANSWER_STEP)
            steps[-1] = ANSWER_STEP.format(answer)
        cands.append({"steps": steps, "is_correct": sol["is_correct"], "answer": answer, "model": m})
    out = {"problem": row["question"], "candidates": cands}
    if isinstance(row.get("ground_truth"), str):
        out["reference_answer"] = _answer_of(split_steps(row["ground_truth"], "\n"))
    return out


def _generic_problem(row: dict, path: Path, ln: int) -> dict:
    if not isinstance(row.get("problem"), str):
        raise DataError(path, ln, "problem", "missing or not a string")
    cands = row["candidates"]
    if not isinstance(cands, list) or not cands:
        raise DataError(path, ln, "candidates", "must be a non-empty list")
    out = []
    for i, c in enumerate(cands):
        where = f"candidates[{i}]"
        if not isinstance(c, dict):
            raise DataError(path, ln, where, "expected an object {steps, is_correct, answer?}")
        steps = c.get("steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise DataError(path, ln, f"{where}.steps", "missing, empty or not a list of strings")
        if not isinstance(c.get("is_correct"), bool):
            raise DataError(path, ln, f"{where}.is_correct", "missing or not a boolean")
        ans = c.get("answer")
        if ans is None:
            ans = _answer_of(steps)
        elif isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
            raise DataError(path, ln, f"{where}.answer", "not a string or number")
        out.append({**c, "steps": list(steps), "answer": None if ans is None else str(ans)})
    return {**row, "candidates": out}


def load_bon(path: str | Path) -> list[dict]:
    """Read Best-of-N problems ``{problem, candidates: [{steps, is_correct, answer}]}`` from JSONL.

    Two row formats: GSM8K's ``example_model_solutions.jsonl`` (``question``, ``ground_truth`` and
    one ``{is_correct, solution}`` object per model; each non-empty solution line is a step and the
    last line ``A: <answer>`` becomes the step ``The answer is <answer>.``, the final step of every GSM8K
    chain the reader, the perturbations and training produce), or the generic
    ``{problem, candidates: [{steps: [..], is_correct: bool, answer?: str}]}`` (a missing answer is
    read from a last step ``A: x``). A candidate without an answer (a truncated solution) keeps
    ``answer`` None. A bad row raises :class:`DataError` naming the file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Best-of-N file not found: {path}")
    problems = []
    for ln, row in jsonl_rows(path):
        if isinstance(row, DataError):
            raise row
        if "candidates" in row:
            problems.append(_generic_problem(row, path, ln))
        elif "question" in row:
            problems.append(_gsm8k_problem(row, path, ln))
        else:
            raise DataError(path, ln, "candidates", "missing (and no GSM8K 'question' either)")
    if not problems:
        raise DataError(path, None, None, "no rows in file")
    return problems


def _by_answer(candidates: list[dict]) -> dict[str, list[int]]:
    """The candidates' indices under each normalised answer; candidates without an answer are left out."""
    out: dict[str, list[int]] = {}
    for j, c in enumerate(candidates):
        if c.get("answer") is not None:
            out.setdefault(normalise_answer(c["answer"]), []).append(j)
    return out


def _expected(candidates: list[dict], picked: list[list[int]]) -> float:
    """Expected correctness of a uniform pick among ``picked`` answers, each counting the mean correctness
    of the candidates that gave it."""
    return float(np.mean([np.mean([candidates[j]["is_correct"] for j in js]) for js in picked]))


def _best_min_pick(candidates: list[dict], step_scores: list[list[float]]) -> float:
    """Expected correctness of picking the candidates with the highest minimum step score (ties uniform)."""
    v = np.array([aggregate("min", s) for s in step_scores])
    return _expected(candidates, [[int(j)] for j in np.flatnonzero(v == v.max())])


def majority_hit(candidates: list[dict]) -> float:
    """Expected correctness of majority vote over normalised answers.

    Ties among the most-voted answers count as a uniform pick among them, and an answer counts the mean
    correctness of the candidates that gave it (exact expectation, the rule of every other method here; a
    fixed tie-break would depend on the order of the candidates). Candidates without an answer do not vote;
    if none has one, the pick is uniform over all candidates.
    """
    groups = _by_answer(candidates)
    if not groups:
        return float(np.mean([c["is_correct"] for c in candidates]))
    top = max(len(js) for js in groups.values())
    return _expected(candidates, [js for js in groups.values() if len(js) == top])


def weighted_vote_hit(candidates: list[dict], step_scores: list[list[float]], threshold: float) -> float:
    """Expected correctness of the weighted vote: each candidate with an answer votes for it with weight
    ``sigmoid(min step score - threshold)``, the scorer's probability that the chain has no wrong step (the
    ``p_right`` of its worst step, as ``/pooling`` answers it); the answer of largest total wins, ties count
    as a uniform pick among the tied answers. Candidates without an answer (or with no step scored) do not
    vote; with no vote at all, the candidates with the highest minimum step score are picked."""
    groups = {a: [j for j in js if step_scores[j]] for a, js in _by_answer(candidates).items()}
    groups = {a: js for a, js in groups.items() if js}
    if not groups:
        return _best_min_pick(candidates, step_scores)
    totals = {a: sum(float(1.0 / (1.0 + np.exp(threshold - min(step_scores[j])))) for j in js)
              for a, js in groups.items()}
    best = max(totals.values())
    return _expected(candidates, [groups[a] for a, t in totals.items() if t == best])


def vote_then_reward_hit(candidates: list[dict], step_scores: list[list[float]]) -> float:
    """Expected correctness of majority vote with its ties broken by the scorer: among the most-voted answers,
    the one whose best candidate has the highest minimum step score wins (a further tie is a uniform pick).
    Where the scorer tells nothing apart this is majority vote; it differs only where majority vote ties.
    Candidates without an answer do not vote; with no vote at all, the highest minimum step score is picked."""
    groups = _by_answer(candidates)
    if not groups:
        return _best_min_pick(candidates, step_scores)
    top = max(len(js) for js in groups.values())
    tied = [js for js in groups.values() if len(js) == top]
    best = [max(aggregate("min", step_scores[j]) for j in js) for js in tied]
    return _expected(candidates, [js for js, b in zip(tied, best) if b == max(best)])


def _bootstrap_ci(hits: np.ndarray, rng: np.random.Generator, n_boot: int = 1000) -> list[float]:
    idx = rng.integers(0, len(hits), size=(n_boot, len(hits)))
    means = hits[idx].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def evaluate_bon(
    score_fn: ScoreFn,
    problems: list[dict],
    aggregations: tuple[str, ...] = ("min", "last", "sum", "mean"),
    seed: int = 0,
    batch_size: int = 64,
    name: str = "scorer",
    check: bool = True,
    progress: str | None = None,
    threshold: float | None = None,
    keep_scores: bool = False,
) -> dict:
    """Best-of-N accuracy of reranking by aggregated step scores, with baselines.

    For each aggregation of a candidate's step scores (min, last, sum, mean) the top candidate
    is picked; ties count as a uniform random pick among the tied (exact expectation). Baselines:
    ``random`` (expected accuracy of a uniform pick = mean fraction correct, exact), ``majority``
    (vote over normalised answers, ties exact, see :func:`majority_hit`) and ``oracle`` (any candidate
    correct). Returns ``accuracy`` and ``ci95`` (bootstrap over problems, seeded by ``seed``) per
    method, ``n`` problems, ``N`` mean candidates per problem (``N_min``, ``N_max``), and
    ``n_truncated`` candidates scored on fewer steps than they have (:data:`BON_TRUNCATION_RULE`;
    ``n_unscored`` of them had no step scored). With ``check`` and a scorer that knows its tokenizer
    (``localisation.with_layout``) the lengths are checked before any compute, with a one-line note.
    ``vote_then_reward`` is majority vote with its ties broken by the scorer (:func:`vote_then_reward_hit`);
    with the scorer's first-error ``threshold`` there is also ``weighted_vote`` (:func:`weighted_vote_hit`).
    With ``keep_scores``, ``scores`` holds each problem's candidates' step scores (other aggregations later).
    """
    bad = [a for a in aggregations if a not in AGGREGATIONS]
    if bad:
        raise ConfigError(f"unknown aggregation(s) {bad}; choose from {sorted(AGGREGATIONS)}")
    if not problems:
        raise ValueError("no problems to evaluate")
    chains, owner = [], []
    for i, p in enumerate(problems):
        if not p.get("candidates"):
            raise ValueError(f"problem {i} has no candidates")
        for c in p["candidates"]:
            if not c["steps"]:
                raise ValueError(f"problem {i} has a candidate with no steps")
            chains.append((p["problem"], list(c["steps"])))
            owner.append(i)
    if check:
        check_lengths(score_fn, {"candidate": chains}, name)
    scores = score_in_batches(score_fn, chains, batch_size, progress)
    per_problem: list[list[list[float]]] = [[] for _ in problems]
    for i, s in zip(owner, scores):
        per_problem[i].append(s)

    hits: dict[str, np.ndarray] = {}
    for agg in aggregations:
        h = []
        for p, cand_scores in zip(problems, per_problem):
            v = np.array([aggregate(agg, s) for s in cand_scores])
            top = np.flatnonzero(v == v.max())
            h.append(np.mean([p["candidates"][j]["is_correct"] for j in top]))
        hits[agg] = np.array(h, dtype=np.float64)
    correct = [[c["is_correct"] for c in p["candidates"]] for p in problems]
    hits["random"] = np.array([np.mean(c) for c in correct], dtype=np.float64)
    hits["majority"] = np.array([majority_hit(p["candidates"]) for p in problems], dtype=np.float64)
    hits["oracle"] = np.array([any(c) for c in correct], dtype=np.float64)
    hits["vote_then_reward"] = np.array([vote_then_reward_hit(p["candidates"], s)
                                         for p, s in zip(problems, per_problem)], dtype=np.float64)
    if threshold is not None:
        hits["weighted_vote"] = np.array([weighted_vote_hit(p["candidates"], s, threshold)
                                          for p, s in zip(problems, per_problem)], dtype=np.float64)

    rng = np.random.default_rng(seed)
    sizes = [len(c) for c in correct]
    report = {
        "accuracy": {k: float(v.mean()) for k, v in hits.items()},
        "ci95": {k: _bootstrap_ci(v, rng) for k, v in hits.items()},
        "aggregations": list(aggregations),
        "n": len(problems),
        "N": float(np.mean(sizes)),
        "N_min": min(sizes),
        "N_max": max(sizes),
        "tie_rule": TIE_RULE,
        "seed": seed,
        "n_candidates": len(chains),
        "n_truncated": n_truncated(chains, scores),
        "n_unscored": sum(not s for s in scores),
        "truncation_rule": BON_TRUNCATION_RULE,
    }
    if keep_scores:
        report["scores"] = per_problem
    return report
