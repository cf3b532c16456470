"""A synthetic multi-step arithmetic task with an exact step verifier.

Each problem is a start value and a short list of operations ("Sam has 7 marbles. He finds 5 more.
Then he loses 3. ..."). The expert chain has one step per operation, each ending with its equation
("He finds 5 more: 7 + 5 = 12."), and a final step "The answer is 18.". Numbers stay small and the
language regular so a ~1M-parameter digit-level LM learns the task on a CPU in minutes, and because
the structured problem is kept in ``meta``, :func:`verify` knows the first wrong step of any chain.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from dense_irl.data.schema import Demonstration
from dense_irl.errors import ConfigError

OPS = ("+", "-", "*", "/")
# "a op b = c" with integers (a decimal result is parsed so that it can be rejected, not truncated).
EQ_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
ANSWER_RE = re.compile(r"[Tt]he answer is\s*\$?\s*(-?[\d,]*\.?\d+)")

NAMES = [
    ("Sam", "he", "his"), ("Mia", "she", "her"), ("Tom", "he", "his"), ("Ava", "she", "her"),
    ("Leo", "he", "his"), ("Zoe", "she", "her"), ("Ben", "he", "his"), ("Ella", "she", "her"),
    ("Max", "he", "his"), ("Lily", "she", "her"), ("Noah", "he", "his"), ("Ruth", "she", "her"),
]  # fmt: skip
OBJECTS = [
    "marbles",
    "apples",
    "stickers",
    "coins",
    "cards",
    "pencils",
    "shells",
    "stamps",
    "beads",
    "cookies",
]

# (problem sentence, step text before the equation) per operation; the first is the regular phrasing.
TEMPLATES = {
    "+": [
        ("{He} finds {n} more.", "{He} finds {n} more"),
        ("{He} buys {n} more.", "{He} buys {n} more"),
        ("A friend gives {him} {n} more.", "{He} gets {n} more"),
        ("{He} wins {n} more.", "{He} wins {n} more"),
    ],
    "-": [
        ("{He} loses {n}.", "{He} loses {n}"),
        ("{He} gives {n} away.", "{He} gives {n} away"),
        ("{He} sells {n}.", "{He} sells {n}"),
        ("{He} uses {n}.", "{He} uses {n}"),
    ],
    "*": [
        ("The number of {obj} is multiplied by {n}.", "The number is multiplied by {n}"),
        ("{He} ends up with {n} times as many.", "{He} has {n} times as many"),
        ("{His} pile grows {n} times bigger.", "The pile grows {n} times"),
        ("Each of {his} {obj} turns into {n}.", "Each one turns into {n}"),
    ],
    "/": [
        ("{He} splits them into {n} equal groups and keeps one group.", "{He} keeps one of {n} groups"),
        ("{He} shares them equally among {n} boxes and keeps one box.", "One of {n} boxes"),
        ("{He} keeps one share out of {n} equal shares.", "One share out of {n}"),
        ("Only one in every {n} is kept.", "One in every {n} is kept"),
    ],
}
MAX_PHRASING = min(len(t) for t in TEMPLATES.values())
# How a writer wraps a step's phrase and equation. The problem does not fix this choice (human solutions
# vary in style the same way), so a correct step can be an unlikely one: style r is drawn with weight
# 2^-r among the first ``step_styles``. The equation is always "a op b = c", which is all verify() reads.
STEP_STYLES = (
    "{pre}: {eq}.",
    "{eq}, because {pre_l}.",
    "{pre}, so {he} has {eq}.",
    "Now there are {eq} {obj}.",
)


@dataclass
class SyntheticConfig:
    """How many problems, how long and how varied; every problem is determined by ``seed``."""

    n_problems: int = 2000
    min_steps: int = 2  # operations per problem (the chain has one more step: the answer)
    max_steps: int = 4
    max_value: int = 20  # start value and +/- operands are drawn from 1..max_value
    max_factor: int = 5  # * and / operands are drawn from 2..max_factor (keeps products learnable)
    max_result: int | None = None  # every intermediate value stays in 1..max_result (None: 10*max_value)
    operations: list[str] = field(default_factory=lambda: ["+", "-", "*"])
    phrasing: int = 3  # phrasing templates per operation to draw from; 1 = fully regular
    step_styles: int = 1  # ways a writer may wrap a step (STEP_STYLES, weight 2^-r); 1 = always the first
    seed: int = 0


def validate_config(cfg: SyntheticConfig) -> int:
    """Raise a ConfigError naming the first bad field; return the effective ``max_result``."""

    def bad(name: str, problem: str) -> ConfigError:
        return ConfigError(f"SyntheticConfig.{name} = {getattr(cfg, name)!r}: {problem}")

    for name in ("n_problems", "min_steps", "max_steps", "max_value", "max_factor", "phrasing", "step_styles",
                 "seed"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(name, "must be an integer")
    if cfg.n_problems < 1:
        raise bad("n_problems", "must be >= 1")
    if cfg.min_steps < 1:
        raise bad("min_steps", "must be >= 1")
    if cfg.max_steps < cfg.min_steps:
        raise bad("max_steps", f"must be >= min_steps ({cfg.min_steps})")
    if cfg.max_value < 2:
        raise bad("max_value", "must be >= 2")
    if cfg.max_factor < 2:
        raise bad("max_factor", "must be >= 2")
    if not 1 <= cfg.phrasing <= MAX_PHRASING:
        raise bad("phrasing", f"must be between 1 and {MAX_PHRASING}")
    if not 1 <= cfg.step_styles <= len(STEP_STYLES):
        raise bad("step_styles", f"must be between 1 and {len(STEP_STYLES)}")
    if not cfg.operations or any(op not in OPS for op in cfg.operations):
        raise bad("operations", f"must be a non-empty list drawn from {list(OPS)}")
    max_result = 10 * cfg.max_value if cfg.max_result is None else cfg.max_result
    if not isinstance(max_result, int) or max_result < 2 * cfg.max_value:
        raise bad("max_result", f"must be an integer >= 2 * max_value ({2 * cfg.max_value})")
    return max_result


def apply_op(a: int, op: str, b: int) -> int:
    """The exact result of ``a op b`` (division only where it divides exactly)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not an exact division")
        return a // b
    raise ValueError(f"unknown operation {op!r}; expected one of {list(OPS)}")


def _check_meta(meta: dict) -> tuple[int, list[tuple[str, int]]]:
    if not isinstance(meta, dict) or "start" not in meta or "ops" not in meta:
        raise ValueError("meta must be a synthetic problem with fields 'start' and 'ops'")
    try:
        ops = [(str(op), int(n)) for op, n in meta["ops"]]
        start = int(meta["start"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta field 'ops' must be a list of [operator, number] pairs: {e}") from None
    return start, ops


def step_values(meta: dict) -> list[int]:
    """Values after each operation of a synthetic problem; the last one is the answer."""
    value, ops = _check_meta(meta)
    values = []
    for op, n in ops:
        value = apply_op(value, op, n)
        values.append(value)
    return values


def _operand_choices(cur: int, op: str, cfg: SyntheticConfig, max_result: int) -> list[int]:
    """Operands that keep the next value in 1..max_result (empty: the operation does not fit here)."""
    if op == "+":
        return list(range(1, min(cfg.max_value, max_result - cur) + 1))
    if op == "-":
        return list(range(1, min(cfg.max_value, cur - 1) + 1))
    if op == "*":
        return list(range(2, min(cfg.max_factor, max_result // cur) + 1))
    return [d for d in range(2, cfg.max_factor + 1) if cur % d == 0]


def _sample_problem(rng: random.Random, cfg: SyntheticConfig, max_result: int) -> dict:
    for _ in range(10_000):
        n_ops = rng.randint(cfg.min_steps, cfg.max_steps)
        cur = start = rng.randint(1, cfg.max_value)
        ops = []
        for _ in range(n_ops):
            fits = [(op, c) for op in cfg.operations if (c := _operand_choices(cur, op, cfg, max_result))]
            if not fits:
                break
            op, choices = rng.choice(fits)
            n = rng.choice(choices)
            ops.append([op, n])
            cur = apply_op(cur, op, n)
        if len(ops) == n_ops:
            return {"start": start, "ops": ops}
    raise ConfigError(
        f"SyntheticConfig.operations = {cfg.operations!r}: cannot build chains of the asked length"
    )


def _fill(text: str, name: tuple[str, str, str], obj: str, n: int) -> str:
    who, he, his = name
    him = "him" if he == "he" else "her"
    return text.format(He=he.capitalize(), him=him, His=his.capitalize(), his=his, obj=obj, n=n, name=who)


def render(meta: dict, rng: random.Random, phrasing: int = 1, step_styles: int = 1) -> tuple[str, list[str]]:
    """The word problem and the expert steps for a structured problem, phrasing and step styles drawn
    from ``rng``."""
    start, ops = _check_meta(meta)
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    sentences = [f"{name[0]} has {start} {obj}."]
    steps = []
    cur = start
    for i, (op, n) in enumerate(ops):
        question, step = TEMPLATES[op][rng.randrange(phrasing)]
        sentence = _fill(question, name, obj, n)
        sentences.append(sentence if i == 0 else f"Then {sentence[0].lower()}{sentence[1:]}")
        result = apply_op(cur, op, n)
        pre = _fill(step, name, obj, n)
        style = STEP_STYLES[0]
        if step_styles > 1:  # no draw otherwise, so step_styles=1 keeps the problems of earlier versions
            style = rng.choices(STEP_STYLES[:step_styles], weights=[2.0**-r for r in range(step_styles)])[0]
        steps.append(style.format(pre=pre, pre_l=pre[0].lower() + pre[1:], he=name[1], obj=obj,
                                  eq=f"{cur} {op} {n} = {result}"))
        cur = result
    sentences.append(f"How many {obj} does {name[0]} have now?")
    steps.append(f"The answer is {cur}.")
    return " ".join(sentences), steps


def generate(cfg: SyntheticConfig) -> list[Demonstration]:
    """``cfg.n_problems`` synthetic demonstrations, deterministic for ``cfg.seed``."""
    max_result = validate_config(cfg)
    rng = random.Random(cfg.seed)
    demos = []
    for i in range(cfg.n_problems):
        meta = _sample_problem(rng, cfg, max_result)
        prompt, steps = render(meta, rng, cfg.phrasing, cfg.step_styles)
        demos.append(
            Demonstration(
                id=f"synth-{cfg.seed}-{i}",
                prompt=prompt,
                steps=steps,
                answer=steps[-1].removeprefix("The answer is ").rstrip("."),
                source="synthetic",
                meta=meta,
            )
        )
    return demos


def _as_int(text: str) -> int | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def verify(meta: dict, steps: list[str]) -> int:
    """Index of the first wrong step of a chain for a synthetic problem, or -1 if it is all correct.

    Step k < len(ops) must hold exactly one equation ``a op b = c`` with the operation's operator, the
    previous value and the operation's operand (either order for + and *) and the right result, and
    no final answer. Step len(ops) must state "The answer is N" with the right N, and nothing may follow
    it. A chain that stops early gets ``len(steps)``: the first missing step is the first wrong one.
    """
    start, ops = _check_meta(meta)
    values = step_values(meta)
    prev = start
    for k, (op, n) in enumerate(ops):
        if k >= len(steps):
            return len(steps)
        eqs = EQ_RE.findall(steps[k])
        if ANSWER_RE.search(steps[k]) or len(eqs) != 1:
            return k
        a, o, b, c = (x if i == 1 else _as_int(x) for i, x in enumerate(eqs[0]))
        used, wanted = (a, b), (prev, n)
        if op in "+*":  # commutative: either order is right
            used, wanted = tuple(sorted(used, key=str)), tuple(sorted(wanted, key=str))
        if o != op or used != wanted or c != values[k]:
            return k
        prev = values[k]
    last = len(ops)
    if last >= len(steps):
        return len(steps)
    found = ANSWER_RE.findall(steps[last])
    if not found or _as_int(found[-1]) != prev:
        return last
    return last + 1 if len(steps) > last + 1 else -1


def is_correct_answer(meta: dict, text_or_answer: str | int) -> bool:
    """Whether a completion (its last "The answer is N") or a bare answer matches the problem's answer."""
    expected = step_values(meta)[-1] if meta.get("ops") else _check_meta(meta)[0]
    text = str(text_or_answer).strip()
    found = ANSWER_RE.findall(text)
    got = _as_int(found[-1]) if found else _as_int(text.rstrip("."))
    return got == expected
