"""Property tests (hypothesis) of every reader and of config overrides: any input ends in a result or in one
DataError / ConfigError naming the file, the line and the field, never another exception; and converting
then reading back keeps every field."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="make test installs hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dense_irl.config import load_config  # noqa: E402
from dense_irl.data.readers import FORMATS, convert, load_demonstrations  # noqa: E402
from dense_irl.data.schema import Demonstration  # noqa: E402
from dense_irl.errors import ConfigError, DataError  # noqa: E402
from dense_irl.runtime.loop_config import LoopConfig  # noqa: E402

# A fast run in `make test`; `make fuzz` sets DENSE_IRL_FUZZ_EXAMPLES for the long one.
FUZZ = settings(max_examples=int(os.environ.get("DENSE_IRL_FUZZ_EXAMPLES", "30")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
KEYS = ["question", "answer", "problem", "solution", "prompt", "steps", "completions", "labels", "label", "id",
        "meta", "source", "final_answer_correct", "text"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
# Rows that look like the formats: their keys, with any values (and now and then a stray key).
rows = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=6)


def _read(lines: list[bytes], fmt: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            demos, skipped = load_demonstrations(path, fmt)
        except DataError as e:
            n_lines = path.read_bytes().count(b"\n") + 1
            assert str(path) in str(e) and (e.line is None or 1 <= e.line <= n_lines)
            return None
        # (skipped counts rows dropped only with skip_bad)
        assert skipped == 0 and all(isinstance(x, Demonstration) and x.steps for x in demos)
        return demos


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "parquet"])
@FUZZ
@given(data=st.lists(rows, max_size=5))
def test_any_json_rows_read_or_fail_with_a_data_error(fmt, data):
    _read([json.dumps(r, allow_nan=True).encode() for r in data], fmt)


@FUZZ
@given(lines=st.lists(st.binary(max_size=40), max_size=5))
def test_any_bytes_read_or_fail_with_a_data_error(lines):
    _read(lines, "auto")


@FUZZ
@given(prompt=st.text(min_size=1, max_size=40).filter(str.strip),
       steps=st.lists(st.text(min_size=1, max_size=30).filter(str.strip), min_size=1, max_size=4),
       answer=st.none() | st.text(max_size=10), suffix=st.sampled_from([".jsonl", ".parquet"]))
def test_convert_then_read_keeps_every_field(prompt, steps, answer, suffix):
    steps = [s.strip() for s in steps]
    row = {"id": "r1", "prompt": prompt, "steps": steps, "answer": answer, "source": "fuzz", "meta": {"k": [1]}}
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.jsonl", Path(d) / f"out{suffix}"
        src.write_text(json.dumps(row) + "\n")
        try:
            convert(src, out)
        except DataError:
            return  # (a prompt or step the reader rejects, e.g. one with a NUL, is named, not converted)
        [back], _ = load_demonstrations(out)
        # Answers are read stripped, and a blank one is no answer.
        assert (back.id, back.prompt, back.steps, back.answer, back.source, back.meta) == (
            "r1", prompt, steps, (answer or "").strip() or None, "fuzz", {"k": [1]})


KEYS_CFG = ["iterations", "seed", "reward.lr", "rollout.temperature", "model.name", "serve.publish_url", "minutes",
            "rl.kl_coef", "data.synthetic.n_problems", "nope", "reward", "learner.backend", "reward.objective"]


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS_CFG) | st.text(max_size=12),
                                    st.text(max_size=12) | st.integers().map(str) | st.floats().map(str)),
                          max_size=4))
def test_any_dotted_overrides_load_or_fail_with_a_config_error(overrides):
    try:
        load_config(LoopConfig, None, [f"--{k}={v}" for k, v in overrides])
    except ConfigError:
        pass


@FUZZ
@given(doc=json_values)
def test_any_yaml_config_loads_or_fails_with_a_config_error(doc):
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_config(LoopConfig, path, [])
        except ConfigError as e:
            assert str(path) in str(e) or "config" in str(e).lower()
