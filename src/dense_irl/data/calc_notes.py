"""GSM8K calculator notes: ``48/2 = <<48/2=24>>24`` marks a checkable arithmetic step.

The notes stay in the step text (the expert wrote them, the reward model reads them); this module only
finds them, and evaluates their arithmetic without ``eval``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from dense_irl.data.answers import final_answer

_NOTE_RE = re.compile(r"<<([^<>]*)>>")
_NUMBER_RE = re.compile(r"\d+\.?\d*|\.\d+")
_OPERATOR_RE = re.compile(r"[+\-*/]")
_TOKEN_RE = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([+\-*/()]))")
# Notes are short; the cap keeps recursion and number sizes bounded on hostile input.
MAX_EXPR_CHARS = 200


@dataclass
class CalcNote:
    """One ``<<expr=result>>`` note; ``start:end`` is its character span (brackets included) in the step."""

    expr: str
    result: str
    start: int
    end: int
    operands: list[str] = field(default_factory=list)
    operators: list[str] = field(default_factory=list)


def parse_calc_notes(step: str) -> list[CalcNote]:
    """Find the calculator notes of one step, in order.

    ``expr`` is the text before the last ``=`` of the note and ``result`` the text after it (a note with
    no ``=`` gets ``result=""``). ``operands`` are the numbers of ``expr`` and ``operators`` its
    ``+ - * /`` signs (a unary minus counts as an operator), both in reading order.
    """
    notes = []
    for m in _NOTE_RE.finditer(step):
        inner = m.group(1)
        expr, eq, result = inner.rpartition("=")
        if not eq:
            expr, result = inner, ""
        expr, result = expr.strip(), result.strip()
        notes.append(
            CalcNote(
                expr=expr,
                result=result,
                start=m.start(),
                end=m.end(),
                operands=_NUMBER_RE.findall(expr),
                operators=_OPERATOR_RE.findall(expr),
            )
        )
    return notes


def _tokenize(expr: str) -> list[str] | None:
    tokens, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            return None
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    return tokens


def eval_calc_expr(expr: str) -> float | None:
    """Evaluate ``+ - * /`` arithmetic with parentheses and unary signs; None if it is not such an
    expression, divides by zero, is longer than ``MAX_EXPR_CHARS`` or is not finite.

    A tiny recursive-descent parser, so no Python code from the data is ever run.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    tokens = _tokenize(expr)
    if not tokens:
        return None
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def parse_sum():
        value = parse_product()
        while peek() in ("+", "-"):
            value = value + parse_product() if take() == "+" else value - parse_product()
        return value

    def parse_product():
        value = parse_unary()
        while peek() in ("*", "/"):
            if take() == "*":
                value *= parse_unary()
            else:
                value /= parse_unary()  # ZeroDivisionError -> None below
        return value

    def parse_unary():
        if peek() in ("+", "-"):
            sign = -1.0 if take() == "-" else 1.0
            return sign * parse_unary()
        return parse_atom()

    def parse_atom():
        tok = take() if peek() is not None else None
        if tok == "(":
            value = parse_sum()
            if take() != ")":
                raise ValueError("unbalanced parenthesis")
            return value
        if tok is None or not (tok[0].isdigit() or tok[0] == "."):
            raise ValueError(f"expected a number, got {tok!r}")
        return float(tok)

    try:
        value = parse_sum()
    except (ValueError, IndexError, ZeroDivisionError, OverflowError):
        return None
    if pos != len(tokens) or not math.isfinite(value):
        return None
    return value


def check_calc_note(note: CalcNote) -> bool | None:
    """Does the note's arithmetic give its result? None when either side is not a number.

    GSM8K writers round results (``<<10/3=3.33>>``), so the value only has to match to the number of
    decimals the result shows.
    """
    value = eval_calc_expr(note.expr)
    result = note.result.replace(",", "")
    if _NUMBER_RE.fullmatch(result.lstrip("-")):
        target, decimals = float(result), len(result.partition(".")[2])
    else:  # a result written as a fraction, e.g. <<3/4=3/4>>
        target, decimals = eval_calc_expr(result), 9
    if value is None or target is None:
        return None
    tol = 0.5 * 10.0**-decimals + 1e-9 * max(1.0, abs(value))
    return abs(value - target) <= tol


def _values(text: str) -> set[float]:
    return {round(float(n), 6) for n in _NUMBER_RE.findall(text.replace(",", ""))}


def step_claims(step: str) -> list[str]:
    """The values a step states as results: its notes' results, and its final answer when it gives one."""
    claims = [n.result for n in parse_calc_notes(step) if n.result]
    answer = final_answer(step)
    return claims + ([answer] if answer is not None else [])


def first_unsupported_step(question: str, expert_steps: list[str], steps: list[str], start: int = 0) -> int | None:
    """The first step of ``steps`` (from ``start`` on) that a wrong chain likely goes wrong at: one whose notes'
    arithmetic is wrong, or that states a result (a note's or its final answer) found neither in the question
    nor anywhere in the expert's solution ``expert_steps``. None when no step does.

    A heuristic first-error label for a sampled chain whose final answer is wrong, with no step labels: a
    correct alternative route through other intermediate values is flagged too early, an error that reuses
    one of the expert's values too late.
    """
    known = _values(question) | {v for s in expert_steps for v in _values(s)}
    for k in range(start, len(steps)):
        if any(check_calc_note(n) is False for n in parse_calc_notes(steps[k])):
            return k
        for claim in step_claims(steps[k]):
            vals = _values(claim)
            if vals and not vals & known:
                return k
    return None
