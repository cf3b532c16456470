"""The benchmark runner's README table and the cost benchmark's fits, on results written here (no benchmark runs)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_slope_recovers_the_exponent_of_a_power_law():
    cost = _module("cost_bench")
    xs = [10, 100, 1000, 10000]
    assert cost.slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert cost.slope(xs, [7.0] * 4) == pytest.approx(0.0)


def test_random_tree_has_the_nodes_asked_for_and_backs_up():
    cost = _module("cost_bench")
    from dense_irl.algo.advantages import soft_backup

    chains, rewards = cost.random_tree(500, depth=6)
    nodes = {tuple(c[: k + 1]) for c in chains for k in range(len(c))}
    assert 500 <= len(nodes) < 500 + 6  # the last chain may overshoot by its own new prefixes
    assert len({c[0] for c in chains}) <= 4  # the first step is always one of the shared ones
    out = soft_backup(chains, rewards)
    assert [len(a) for a in out["advantages"]] == [len(c) for c in chains]


def test_table_rows_read_every_result_format(tmp_path, monkeypatch):
    run_all = _module("run_all")
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    (tmp_path / "serve_bench.json").write_text(json.dumps({
        "command": "python bench/serve_bench.py", "model": "random tiny", "chains": "synthetic", "clients": [8, 32],
        "by_clients": {"8": {"ratios": {"a": 2.0, "b": 3.0}, "share_of_raw": 0.5},
                       "32": {"ratios": {"a": 9.0, "b": 4.5}, "share_of_raw": 0.41}}}))
    (tmp_path / "serve_bench_smollm2.json").write_text(json.dumps({
        "command": "sb", "model": "random smollm2", "chains": "gsm8k", "clients": [32], "prefix_token_ratio": 3.8,
        "by_clients": {"32": {"ratios": {"a": 2.5}, "share_of_raw": 1.0}}}))
    (tmp_path / "serve_bench_old.json").write_text(json.dumps({"ratios": {"a": 1.0}}))  # an older format: skipped
    (tmp_path / "rollout_smollm2.json").write_text(json.dumps({
        "command": "rb", "model": "smollm2", "rows": [{"batch": 1, "vllm_over_hf": 0.8},
                                                      {"batch": 32, "vllm_over_hf": 3.2}]}))
    (tmp_path / "cost.json").write_text(json.dumps({
        "command": "cb", "tree": {"slope": 1.04, "rows": [{"nodes": 100}, {"nodes": 1_000_000}]},
        "serve_memory": {"slope": 0.01, "rows": [{"clients": 1, "rss_bytes": 4e8}, {"clients": 256, "rss_bytes": 5e8}]},
        "iteration": {"samples per prompt": {"slope": 0.6}}}))
    rows = "\n".join(run_all.table_rows())
    assert "| 4.5x |" in rows and "| 41% |" in rows  # the stronger naive server, at 32+ clients only
    assert "| 2.5x (tokens per prefix / per chain: 3.80x) |" in rows
    assert "0.80x, 3.20x" in rows and ">= 3x at 32" in rows
    assert "up to 1,000,000" in rows and "| 1.04 |" in rows
    assert "0.010 (500 MB at most)" in rows and "iteration time vs samples per prompt" in rows
