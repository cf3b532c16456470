"""The synthetic arithmetic task: generation, config validation and the exact step verifier."""

import re

import pytest

from dense_irl.data.synthetic import (
    EQ_RE,
    SyntheticConfig,
    apply_op,
    generate,
    is_correct_answer,
    step_values,
    verify,
)

ALL_OPS = ["+", "-", "*", "/"]


def test_generate_is_deterministic_and_seeds_differ():
    a = generate(SyntheticConfig(n_problems=50, seed=3))
    b = generate(SyntheticConfig(n_problems=50, seed=3))
    c = generate(SyntheticConfig(n_problems=50, seed=4))
    assert [d.to_row() for d in a] == [d.to_row() for d in b]
    assert [d.prompt for d in a] != [d.prompt for d in c]
    assert [d.meta for d in a] != [d.meta for d in c]
    assert len({d.prompt.split()[0] for d in a}) > 3  # names vary
    assert [d.id for d in a[:2]] == ["synth-3-0", "synth-3-1"]


def test_demonstration_format():
    cfg = SyntheticConfig(n_problems=300, min_steps=1, max_steps=5, operations=ALL_OPS, seed=1)
    for d in generate(cfg):
        ops = d.meta["ops"]
        assert set(d.meta) == {"start", "ops"} and 1 <= len(ops) <= 5
        assert d.source == "synthetic" and len(d.steps) == len(ops) + 1
        assert d.prompt.startswith(re.match(r"\w+", d.prompt).group() + f" has {d.meta['start']} ")
        assert d.prompt.endswith("have now?")
        values = step_values(d.meta)
        assert all(1 <= v <= 10 * cfg.max_value for v in values)
        assert 1 <= d.meta["start"] <= cfg.max_value
        prev = d.meta["start"]
        for step, (op, n), value in zip(d.steps, ops, values):
            assert step.endswith(f": {prev} {op} {n} = {value}.")
            assert (2 <= n <= cfg.max_factor) if op in "*/" else (1 <= n <= cfg.max_value)
            prev = value
        assert d.steps[-1] == f"The answer is {values[-1]}." and d.answer == str(values[-1])
    assert {op for d in generate(cfg) for op, _ in d.meta["ops"]} == set(ALL_OPS)


def test_example_problem_reads_as_intended():
    d = generate(SyntheticConfig(n_problems=1, min_steps=3, max_steps=3, phrasing=1, seed=0))[0]
    sentences = d.prompt.split(". ")
    assert len(sentences) == 5 and sentences[2].startswith("Then ")
    assert re.fullmatch(r"(He|She|The number) .+: \d+ [-+*] \d+ = \d+\.", d.steps[0])


def test_phrasing_controls_template_variety():
    def prefixes(phrasing):
        demos = generate(SyntheticConfig(n_problems=200, phrasing=phrasing, seed=0))
        return {(op, s.split(":")[0].split()[1]) for d in demos for s, (op, _) in zip(d.steps, d.meta["ops"])}

    regular, varied = prefixes(1), prefixes(3)
    assert len({p for p in regular if p[0] == "+"}) == 1
    assert len({p for p in varied if p[0] == "+"}) == 3


def test_step_styles_vary_the_writing_not_the_equation():
    regular = generate(SyntheticConfig(n_problems=300, seed=5))
    styled = generate(SyntheticConfig(n_problems=300, step_styles=4, seed=5))
    # step_styles=1 draws nothing, so it keeps the problems (and steps) of the task without styles
    assert [d.steps for d in regular] == [d.steps for d in generate(SyntheticConfig(n_problems=300, seed=5))]
    body = [s for d in styled for s in d.steps[:-1]]
    counts = [sum(bool(re.match(p, s)) for s in body) for p in (r".+: \d", r"\d+ \S \d+ = \d+, because ",
                                                               r".+, so (he|she) has \d", r"Now there are \d")]
    assert sum(counts) == len(body)
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0  # weights 2^-r: the first style is the common one
    for d in styled:
        assert verify(d.meta, d.steps) == -1, d.steps
        assert len(EQ_RE.findall(" ".join(d.steps))) == len(d.meta["ops"])


def test_max_result_bounds_every_value():
    cfg = SyntheticConfig(n_problems=200, max_value=10, max_result=30, operations=["+", "*"], seed=2)
    assert max(max(step_values(d.meta)) for d in generate(cfg)) <= 30


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_steps", {"min_steps": 5, "max_steps": 3}),
        ("min_steps", {"min_steps": 0}),
        ("n_problems", {"n_problems": 0}),
        ("max_value", {"max_value": 1}),
        ("max_factor", {"max_factor": 1}),
        ("phrasing", {"phrasing": 0}),
        ("phrasing", {"phrasing": 9}),
        ("step_styles", {"step_styles": 0}),
        ("step_styles", {"step_styles": 5}),
        ("operations", {"operations": ["+", "%"]}),
        ("operations", {"operations": []}),
        ("max_result", {"max_result": 10}),
        ("seed", {"seed": "zero"}),
    ],
)
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field}\b"):
        generate(SyntheticConfig(**{"n_problems": 2, **kwargs}))


def test_impossible_operations_raise():
    # Only divisions, 6 of them by 2..2, from a start of at most 2: no chain exists.
    cfg = SyntheticConfig(n_problems=1, min_steps=6, max_steps=6, max_value=2, max_factor=2, operations=["/"])
    with pytest.raises(ValueError, match="operations"):
        generate(cfg)


def test_apply_op():
    assert [apply_op(12, o, 3) for o in "+-*/"] == [15, 9, 36, 4]
    with pytest.raises(ValueError, match="exact"):
        apply_op(7, "/", 2)
    with pytest.raises(ValueError, match="unknown operation"):
        apply_op(7, "^", 2)


def test_verify_accepts_every_expert_chain():
    for seed in range(3):
        cfg = SyntheticConfig(n_problems=200, min_steps=1, max_steps=5, operations=ALL_OPS, seed=seed)
        for d in generate(cfg):
            assert verify(d.meta, d.steps) == -1, d.steps


META = {"start": 7, "ops": [["+", 5], ["-", 3], ["*", 2]]}
GOOD = [
    "He finds 5 more: 7 + 5 = 12.",
    "He loses 3: 12 - 3 = 9.",
    "It doubles: 9 * 2 = 18.",
    "The answer is 18.",
]


def _with(k, text):
    return GOOD[:k] + [text] + GOOD[k + 1 :]


@pytest.mark.parametrize(
    "steps, expected",
    [
        (GOOD, -1),
        (_with(0, "He finds 5 more: 5 + 7 = 12."), -1),  # + and * are commutative
        (_with(2, "It doubles: 2 * 9 = 18."), -1),
        (_with(0, "He finds 5 more: 7 + 5 = 13."), 0),  # wrong arithmetic
        (_with(1, "He loses 3: 12 - 4 = 8."), 1),  # wrong operand
        (_with(1, "He loses 3: 11 - 3 = 8."), 1),  # wrong previous value
        (_with(1, "He loses 3: 3 - 12 = -9."), 1),  # - is not commutative
        (_with(1, "He loses 3: 3 - 12 = 9."), 1),
        (_with(1, "He loses 3: 12 + 3 = 15."), 1),  # wrong operator
        (_with(2, "It doubles: 9 * 2 = 18.0"), -1),
        (_with(2, "It doubles: 9 / 2 = 4.5."), 2),
        (_with(1, "He loses 3 and has 9 left."), 1),  # no equation: cannot be checked
        (_with(1, "He loses 3: 12 - 3 = 9, 9 - 1 = 8."), 1),  # two equations in one step
        (_with(3, "The answer is 17."), 3),
        (_with(3, "So he has 18 marbles."), 3),
        (GOOD[:2] + ["The answer is 18."], 2),  # answer too early
        (_with(2, "It doubles: 9 * 2 = 18. The answer is 18."), 2),
        (GOOD[:3], 3),  # stops before its answer: first missing step
        ([], 0),
        (GOOD + ["The answer is 18."], 4),  # nothing may follow the answer
    ],
)
def test_verify_finds_the_first_wrong_step(steps, expected):
    assert verify(META, steps) == expected


def test_verify_rejects_a_bad_meta():
    with pytest.raises(ValueError, match="start"):
        verify({"ops": []}, GOOD)
    with pytest.raises(ValueError, match="ops"):
        verify({"start": 1, "ops": [["+"]]}, GOOD)


def test_equation_regex_reads_the_step_equation():
    assert EQ_RE.findall("He finds 5 more: 7 + 5 = 12.") == [("7", "+", "5", "12")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("He finds 5 more: 7 + 5 = 12.\nThe answer is 18.", True),
        ("The answer is 12. No wait, the answer is 18.", True),
        ("The answer is 17.", False),
        ("18", True),
        (18, True),
        ("eighteen", False),
        ("", False),
    ],
)
def test_is_correct_answer(text, expected):
    assert is_correct_answer(META, text) is expected
