"""``make bench``: every benchmark, one after another, then the README's benchmark table from their results.

    python bench/run_all.py [--full [--real-only]] [--only learner,scoring,serving,iteration,cost,rollout] [--table-only]

Each benchmark runs in its own process and measures its baseline in the same run (the ratios are what
count; absolute times are context, and this machine may be shared). The small presets (the tiny model)
take 20 s to 11 minutes each (about 30 in all, the three serving runs 22 of them); ``--full`` adds the
real-model sizes (SmolLM2-135M: about 45 minutes more on 2 cores; ``--real-only`` runs those alone). The
rollout benchmark needs vLLM (``.venv-vllm``; ``make bench`` builds it) and is skipped, with a note, without it. The table is written from every ``bench/results/*.json`` present, so a ``--full``
row stays until the next ``--full`` run replaces it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def jobs(full: bool) -> list[tuple[str, list[str]]]:
    """(benchmark, command) in the order they run."""
    py = sys.executable
    out = [
        ("learner", [py, "bench/learner_bench.py", "--model", "tiny", "--batch", "32", "--steps", "4"]),
        ("learner", [py, "bench/learner_bench.py", "--model", "tiny", "--batch", "32", "--steps", "4",
                     "--backend", "deepspeed"]),
        ("scoring", [py, "bench/scoring_bench.py", "--model", "tiny", "--chains", "32"]),
        ("serving", [py, "bench/serve_bench.py", "--seconds", "6"]),
        ("serving", [py, "bench/serve_bench.py", "--seconds", "6", "--clients", "8,32,128", "--ingress", "proxy",
                     "--out", "bench/results/serve_bench_proxy.md"]),
        ("serving", [py, "bench/serve_bench.py", "--seconds", "6", "--clients", "8,32,128", "--chains-per-request",
                     "8", "--out", "bench/results/serve_bench_batched.md"]),
        ("iteration", [py, "bench/iteration_bench.py"]),
        ("cost", [py, "bench/cost_bench.py", "--parts", "tree,serve_memory"]),
    ]
    if VLLM_PYTHON.is_file():
        out.append(("rollout", [str(VLLM_PYTHON), "bench/rollout_bench.py"]))
    if full:
        out += [
            ("learner", [py, "bench/learner_bench.py", "--model", "smollm2", "--batch", "8", "--steps", "2"]),
            ("learner", [py, "bench/learner_bench.py", "--model", "smollm2", "--batch", "8", "--steps", "2",
                         "--backend", "deepspeed"]),
            ("scoring", [py, "bench/scoring_bench.py", "--model", "smollm2", "--chains", "8", "--rounds", "2"]),
            # a full batch of 32 GSM8K chains takes ~17 s on 2 cores: windows of a minute
            ("serving", [py, "bench/serve_bench.py", "--model", "smollm2", "--clients", "8,32", "--rounds", "1",
                         "--seconds", "60", "--warmup", "20", "--out", "bench/results/serve_bench_smollm2.md"]),
            ("cost", [py, "bench/cost_bench.py", "--parts", "iteration", "--out", "bench/results/cost_iteration"]),
        ]
        if VLLM_PYTHON.is_file():
            out.append(("rollout", [str(VLLM_PYTHON), "bench/rollout_bench.py", "--model", "smollm2",
                                    "--temperature", "0.7"]))
    return out


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def table_rows() -> list[str]:
    """One Markdown row per measured figure: benchmark, what, measured, goal, command."""
    rows = []
    for p in sorted(RESULTS.glob("learner_*.json")):
        r = json.loads(p.read_text())
        name = f"learner, {r['model']}, {r['backend']}"
        rat, sft = r["ratios"], r["rows"].get("sft", {})
        if "sft_over_bare" in rat:
            rows.append((name, "SFT step / bare transformers step (s)", f"{rat['sft_over_bare']:.2f}", "<= 1.2",
                         r["command"]))
        if "reward_over_sft" in rat:
            rows.append((name, "reward step / SFT step (s)", f"{rat['reward_over_sft']:.2f}", "<= 2.5", r["command"]))
        if sft:
            rows.append((name, "SFT step: tokens/s, MFU", f"{sft['tokens_per_s']:.0f}, {100 * sft['mfu']:.0f}% of "
                         f"{r['matmul_peak_flop_per_s'] / 1e9:.0f} GFLOP/s", "report", r["command"]))
    for p in sorted(RESULTS.glob("scoring_*.json")):
        r = json.loads(p.read_text())
        name = f"scoring, {r['model']}"
        steps = ", ".join(f"{x['steps']}" for x in r["rows"])
        rows.append((name, f"reward-model forward / backbone forward ({steps} steps)",
                     ", ".join(f"{x['forward_over_backbone']:.2f}" for x in r["rows"]), "<= 1.10", r["command"]))
        rows.append((name, f"one pass per prefix / one per chain ({steps} steps)", ", ".join(f"{x['prefix_over_chain']:.1f}x" for x in r["rows"]), "report",
                     r["command"]))
    for p in sorted(RESULTS.glob("serve_bench*.json")):
        serve = json.loads(p.read_text())
        if "by_clients" not in serve:  # an older run's format
            continue
        many = {c: r for c, r in serve["by_clients"].items() if int(c) >= 32}
        if not many:
            continue
        counts = ", ".join(many)
        per = serve.get("chains_per_request", 1)
        counts += " clients" + (f" ({per} chains a request)" if per > 1 else "")
        ratios = [min(r["ratios"].values()) for r in many.values()]  # against the stronger naive server
        name = f"serving, {serve['model']}, {serve.get('ingress', 'proxy')}"
        measured = ", ".join(f"{x:.1f}x" if x != float("inf") else "no naive request finished" for x in ratios)
        if serve.get("prefix_token_ratio"):  # the compute-bound limit of the ratio on these chains
            measured += f" (tokens per prefix / per chain: {serve['prefix_token_ratio']:.2f}x)"
        rows.append((name, f"Serve app / stronger naive per-prefix server, chains/s at {counts}", measured, ">= 4x",
                     serve["command"]))
        rows.append((name, f"Serve app / raw batched forward (no HTTP), chains/s at "
                     f"{counts}", ", ".join(f"{100 * r['share_of_raw']:.0f}%" for r in many.values()),
                     ">= 80% (SmolLM2)", serve["command"]))
    it = _load("iteration.json")
    if it:
        for r in it["results"]:
            rows.append((f"iteration, {r['label']}", "the rest (Ray, serialisation, waiting) / iteration",
                         f"{100 * r['rest_share']:.1f}% of {r['total_s']:.1f} s", "<= 10%", it["command"]))
    for p in sorted(RESULTS.glob("rollout_*.json")):
        r = json.loads(p.read_text())
        rows.append((f"rollouts, {r['model']}", "vllm engine / hf engine, tokens/s at "
                     + ", ".join(str(x["batch"]) for x in r["rows"]) + " chains per call",
                     ", ".join(f"{x['vllm_over_hf']:.2f}x" for x in r["rows"]), ">= 3x at 32", r["command"]))
    for p in sorted(RESULTS.glob("cost*.json")):
        r = json.loads(p.read_text())
        if "tree" in r:
            rows.append(("cost growth", f"step-tree backup time vs nodes (up to {r['tree']['rows'][-1]['nodes']:,}), "
                         "log-log slope", f"{r['tree']['slope']:.2f}", "1 (linear)", r["command"]))
        if "serve_memory" in r:
            m = r["serve_memory"]
            rows.append(("cost growth", f"scoring replica memory vs clients (1-{m['rows'][-1]['clients']}), "
                         "log-log slope", f"{m['slope']:.3f} ({m['rows'][-1]['rss_bytes'] / 1e6:.0f} MB at most)",
                         "report", r["command"]))
        for name, s in r.get("iteration", {}).items():
            rows.append(("cost growth", f"iteration time vs {name}, log-log slope", f"{s['slope']:.2f}", "report",
                         r["command"]))
    return [f"| {a} | {b} | {c} | {d} | `{e}` |" for a, b, c, d, e in rows]


def write_table() -> None:
    """Replace the README's table between its markers."""
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block for the benchmark table")
    table = "\n".join(["| benchmark | figure | measured | goal | command |", "|---|---|---:|---|---|",
                       *table_rows()])
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    from dense_irl.io import atomic_write_text

    atomic_write_text(README, f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also the real-model sizes (SmolLM2-135M)")
    ap.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    ap.add_argument("--real-only", action="store_true", help="with --full: the real-model sizes only (the tiny "
                    "model's results stay)")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the README table from the results")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    failed = []
    if not VLLM_PYTHON.is_file() and not args.table_only:
        print("note: rollout benchmark skipped: no .venv-vllm (make test-vllm builds it)", flush=True)
    todo = [] if args.table_only else jobs(args.full)
    if args.real_only:
        todo = [j for j in todo if j not in jobs(False)]
    for name, cmd in todo:
        if only is not None and name not in only:
            continue
        print(f"== {name}: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
        t0 = time.monotonic()
        res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        print(f"   {'ok' if res.returncode == 0 else f'FAILED (exit {res.returncode})'} in "
              f"{time.monotonic() - t0:.0f} s", flush=True)
        if res.returncode:  # its own output only when it failed: the benchmarks are chatty
            print("\n".join(res.stderr.splitlines()[-30:]), flush=True)
            failed.append(name)
    write_table()
    print(f"README.md benchmark table: {len(table_rows())} rows from bench/results/*.json")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
