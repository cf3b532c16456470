"""Benchmark (not a test): one online iteration broken down into its phases, the actors' work and the rest.

    python bench/iteration_bench.py [--config demo_online] [--iterations 4] [--weight-sync object_store,collective]
        [--run RUN_DIR ...] [--set key=value ...]

Runs the loop (``dense-irl train``) of ``--config`` once per weight-sync mode, with a short warm start (the
breakdown of an iteration does not depend on how well the policy was warmed up), and reads its
``metrics.jsonl``: each phase's wall time in the driver (``time_<phase>_s``) and the actors' own compute in
it (``compute_<phase>_s``, ``runtime/timing.py``), each checkpoint's and evaluation's time. The first
iteration is left out (first-call allocations). What is not the actors' work (Ray scheduling,
serialisation, waiting, the driver's own bookkeeping) is "the rest": goal at most 10% of an iteration on
the demo preset. ``--run`` reads runs already made instead. Writes bench/results/iteration.md, .json and a
stacked bar PNG (iteration.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dense_irl.io import atomic_path, atomic_write_text, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ["rollout", "reward", "score", "advantages", "policy", "sync"]
DRIVER_PHASES = {"advantages"}  # computed in the driver itself: all of it is work


def breakdown(run: Path) -> dict:
    """Mean seconds per iteration of each part, from a run's metrics.jsonl (iterations after the first)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    its = [r for r in rows if "time_iteration_s" in r][1:]
    if not its:
        raise SystemExit(f"{run}: fewer than 2 iterations with timings in metrics.jsonl")
    n = len(its)
    parts: dict[str, float] = {}
    overhead = 0.0
    for r in its:
        for p in PHASES:
            wall = r.get(f"time_{p}_s", 0.0)
            work = wall if p in DRIVER_PHASES else min(wall, r.get(f"compute_{p}_s", 0.0))
            parts[p] = parts.get(p, 0.0) + work / n
            overhead += (wall - work) / n
        overhead += (r["time_iteration_s"] - sum(r.get(f"time_{p}_s", 0.0) for p in PHASES)) / n
    done = {r["iteration"] for r in its}
    for key, part in (("time_checkpoint_s", "checkpoint"), ("time_eval_s", "eval")):
        parts[part] = sum(r[key] for r in rows if key in r and r.get("iteration") in done) / n
    parts["rest"] = overhead
    total = sum(parts.values())
    return {"run": str(run), "iterations": n, "seconds": parts, "total_s": total,
            "rest_share": overhead / total if total else 0.0,
            "iteration_s": statistics.mean(r["time_iteration_s"] for r in its)}


def train(config: str, out: Path, sync: str, iterations: int, extra: list[str]) -> Path:
    """One short run of the loop into ``out``."""
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import train_online
    from dense_irl.runtime.loop_config import LoopConfig

    overrides = [f"--output_dir={out}", f"--iterations={iterations}", "--minutes=0", "--sft.max_steps=60",
                 f"--rollout.weight_sync={sync}", f"--checkpoint_every={max(1, iterations // 2)}",
                 f"--eval_every={iterations}", *(x if x.startswith("--") else f"--{x}" for x in extra)]
    train_online(load_config(LoopConfig, config, overrides))
    return out


def plot(results: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [*PHASES, "checkpoint", "eval", "rest"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, r in enumerate(results):
        left = 0.0
        for j, part in enumerate(order):
            w = r["seconds"].get(part, 0.0)
            ax.barh(i, w, left=left, color=plt.cm.tab10(j), label=part if i == 0 else None)
            left += w
    ax.set_yticks(range(len(results)), labels)
    ax.set_xlabel("seconds per iteration")
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo_online")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--weight-sync", default="object_store,collective")
    ap.add_argument("--run", action="append", help="read this run instead of training (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="a dotted override for the runs, key=value")
    ap.add_argument("--out", help="results stem (default bench/results/iteration)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.run:
        runs = [Path(r) for r in args.run]
        labels = [Path(r).name for r in runs]
    else:
        runs, labels = [], []
        for sync in args.weight_sync.split(","):
            runs.append(train(args.config, Path(tmp.name) / sync, sync, args.iterations, args.set))
            labels.append(f"{args.config}, {sync}")
    results = [breakdown(r) for r in runs]
    for label, r in zip(labels, results):
        r["label"] = label
        print(json.dumps(r), file=sys.stderr)
    stem = Path(args.out) if args.out else RESULTS / "iteration"
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/iteration_bench.py", *sys.argv[1:]])
    write_json(stem.with_suffix(".json"), {"command": command, "results": results})
    plot(results, labels, stem.with_suffix(".png"))
    atomic_write_text(stem.with_suffix(".md"), report(results, command, stem.with_suffix(".png").name))
    tmp.cleanup()


def report(results: list[dict], command: str, png: str) -> str:
    order = [*PHASES, "checkpoint", "eval", "rest"]
    lines = [
        "# One iteration, broken down",
        "",
        f"`{command}`: mean seconds per iteration (the first left out). A phase counts the actors' own compute "
        "in it (the slowest actor's; the weight sync: the sender's, then the slowest receiver's); the rest is "
        "everything else: Ray's scheduling, serialisation, waiting and the driver's bookkeeping. "
        f"Checkpoint and eval: their time spread over the iterations. ![breakdown]({png})",
        "",
        "| run | iteration s | " + " | ".join(order) + " | rest share |",
        "|---|---:|" + "---:|" * len(order) + "---:|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {r['total_s']:.2f} | "
                     + " | ".join(f"{r['seconds'].get(p, 0.0):.2f}" for p in order)
                     + f" | **{100 * r['rest_share']:.1f}%** |")
    lines += ["", "Goal: the rest at most 10% of an iteration on the demo preset."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
