"""Benchmark (not a test): how dense-irl's costs grow with its sizes, as log-log fits.

    python bench/cost_bench.py [--parts tree,iteration,serve_memory] [--iterations 3] [--max-nodes 1000000]
        [--out bench/results/cost]

tree          the step-tree backup (``algo.advantages.soft_backup``) against the number of nodes, 10^2 to
              ``--max-nodes``: the fitted slope of log time on log nodes (goal: 1, linear).
iteration     one online iteration of ``demo_online`` (mean seconds, the first iteration left out, as
              ``bench/iteration_bench.py``) against prompts per iteration, samples per prompt and chain length
              (steps per synthetic problem, with ``rollout.max_new_tokens`` grown to fit), one at a time
              from the preset's sizes; the slope of each.
serve_memory  the Serve scoring replica's resident memory (``/v1/models`` ``rss_bytes``) against concurrent
              clients (1 to 256) of the tiny model, each client sending one chain at a time.
Writes ``--out``.md, .json and .png (one log-log panel per part, the fitted slope in each legend).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks' helpers

from dense_irl.io import atomic_path, atomic_write_text, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cost"


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# ---------------------------------------------------------------------------- the step-tree backup


def random_tree(nodes: int, depth: int = 10, branching: int = 4, seed: int = 0) -> tuple[list, list]:
    """Chains of ``depth`` steps whose prefix tree has about ``nodes`` nodes: each step is one of
    ``branching`` shared texts near the root and unique below, as rollouts of one prompt diverge."""
    rng = random.Random(seed)
    chains, rewards, seen = [], [], set()
    while len(seen) < nodes:
        steps = []
        for d in range(depth):
            shared = rng.random() < 0.5 ** (d / 2)  # the deeper, the likelier a step is the chain's own
            steps.append(f"s{d}.{rng.randrange(branching)}" if shared else f"u{len(chains)}.{d}")
            seen.add(tuple(steps))
        chains.append(steps)
        rewards.append([rng.gauss(0, 1) for _ in steps])
    return chains, rewards


def tree_part(max_nodes: int) -> dict:
    from dense_irl.algo.advantages import soft_backup

    sizes = [n for n in (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000) if n <= max_nodes]
    rows = []
    for n in sizes:
        chains, rewards = random_tree(n)
        best = float("inf")
        for _ in range(3 if n <= 100_000 else 1):
            t = time.perf_counter()
            soft_backup(chains, rewards)
            best = min(best, time.perf_counter() - t)
        nodes = len({tuple(c[:k + 1]) for c in chains for k in range(len(c))})
        rows.append({"nodes": nodes, "chains": len(chains), "seconds": best, "us_per_node": 1e6 * best / nodes})
        print(f"tree: {rows[-1]}", flush=True)
    return {"rows": rows, "slope": slope([r["nodes"] for r in rows], [r["seconds"] for r in rows])}


# ---------------------------------------------------------------------------- iterations


def iteration_seconds(overrides: list[str], iterations: int, out: Path) -> dict:
    """One short run of ``demo_online`` with ``overrides``; its mean iteration time and the phase times."""
    from iteration_bench import breakdown, train

    train("demo_online", out, "object_store", iterations, overrides)
    return breakdown(out)


def iteration_part(iterations: int, tmp: Path) -> dict:
    from dense_irl.config import load_config
    from dense_irl.runtime.loop_config import LoopConfig

    base = load_config(LoopConfig, "demo_online", [])
    prompts, samples = base.prompts_per_iteration, base.rollout.samples_per_prompt
    steps, new_tokens = base.data.synthetic.max_steps, base.rollout.max_new_tokens

    def length(s: int) -> list[str]:  # every problem exactly s operations; room for its s + 1 steps
        return [f"data.synthetic.min_steps={s}", f"data.synthetic.max_steps={s}",
                f"rollout.max_new_tokens={max(new_tokens, 24 * (s + 1))}"]

    # (size, [(value, overrides)]): half, the preset's own (run once, shared by every sweep) and double.
    sweeps = {
        "prompts per iteration": [(p, [f"prompts_per_iteration={p}"]) for p in (prompts // 2, prompts * 2)],
        "samples per prompt": [(g, [f"rollout.samples_per_prompt={g}"]) for g in (samples // 2, samples * 2)],
        "chain length (steps)": [(s, length(s)) for s in (max(1, steps // 2), steps * 2)],
    }
    base_run = iteration_seconds([], iterations, tmp / "base")
    print(f"iteration, the preset's sizes: {base_run['iteration_s']:.2f} s", flush=True)
    out = {}
    for name, runs in sweeps.items():
        (lo, lo_sets), (hi, hi_sets) = runs
        middle = {"prompts per iteration": prompts, "samples per prompt": samples, "chain length (steps)": steps}[name]
        rows = []
        for x, sets in ((lo, lo_sets), (middle, None), (hi, hi_sets)):
            b = base_run if sets is None else iteration_seconds(sets, iterations, tmp / f"{name.split()[0]}{x}")
            rows.append({"x": x, "iteration_s": b["iteration_s"], "seconds": b["seconds"]})
            print(f"iteration, {name} = {x}: {b['iteration_s']:.2f} s", flush=True)
        out[name] = {"rows": rows, "slope": slope([r["x"] for r in rows], [r["iteration_s"] for r in rows])}
    return out


# ---------------------------------------------------------------------------- serving memory


def serve_memory_part(tmp: Path, clients: list[int], seconds: float) -> dict:
    import asyncio

    import httpx
    import ray
    from ray import serve
    from serve_bench import _load, free_port, load_chains, make_random_rm, wait_ready

    from dense_irl.serving.app import app_builder

    path = make_random_rm(tmp / "rm")
    chains = load_chains(None)
    port = free_port()
    if not ray.is_initialized():  # (the iteration part leaves its Ray up)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"reward_model": path, "num_replicas": 1, "num_cpus": 1.0,
                               "max_ongoing_requests": max(clients) + 16}),
                  name="cost", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)

        def rss() -> int:
            return httpx.get(url + "/v1/models", timeout=30).json()["replica_stats"]["rss_bytes"]

        idle = rss()
        for c in clients:
            got = asyncio.run(_load(port, chains, c, seconds, 1.0, 1))
            rows.append({"clients": c, "rss_bytes": rss(), "chains_s": got["chains_s"], "errors": got["errors"],
                         "p50_ms": got["p50_ms"]})
            print(f"serve memory: {rows[-1]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"idle_rss_bytes": idle, "rows": rows,
            "slope": slope([r["clients"] for r in rows], [r["rss_bytes"] for r in rows])}


# ---------------------------------------------------------------------------- report


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "tree" in result:
        t = result["tree"]
        panels.append(("step-tree backup", "nodes", "seconds",
                       [(f"slope {t['slope']:.2f}", [r["nodes"] for r in t["rows"]], [r["seconds"] for r in t["rows"]])]))
    if "iteration" in result:
        panels.append(("one iteration (demo_online)", "size / the preset's", "seconds per iteration",
                       [(f"{name}: slope {s['slope']:.2f}", [r["x"] / s["rows"][1]["x"] for r in s["rows"]],
                         [r["iteration_s"] for r in s["rows"]]) for name, s in result["iteration"].items()]))
    if "serve_memory" in result:
        m = result["serve_memory"]
        panels.append(("scoring replica memory", "concurrent clients", "resident MB",
                       [(f"slope {m['slope']:.3f}", [r["clients"] for r in m["rows"]],
                         [r["rss_bytes"] / 1e6 for r in m["rows"]])]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, xl, yl, series) in zip(axes[0], panels):
        for label, xs, ys in series:
            ax.loglog(xs, ys, "o-", label=label)
        ax.set(title=title, xlabel=xl, ylabel=yl)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def report(result: dict, png: str) -> str:
    lines = ["# Cost growth", "", f"`{result['command']}` on {os.cpu_count()} CPU cores. Log-log fits: a slope of 1 "
             f"is linear growth. ![cost growth]({png})", ""]
    if "tree" in result:
        t = result["tree"]
        lines += ["## The step-tree backup", "", f"`soft_backup` over one prompt's rollouts (10 steps each, "
                  f"sharing steps near the root): fitted slope **{t['slope']:.2f}** (goal: 1, linear).", "",
                  "| nodes | chains | seconds | us per node |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['nodes']:,} | {r['chains']:,} | {r['seconds']:.4f} | {r['us_per_node']:.2f} |"
                  for r in t["rows"]]
        lines.append("")
    if "iteration" in result:
        lines += ["## One iteration", "", "`demo_online` (tiny model, object-store weight sync), each size in "
                  "turn with the others at the preset's; mean seconds per iteration, the first left out.", "",
                  "| size | value | iteration s | rollout | reward | score | policy | fitted slope |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, s in result["iteration"].items():
            for r in s["rows"]:
                ph = r["seconds"]
                lines.append(f"| {name} | {r['x']} | {r['iteration_s']:.2f} | {ph.get('rollout', 0):.2f} | "
                             f"{ph.get('reward', 0):.2f} | {ph.get('score', 0):.2f} | {ph.get('policy', 0):.2f} | "
                             f"{s['slope']:.2f} |")
        lines.append("")
    if "serve_memory" in result:
        m = result["serve_memory"]
        lines += ["## Scoring replica memory", "", f"One Serve replica of the tiny model; each client count in turn "
                  f"for the same time, closed loop. Idle: {m['idle_rss_bytes'] / 1e6:.0f} MB; fitted slope "
                  f"**{m['slope']:.3f}**.", "", "| clients | resident MB | chains/s | p50 ms | errors |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['clients']} | {r['rss_bytes'] / 1e6:.0f} | {r['chains_s']:.1f} | {r['p50_ms']:.1f} | "
                  f"{r['errors']} |" for r in m["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="tree,iteration,serve_memory")
    ap.add_argument("--iterations", type=int, default=3, help="iterations per run (the first is left out)")
    ap.add_argument("--max-nodes", type=int, default=1_000_000)
    ap.add_argument("--clients", default="1,8,32,128,256")
    ap.add_argument("--seconds", type=float, default=4.0, help="load per client count (serve_memory)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"tree", "iteration", "serve_memory"}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; valid: tree, iteration, serve_memory")
    cmd = " ".join(["python bench/cost_bench.py", *(argv if argv is not None else sys.argv[1:])])
    result: dict = {"command": cmd}
    with tempfile.TemporaryDirectory() as tmp:
        if "tree" in parts:
            result["tree"] = tree_part(args.max_nodes)
        if "iteration" in parts:
            result["iteration"] = iteration_part(args.iterations, Path(tmp))
        if "serve_memory" in parts:
            result["serve_memory"] = serve_memory_part(Path(tmp), [int(c) for c in args.clients.split(",")],
                                                       args.seconds)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), result)
    plot(result, stem.with_suffix(".png"))
    atomic_write_text(stem.with_suffix(".md"), report(result, stem.with_suffix(".png").name))
    print(report(result, stem.with_suffix(".png").name))
    return result


if __name__ == "__main__":
    main()
