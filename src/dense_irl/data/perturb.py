"""Perturbations of expert chains with a known first erroneous step, and ProcessBench-style rows.

Works on synthetic chains (equations ``a op b = c``, structured problem in ``meta``) and on GSM8K
chains (calculator notes ``<<48/2=24>>24``). GSM8K chains get a final step "The answer is N." first,
so that a wrong final answer has a step to point to. Each perturbation changes exactly one thing, so
the first wrong step is known without a grader.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from dense_irl.data.calc_notes import eval_calc_expr
from dense_irl.data.schema import Demonstration
from dense_irl.data.synthetic import ANSWER_RE, EQ_RE, apply_op, step_values
from dense_irl.errors import ConfigError
from dense_irl.io import write_jsonl

KINDS = (
    "wrong_result",
    "flipped_operator",
    "wrong_operand",
    "dropped_step",
    "swapped_steps",
    "wrong_final_answer",
)
ROW_FIELDS = ("id", "problem", "steps", "label", "final_answer_correct", "error_type", "source")

NOTE_RE = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
TOK_RE = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+|[-+*/()]")  # numbers (commas allowed) and operators
# Visible numbers and operators ("x" as a lone word means times); words between them are skipped.
VIS_TOK_RE = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+|[-+*/()×]|(?<![A-Za-z])x(?![A-Za-z])")
VIS_RES_RE = re.compile(r"\$?(\d[\d,]*(?:\.\d+)?|\.\d+)")  # the visible result just after a note


# ---------------------------------------------------------------------------------------------- numbers
def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def _fmt(x: float, like: str = "") -> str:
    """``x`` written the way ``like`` was: thousands commas and a fixed number of decimals kept."""
    comma = "," if "," in like else ""
    places = len(like.split(".")[1]) if "." in like else 0
    if float(x).is_integer() and not places:
        return f"{int(x):{comma}}"
    if places and abs(x * 10**places - round(x * 10**places)) < 1e-6:
        return f"{x:{comma}.{places}f}"
    return f"{x:{comma}.2f}".rstrip("0").rstrip(".")


def _clean(x: float | None) -> bool:
    """A result a grade-school solution could show: non-negative with at most two decimals."""
    return x is not None and x >= 0 and abs(x * 100 - round(x * 100)) < 1e-6


def _wrong_number(x: float, rng: random.Random, minimum: float = 0) -> float:
    """A plausible slip: a nearby value, a factor of ten, or swapped digits; never ``x`` itself."""
    if float(x).is_integer():
        x = int(x)
        cands = [x + d for d in (-10, -2, -1, 1, 2, 10)] + [x * 10]
        digits = str(x)
        if x > 9 and digits[-1] != digits[-2] and digits[-1] != "0":
            cands.append(int(digits[:-2] + digits[-1] + digits[-2]))
    else:
        cands = [round(x + d, 2) for d in (-1, -0.5, 0.5, 1)]
    lo = minimum if x >= minimum else float("-inf")  # a value already below the floor (a debt) may move
    cands = [c for c in cands if c != x and c >= lo]
    return rng.choice(cands)


def _numbers(text: str) -> set[float]:
    return {v for t in TOK_RE.findall(text) if (v := _num(t)) is not None}


def _is_op(tok: str) -> bool:
    return tok in "+-*/()"


def _op(tok: str) -> str:
    return "*" if tok in ("x", "×") else tok


def _visible_tokens(prefix: str) -> list[re.Match]:
    """Tokens of the visible expression that a note repeats ("4 sheep * 20 = <<4*20=80>>"), if any."""
    eq = re.search(r"=\s*\$?\s*$", prefix)
    if eq is None:
        return []
    # The expression starts after the last clause break (not a decimal point or thousands comma).
    breaks = re.finditer(r"[:;!?=]|[.,](?!\d)", prefix[: eq.start()])
    start = max((b.end() for b in breaks), default=0)
    return list(VIS_TOK_RE.finditer(prefix, start, eq.start()))


# ------------------------------------------------------------------------------------------------ chains
def _is_synthetic(demo: Demonstration) -> bool:
    return isinstance(demo.meta, dict) and "start" in demo.meta and "ops" in demo.meta


def expected_answer(demo: Demonstration) -> str | None:
    """The right final answer of a demonstration (from ``meta`` for synthetic problems)."""
    if _is_synthetic(demo):
        values = step_values(demo.meta)
        return str(values[-1] if values else demo.meta["start"])
    if demo.answer is not None:
        return str(demo.answer).strip()
    hashes = [s for s in demo.steps if s.lstrip().startswith("####")]
    return hashes[-1].lstrip()[4:].strip() if hashes else None


def chain_steps(demo: Demonstration) -> list[str]:
    """The chain that perturbations edit: GSM8K steps minus any ``####`` line, plus "The answer is N."."""
    if _is_synthetic(demo):
        return list(demo.steps)
    steps = [s for s in demo.steps if s.strip() and not s.lstrip().startswith("####")]
    answer = expected_answer(demo)
    if answer is not None and not (steps and ANSWER_RE.search(steps[-1])):
        steps.append(f"The answer is {answer}.")
    return steps


def _has_final(steps: list[str]) -> bool:
    return bool(steps) and ANSWER_RE.search(steps[-1]) is not None


# ----------------------------------------------------------------------------------- step-level edits
def _rewrite_note(step: str, m: re.Match, value: float, edit: tuple[int, str] | None = None) -> str:
    """Step with note ``m`` given result ``value`` (and expression token ``edit=(index, text)``).

    The visible result after the note and, where it repeats the note, the visible expression before it
    are changed the same way, so the text does not contradict its own note.
    """
    expr, res = m.group(1), m.group(2)
    prefix, suffix = step[: m.start()], step[m.end() :]
    if edit is not None:
        i, new = edit
        toks = list(TOK_RE.finditer(expr))
        expr = expr[: toks[i].start()] + new + expr[toks[i].end() :]
        vis = _visible_tokens(prefix)[-len(toks) :]  # "for 20 chickens they need 3*20 = <<3*20=60>>"
        same = len(vis) == len(toks) and all(
            _op(a.group()) == b.group() if _is_op(b.group()) else _num(a.group()) == _num(b.group())
            for a, b in zip(vis, toks)
        )
        if same:
            v = vis[i]
            shown = new if _is_op(new) else _fmt(float(new), v.group())
            prefix = prefix[: v.start()] + shown + prefix[v.end() :]
    vm = VIS_RES_RE.match(suffix)
    if vm and _num(vm.group(1)) == _num(res):
        suffix = suffix[: vm.start(1)] + _fmt(value, vm.group(1)) + suffix[vm.end(1) :]
    return f"{prefix}<<{expr}={_fmt(value)}>>{suffix}"


def _note_edits(step: str, kind: str, rng: random.Random, ops: str = "+-*/") -> str | None:
    """One edited version of a GSM8K step for a note-level kind, or None if none fits."""
    notes = [m for m in NOTE_RE.finditer(step) if _num(m.group(2)) is not None]
    rng.shuffle(notes)
    for m in notes:
        old = _num(m.group(2))
        if kind == "wrong_result":
            return _rewrite_note(step, m, _wrong_number(old, rng))
        toks = [t.group() for t in TOK_RE.finditer(m.group(1))]
        if kind == "flipped_operator":  # binary operators: those after a number or a closing bracket
            sites = [i for i, t in enumerate(toks) if t in "+-*/" and i > 0 and toks[i - 1] not in "+-*/("]
        else:
            sites = [i for i, t in enumerate(toks) if not _is_op(t)]
        rng.shuffle(sites)
        for i in sites:
            if kind == "flipped_operator":
                options = [o for o in ops if o != toks[i]]
            else:
                options = [_fmt(_wrong_number(_num(toks[i]), rng, minimum=1))]
            rng.shuffle(options)
            for new in options:
                value = eval_calc_expr("".join(toks[:i] + [new] + toks[i + 1 :]).replace(",", ""))
                if _clean(value) and value != old:
                    return _rewrite_note(step, m, value, (i, new))
    return None


def _synthetic_edit(demo: Demonstration, k: int, kind: str, rng: random.Random) -> str | None:
    """Step k of a synthetic chain with its equation's result, operator or one operand changed."""
    step = demo.steps[k]
    m = EQ_RE.search(step)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    result = step_values(demo.meta)[k]
    if kind == "wrong_result":
        options = [(a, op, b, _wrong_number(result, rng))]
    elif kind == "flipped_operator":  # "/" only where the chain already uses it (the LM's vocabulary)
        used = {o for o, _ in demo.meta["ops"]}
        options = [(a, o, b, None) for o in "+-*/" if o != op and (o != "/" or "/" in used)]
    else:
        options = [(_wrong_number(a, rng, 1), op, b, None), (a, op, _wrong_number(b, rng, 1), None)]
    rng.shuffle(options)
    for a2, o2, b2, c2 in options:
        if c2 is None:
            try:
                c2 = apply_op(a2, o2, b2)
            except ValueError:
                continue
        if c2 >= 0 and (c2 != result or kind == "wrong_operand"):
            return f"{step[: m.start()]}{a2} {o2} {b2} = {c2}{step[m.end() :]}"
    return None


def _depends(steps: list[str], k: int, prompt: str) -> bool:
    """Whether step k+1 of a GSM8K chain uses a value that only step k's note explains."""
    results = {v for m in NOTE_RE.finditer(steps[k]) if (v := _num(m.group(2))) is not None}
    nxt = steps[k + 1]
    if ANSWER_RE.search(nxt) and k + 1 == len(steps) - 1:
        used = {v for a in ANSWER_RE.findall(nxt) if (v := _num(a)) is not None}
    else:
        used = {v for m in NOTE_RE.finditer(nxt) for v in _numbers(m.group(1))}
    known = _numbers(prompt).union(*(_numbers(s) for s in steps[:k]))
    return bool((results & used) - known)


# ---------------------------------------------------------------------------------------------- perturb
def perturb(demo: Demonstration, kind: str, rng: random.Random) -> tuple[list[str], int] | None:
    """Perturbed steps and the index of their first erroneous step, or None if ``kind`` does not apply.

    For GSM8K chains the steps are :func:`chain_steps` (with the appended answer step). Kinds:
    wrong_result (step k's result changed), flipped_operator (operator changed, result recomputed),
    wrong_operand (an operand changed, result recomputed) — on synthetic chains the wrong value is carried
    through the later steps and the answer (each later step is right given the one before, as when a model
    goes on from its own mistake); on GSM8K chains later steps are left as they are — dropped_step (step k removed where step k+1
    uses its result), swapped_steps (steps k, k+1 swapped where k+1 uses k) and wrong_final_answer.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation kind {kind!r}; expected one of {list(KINDS)}")
    steps = chain_steps(demo)
    synthetic = _is_synthetic(demo)
    final = _has_final(steps)
    body = len(steps) - 1 if final else len(steps)  # steps before the answer step
    if kind == "wrong_final_answer":
        if not final:
            return None
        m = ANSWER_RE.search(steps[-1])
        old = _num(m.group(1))
        if old is None:
            return None
        new = steps[-1][: m.start(1)] + _fmt(_wrong_number(old, rng), m.group(1)) + steps[-1][m.end(1) :]
        return steps[:-1] + [new], len(steps) - 1
    positions = list(range(body))
    rng.shuffle(positions)
    for k in positions:
        if kind in ("dropped_step", "swapped_steps"):
            if k + 1 >= len(steps) or not (synthetic or _depends(steps, k, demo.prompt)):
                continue
            if kind == "dropped_step":
                return steps[:k] + steps[k + 1 :], k
            if steps[k] != steps[k + 1]:
                return steps[:k] + [steps[k + 1], steps[k]] + steps[k + 2 :], k
            continue
        new = _synthetic_edit(demo, k, kind, rng) if synthetic else _note_edits(steps[k], kind, rng)
        if new is None or new == steps[k]:
            continue
        if not synthetic:
            return steps[:k] + [new] + steps[k + 1 :], k
        later = _carry_forward(demo, k, int(EQ_RE.search(new).group(4)))
        if later is not None:
            return steps[:k] + [new] + later, k
    return None


def _carry_forward(demo: Demonstration, k: int, value: int) -> list[str] | None:
    """Steps k+1.. of a synthetic chain redone from a wrong value at step k, as a model that made the
    mistake would go on: each later step is right given the one before it, the answer follows the
    chain. None when a later operation is undefined on the wrong value (inexact division, below 0)."""
    out = []
    for j in range(k + 1, len(demo.steps)):
        step = demo.steps[j]
        m = EQ_RE.search(step)
        if m is not None:
            op, n = demo.meta["ops"][j]
            try:
                result = apply_op(value, op, n)
            except ValueError:
                return None
            if result < 0:
                return None
            step, value = f"{step[: m.start()]}{value} {op} {n} = {result}{step[m.end() :]}", result
        elif (a := ANSWER_RE.search(step)) is not None:
            step = f"{step[: a.start(1)]}{value}{step[a.end(1) :]}"
        out.append(step)
    return out


# ------------------------------------------------------------------------------------------ ProcessBench
def _final_answer_correct(steps: list[str], expected: str | None) -> bool:
    found = [a for s in steps for a in ANSWER_RE.findall(s)]  # the last answer the chain states
    return bool(found) and expected is not None and _num(found[-1]) == _num(expected)


def make_processbench(
    demos: list[Demonstration], kinds=KINDS, seed: int = 0, correct_fraction: float = 0.5
) -> list[dict]:
    """One ProcessBench row per demonstration: about ``correct_fraction`` unperturbed (label -1), the
    rest perturbed, each with the least-used kind so far that applies to it (so kinds spread evenly).

    A demonstration to which no kind applies stays unperturbed. Rows keep the order of ``demos``.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ConfigError(f"kinds = {list(kinds)!r}: must be a non-empty subset of {list(KINDS)}")
    if not 0.0 <= correct_fraction <= 1.0:
        raise ConfigError(f"correct_fraction = {correct_fraction!r}: must be between 0 and 1")
    rng = random.Random(seed)
    order = list(range(len(demos)))
    rng.shuffle(order)
    n_correct = round(correct_fraction * len(demos))
    to_perturb = set(order[n_correct:])
    counts = dict.fromkeys(kinds, 0)
    rows: dict[int, dict] = {}
    for j, i in enumerate(order):
        demo = demos[i]
        steps, label, error_type = chain_steps(demo), -1, "none"
        if i in to_perturb:
            rotation = {kind: (r - j) % len(kinds) for r, kind in enumerate(kinds)}
            for kind in sorted(kinds, key=lambda kd: (counts[kd], rotation[kd])):
                out = perturb(demo, kind, rng)
                if out is not None:
                    (steps, label), error_type = out, kind
                    counts[kind] += 1
                    break
        rows[i] = {
            "id": demo.id if error_type == "none" else f"{demo.id}-{error_type}",
            "problem": demo.prompt,
            "steps": steps,
            "label": label,
            "final_answer_correct": _final_answer_correct(steps, expected_answer(demo)),
            "error_type": error_type,
            "source": demo.source,
        }
    return [rows[i] for i in range(len(demos))]


def write_processbench(rows: list[dict], path: str | Path) -> None:
    """Write ProcessBench rows as JSON lines, atomically; every row must have all of ROW_FIELDS."""
    for n, row in enumerate(rows):
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"ProcessBench row {n} (id {row.get('id')!r}): field '{missing[0]}' is missing")
    write_jsonl(path, rows)
