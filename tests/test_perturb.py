"""Perturbations with a known first error, on synthetic and GSM8K chains, and ProcessBench rows."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from dense_irl.data.perturb import (
    KINDS,
    ROW_FIELDS,
    chain_steps,
    make_processbench,
    perturb,
    write_processbench,
)
from dense_irl.data.schema import Demonstration
from dense_irl.data.synthetic import EQ_RE, SyntheticConfig, apply_op, generate, verify

GSM8K = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
NOTE = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
TOKEN = re.compile(r"\d*\.?\d+|[-+*/()]")


def gsm8k_demo(i, question, answer):
    """A GSM8K row as a demonstration: one step per solution line, the ``####`` line as the answer."""
    lines = answer.split("\n")
    return Demonstration(f"gsm8k-{i}", question, lines[:-1], lines[-1].split("####")[1].strip(), "gsm8k")


ROWS = [  # verbatim GSM8K test rows, plus two made to test where kinds do not apply
    (
        "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
        "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
        "fresh duck egg. How much in dollars does she make every day at the farmers' market?",
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18",
    ),
    (
        "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in "
        "repairs.  This increased the value of the house by 150%.  How much profit did he make?",
        "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
        "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
        "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
        "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000",
    ),
    (
        "James decides to run 3 sprints 3 times a week.  He runs 60 meters each sprint.  How many total "
        "meters does he run a week?",
        "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540",
    ),
    (
        "Every day, Wendi feeds each of her chickens three cups of mixed chicken feed, containing seeds, "
        "mealworms and vegetables to help keep them healthy.  She gives the chickens their feed in three "
        "separate meals. In the morning, she gives her flock of chickens 15 cups of feed.  In the afternoon, "
        "she gives her chickens another 25 cups of feed.  How many cups of feed does she need to give her "
        "chickens in the final meal of the day if the size of Wendi's flock is 20 chickens?",
        "If each chicken eats 3 cups of feed per day, then for 20 chickens they would need 3*20=<<3*20=60>>60 "
        "cups of feed per day.\nIf she feeds the flock 15 cups of feed in the morning, and 25 cups in the "
        "afternoon, then the final meal would require 60-15-25=<<60-15-25=20>>20 cups of chicken feed.\n#### 20",
    ),
    (
        "Ann has 3 boxes of 4 apples and 5 bags of 6 pears. How many pears does she have?",
        "Ann has 3*4=<<3*4=12>>12 apples.\nShe has 5*6=<<5*6=30>>30 pears.\n#### 30",
    ),
    ("Tim has 2 apples and buys 3 more. How many now?", "He has 2 and 3 more, so five apples.\n#### 5"),
]
DEMOS = [gsm8k_demo(i, q, a) for i, (q, a) in enumerate(ROWS)]
WITH_NOTES = DEMOS[:5]


def note(step):
    m = NOTE.search(step)
    return m.group(1), float(m.group(2))


def split_expr(expr):
    toks = TOKEN.findall(expr)
    return [t for t in toks if t in "+-*/()"], [float(t) for t in toks if t not in "+-*/()"]


def calc(expr):
    return eval(expr, {"__builtins__": {}})  # test-only: a calculator note from this file


def runs(demo, kind, n=12):
    """(original chain, perturbed steps, first error) for n rng seeds where ``kind`` applies."""
    orig = chain_steps(demo)
    outs = [perturb(demo, kind, random.Random(seed)) for seed in range(n)]
    return [(orig, *out) for out in outs if out is not None]


# ------------------------------------------------------------------------------------------- synthetic
def synthetic_demos():
    demos = []
    for seed in range(4):  # seeds 2 and 3 with the step styles, so equations sit mid-sentence too
        cfg = SyntheticConfig(n_problems=100, min_steps=1, max_steps=5, operations=["+", "-", "*", "/"],
                              step_styles=1 + 3 * (seed >= 2), seed=seed)
        demos += generate(cfg)
    return demos


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_perturbation_index_matches_the_verifier(kind):
    demos, applied = synthetic_demos(), 0
    for seed, d in enumerate(demos):
        out = perturb(d, kind, random.Random(seed))
        if out is None:
            continue
        steps, k = out
        applied += 1
        assert steps != d.steps and 0 <= k < len(steps)
        assert verify(d.meta, steps) == k, (kind, d.steps, steps, k)
        assert verify(d.meta, d.steps) == -1  # the demonstration itself was not touched
    assert applied >= 0.95 * len(demos), f"{kind} applied to only {applied} of {len(demos)} chains"


def test_synthetic_perturbations_change_one_thing():
    for seed, d in enumerate(synthetic_demos()[:150]):
        rng = random.Random(seed)
        for kind in ("wrong_result", "flipped_operator", "wrong_operand"):
            out = perturb(d, kind, rng)
            if out is None:
                continue
            steps, k = out
            assert steps[:k] == d.steps[:k] and len(steps) == len(d.steps)
            # The wrong value is carried forward: every later step is right given the one before it.
            value = int(EQ_RE.findall(steps[k])[0][3])
            for j in range(k + 1, len(steps) - 1):
                a3, o3, b3, c3 = EQ_RE.findall(steps[j])[0]
                assert int(a3) == value and int(c3) == apply_op(value, o3, int(b3))
                value = int(c3)
            assert steps[-1] == f"The answer is {value}."
            (a, o, b, c), (a2, o2, b2, c2) = EQ_RE.findall(d.steps[k])[0], EQ_RE.findall(steps[k])[0]
            assert EQ_RE.sub("", steps[k]) == EQ_RE.sub("", d.steps[k])  # the words are kept
            if kind == "wrong_result":
                assert (a, o, b) == (a2, o2, b2) and c != c2
            else:
                assert int(c2) == apply_op(int(a2), o2, int(b2))  # result recomputed consistently
                changed = [x != y for x, y in ((a, a2), (o, o2), (b, b2))]
                assert changed == [False, True, False] if kind == "flipped_operator" else sum(changed) == 1
        steps, k = perturb(d, "dropped_step", rng)
        assert steps == d.steps[:k] + d.steps[k + 1 :] and k < len(d.steps) - 1
        steps, k = perturb(d, "swapped_steps", rng)
        assert steps == d.steps[:k] + [d.steps[k + 1], d.steps[k]] + d.steps[k + 2 :]
        steps, k = perturb(d, "wrong_final_answer", rng)
        assert k == len(d.steps) - 1 and steps[:-1] == d.steps[:-1] and steps[-1] != d.steps[-1]


def test_flipped_operator_changes_the_result():
    d = Demonstration(
        "s", "Sam has 2 coins. He finds 2 more.", ["He finds 2 more: 2 + 2 = 4.", "The answer is 4."]
    )
    d.meta = {"start": 2, "ops": [["+", 2]]}
    for seed in range(20):  # 2 * 2 would be right by accident; only 2 - 2 = 0 is a real error
        assert perturb(d, "flipped_operator", random.Random(seed)) == (
            ["He finds 2 more: 2 - 2 = 0.", "The answer is 0."],
            0,
        )


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown perturbation kind 'typo'"):
        perturb(DEMOS[0], "typo", random.Random(0))


# --------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_chain_gets_an_answer_step():
    assert chain_steps(DEMOS[0])[-1] == "The answer is 18."
    assert len(chain_steps(DEMOS[1])) == 5
    with_hashes = Demonstration("x", "q", ["a 1+1=<<1+1=2>>2", "#### 2"], None, "gsm8k")
    assert chain_steps(with_hashes) == ["a 1+1=<<1+1=2>>2", "The answer is 2."]


def test_gsm8k_wrong_result():
    for d in WITH_NOTES:
        for orig, steps, k in runs(d, "wrong_result"):
            assert k < len(orig) - 1 and steps[:k] == orig[:k] and steps[k + 1 :] == orig[k + 1 :]
            (expr, old), (expr2, new) = note(orig[k]), note(steps[k])
            assert expr2 == expr and new != old
            shown = re.search(r">>\$?([\d,.]+)", steps[k]).group(1).replace(",", "")
            assert float(shown) == new  # the visible number follows the note


@pytest.mark.parametrize("kind", ["flipped_operator", "wrong_operand"])
def test_gsm8k_recomputed_edits(kind):
    for d in WITH_NOTES:
        for orig, steps, k in runs(d, kind):
            assert steps[:k] == orig[:k] and steps[k + 1 :] == orig[k + 1 :]
            (expr, old), (expr2, new) = note(orig[k]), note(steps[k])
            assert calc(expr2) == pytest.approx(new) and new != old
            (ops, nums), (ops2, nums2) = split_expr(expr), split_expr(expr2)
            same, other = (nums, nums2), (ops, ops2)
            if kind == "wrong_operand":
                same, other = other, same
            assert same[0] == same[1] and sum(x != y for x, y in zip(*other)) == 1


def test_gsm8k_edits_never_keep_the_result():
    d = Demonstration("z", "Two packs of 2 pens.", ["He has 2*2=<<2*2=4>>4 pens."], "4", "gsm8k")
    for seed in range(20):  # 2+2 would be right by accident
        steps, k = perturb(d, "flipped_operator", random.Random(seed))
        assert note(steps[0])[1] != 4 and k == 0


def test_gsm8k_visible_expression_follows_the_note():
    for _, steps, k in runs(DEMOS[0], "flipped_operator", n=30):
        ops = split_expr(note(steps[k])[0])[0]
        assert re.findall(r"[-+*/]", steps[k][: steps[k].index("<<")]) == ops
    for _, steps, k in runs(DEMOS[1], "wrong_operand", n=30):
        nums = split_expr(note(steps[k])[0])[1]
        shown = re.findall(r"\d[\d,]*(?:\.\d+)?", steps[k][: steps[k].index("<<")])[-len(nums) :]
        assert [float(x.replace(",", "")) for x in shown] == nums
        assert all("," in x for x in shown if float(x.replace(",", "")) >= 1000)  # commas kept


@pytest.mark.parametrize("kind", ["dropped_step", "swapped_steps"])
def test_gsm8k_dependent_steps(kind):
    for d in WITH_NOTES:
        for orig, steps, k in runs(d, kind):
            result = note(orig[k])[1]
            assert f"{result:g}" in orig[k + 1].replace(",", "")  # step k+1 uses step k's result
            if kind == "dropped_step":
                assert steps == orig[:k] + orig[k + 1 :] and k < len(orig) - 1
            else:
                assert steps == orig[:k] + [orig[k + 1], orig[k]] + orig[k + 2 :]
    # Ann's two steps are independent: only the last one (that the answer uses) can go or move.
    assert {k for _, _, k in runs(DEMOS[4], kind)} == {1}


def test_gsm8k_wrong_final_answer():
    for d in DEMOS:
        for orig, steps, k in runs(d, "wrong_final_answer"):
            assert k == len(orig) - 1 and steps[:-1] == orig[:-1]
            assert steps[-1].startswith("The answer is ") and steps[-1] != f"The answer is {d.answer}."


def test_gsm8k_kinds_that_do_not_apply():
    no_notes = DEMOS[5]
    for kind in KINDS[:-1]:
        assert perturb(no_notes, kind, random.Random(0)) is None, kind
    no_answer = Demonstration("y", "q", ["It is 1+1=<<1+1=2>>2."], None, "gsm8k")
    assert perturb(no_answer, "wrong_final_answer", random.Random(0)) is None


def read_gsm8k_test(n):
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:n]]
    return [gsm8k_demo(i, r["question"], r["answer"]) for i, r in enumerate(rows)]


@pytest.mark.skipif(not GSM8K.is_dir(), reason=f"GSM8K data folder not found at {GSM8K}")
def test_real_gsm8k_rows():
    demos = read_gsm8k_test(200)
    for kind in KINDS:
        applied = 0
        for seed, d in enumerate(demos):
            out = perturb(d, kind, random.Random(seed))
            if out is not None:
                steps, k = out
                applied += 1
                assert 0 <= k < len(steps) and steps != chain_steps(d), (kind, d.id)
        assert applied >= 0.8 * len(demos), f"{kind} applied to {applied} of {len(demos)}"
    rows = make_processbench(demos, seed=1)
    assert all(-1 <= r["label"] < len(r["steps"]) for r in rows)
    assert set(Counter(r["error_type"] for r in rows)) == {"none", *KINDS}


# -------------------------------------------------------------------------------------- ProcessBench
def test_make_processbench_ratios_and_format():
    demos = synthetic_demos()
    by_id = {d.id: d for d in demos}
    rows = make_processbench(demos, seed=0, correct_fraction=0.5)
    assert len(rows) == len(demos)
    counts = Counter(r["error_type"] for r in rows)
    assert counts["none"] == len(demos) // 2
    per_kind = [counts[k] for k in KINDS]
    assert max(per_kind) - min(per_kind) <= 1 and sum(per_kind) == len(demos) // 2
    for row, d in zip(rows, demos):
        assert tuple(row) == ROW_FIELDS and row["problem"] == d.prompt and row["source"] == "synthetic"
        assert row["id"].startswith(d.id)
        changes_answer = {"wrong_final_answer", "wrong_result", "flipped_operator", "wrong_operand"}
        assert row["final_answer_correct"] is (row["error_type"] not in changes_answer)  # errors carry forward
        assert verify(by_id[d.id].meta, row["steps"]) == row["label"]
        assert (row["label"] == -1) == (row["error_type"] == "none")
        if row["label"] == -1:
            assert row["steps"] == d.steps
    assert rows == make_processbench(demos, seed=0)
    assert rows != make_processbench(demos, seed=1)


def test_make_processbench_options_and_errors():
    demos = synthetic_demos()[:60] + DEMOS
    assert all(r["label"] == -1 for r in make_processbench(demos, correct_fraction=1.0))
    none_left = make_processbench(demos, correct_fraction=0.0)
    # Only the GSM8K row without notes or dependent steps may stay correct; it takes wrong_final_answer.
    assert all(r["label"] >= 0 for r in none_left)
    only = make_processbench(demos, kinds=("wrong_result",), correct_fraction=0.0)
    assert Counter(r["error_type"] for r in only) == {"wrong_result": len(demos) - 1, "none": 1}
    for bad in ({"correct_fraction": 1.5}, {"kinds": ("nope",)}, {"kinds": ()}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_processbench(demos, **bad)


def test_write_processbench(tmp_path):
    rows = make_processbench(DEMOS, seed=2)
    path = tmp_path / "out" / "processbench.jsonl"
    write_processbench(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    broken = [dict(rows[0])]
    del broken[0]["label"]
    with pytest.raises(ValueError, match="field 'label'"):
        write_processbench(broken, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()
