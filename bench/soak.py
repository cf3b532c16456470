"""Soak (not a test): C clients scoring for a long time while the checkpoint is reloaded every minute.

    python bench/soak.py [--minutes 10] [--clients 32] [--reload-every 60] [--replicas 1]

Starts the Serve app on loopback with a random reward model of the tiny preset (two checkpoints, versions
"a" and "b"), then C clients score one chain per request in a closed loop while ``/admin/reload`` swaps
the two checkpoints every ``--reload-every`` seconds. Every 10 s it records requests, failures, p50/p99
latency and each replica's resident memory. Reported: failed requests (the goal is 0), the p99 over time,
and the replicas' memory growth from the end of the warm-up (the first minute, or the first fifth of a short
run) to the end (the goal is under 10%). Writes bench/results/soak.md, soak.json and soak.png.
``soak()`` is the loop itself; the tests run it for a few seconds against their live app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import _http, free_port, make_random_rm, wait_ready  # noqa: E402

from dense_irl.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dense_irl.io import atomic_write_text, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW_S = 10.0


def replica_rss(app: str = "dense-irl") -> dict[int, int]:
    """Resident memory (bytes) of each replica process of ``app``, by pid: Ray titles a replica's process
    ``ray::ServeReplica:<app>:<deployment>`` (no dashboard or state API needed)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        if f"ServeReplica:{app}:" in " ".join(p.info["cmdline"] or []) and p.info["memory_info"]:
            out[p.pid] = p.info["memory_info"].rss
    return out


def soak(url: str, chains: list, clients: int, seconds: float, reload_every: float, reload_paths: list[str],
         headers: dict | None = None, memory=None, window_s: float = WINDOW_S) -> dict:
    """Score ``chains`` with ``clients`` closed-loop clients for ``seconds`` while ``/admin/reload`` cycles
    through ``reload_paths`` every ``reload_every`` s; per-window requests, failures, latency and
    ``memory()`` (replica RSS). A failure is any answer but 200, or no answer."""
    parts = urlsplit(url)
    host, port, prefix = parts.hostname, parts.port, parts.path.rstrip("/")
    auth = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    t0 = time.monotonic()
    t_end = t0 + seconds
    windows = [{"t": (i + 1) * window_s, "lat": [], "failed": 0} for i in range(int(seconds // window_s) + 1)]
    reloads, stop = [], threading.Event()

    def reloader() -> None:
        k = 0
        with httpx.Client(timeout=120, headers=headers) as c:
            while not stop.wait(reload_every):
                path = reload_paths[k % len(reload_paths)]
                r = c.post(url + "/admin/reload", json={"reward_model": path})
                reloads.append({"t": round(time.monotonic() - t0, 1), "status": r.status_code,
                                "version": r.json().get("version") if r.status_code == 200 else r.text[:200]})
                k += 1

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        k = i
        while (start := time.monotonic()) < t_end:
            prompt, steps = chains[k % len(chains)]
            k += clients
            body = json.dumps({"prompt": prompt, "steps": steps}).encode()
            w = windows[min(int((start - t0) // window_s), len(windows) - 1)]
            try:
                status, _ = await _http(reader, writer, prefix + "/v1/score", body, auth)
            except (OSError, asyncio.IncompleteReadError):
                w["failed"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
                continue
            if status != 200:
                w["failed"] += 1
            else:
                w["lat"].append(time.monotonic() - start)
        writer.close()

    async def sampler() -> None:
        while time.monotonic() < t_end:
            await asyncio.sleep(window_s)
            if memory is not None:
                w = windows[min(int((time.monotonic() - t0) // window_s) - 1, len(windows) - 1)]
                w["rss"] = await asyncio.get_running_loop().run_in_executor(None, memory)

    async def main() -> None:
        await asyncio.gather(sampler(), *(client(i) for i in range(clients)))

    thread = threading.Thread(target=reloader)
    thread.start()
    try:
        asyncio.run(main())
    finally:
        stop.set()
        thread.join()
    rows = []
    for w in windows:
        lat = sorted(w["lat"])
        if not lat and not w["failed"]:
            continue
        rss = w.get("rss") or {}
        rows.append({"t_s": w["t"], "requests": len(lat) + w["failed"], "failed": w["failed"],
                     "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
                     "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
                     "rss_mb": round(sum(rss.values()) / 2**20, 1) if rss else None})
    return {"windows": rows, "reloads": reloads, "requests": sum(r["requests"] for r in rows),
            "failed": sum(r["failed"] for r in rows) + sum(r["status"] != 200 for r in reloads)}


def memory_growth(rows: list[dict], warmup_s: float) -> float | None:
    """Relative growth of the replicas' RSS from the first window after the warm-up to the last window."""
    rss = [(r["t_s"], r["rss_mb"]) for r in rows if r["rss_mb"]]
    after = [m for t, m in rss if t > warmup_s] or [m for _, m in rss]
    return (after[-1] - after[0]) / after[0] if len(after) >= 2 else None


def plot(rows: list[dict], reloads: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot([r["t_s"] for r in rows], [r["p99_ms"] for r in rows], label="p99")
    a.plot([r["t_s"] for r in rows], [r["p50_ms"] for r in rows], label="p50")
    for r in reloads:
        a.axvline(r["t"], color="grey", lw=0.5)
    a.set_ylabel("latency (ms)")
    a.legend()
    b.plot([r["t_s"] for r in rows], [r["rss_mb"] for r in rows])
    b.set_ylabel("replica RSS (MB)")
    b.set_xlabel("seconds (grey lines: admin reloads)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--reload-every", type=float, default=60.0)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import ray

    from dense_irl.serving.launch import start_server

    tmp = Path(tempfile.mkdtemp(prefix="soak"))
    paths = [make_random_rm(tmp / "a", seed=0, version="a"), make_random_rm(tmp / "b", seed=1, version="b")]
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)  # no access log per request
    url = start_server({"reward_model": paths[0], "num_replicas": args.replicas, "num_cpus": 0.5,
                        "reload_root": str(tmp)}, "127.0.0.1", port)
    wait_ready(url)
    demos = generate(SyntheticConfig(n_problems=500, seed=5))
    chains = [(d.prompt, d.steps) for d in demos]
    seconds = 60 * args.minutes
    t = time.time()
    res = soak(url, chains, args.clients, seconds, args.reload_every, paths[::-1], memory=replica_rss)
    growth = memory_growth(res["windows"], min(60.0, seconds / 5))
    lat = [r["p99_ms"] for r in res["windows"] if r["p99_ms"] is not None]
    summary = {"date": time.strftime("%Y-%m-%d", time.gmtime(t)), "minutes": args.minutes,
               "clients": args.clients, "replicas": args.replicas, "reload_every_s": args.reload_every,
               "requests": res["requests"], "failed": res["failed"], "reloads_done": len(res["reloads"]),
               "reloads_ok": sum(r["status"] == 200 for r in res["reloads"]),
               "p99_ms_median_window": statistics.median(lat) if lat else None,
               "p99_ms_worst_window": max(lat) if lat else None,
               "memory_growth": None if growth is None else round(growth, 4),
               "windows": res["windows"], "reload_log": res["reloads"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "soak.json", summary)
    plot(res["windows"], res["reloads"], out / "soak.png")
    cmd = (f"python bench/soak.py --minutes {args.minutes:g} --clients {args.clients} "
           f"--reload-every {args.reload_every:g} --replicas {args.replicas}")
    growth_txt = "n/a" if growth is None else f"{100 * growth:+.1f}%"
    atomic_write_text(out / "soak.md", "\n".join([
        f"# Soak ({summary['date']}, `{cmd}`)", "",
        f"{args.clients} clients for {args.minutes:g} min against the tiny random reward model, "
        f"{args.replicas} replica(s), `/admin/reload` every {args.reload_every:g} s.", "",
        "| requests | failed | reloads (ok) | p99, median window (ms) | p99, worst window (ms) | replica memory growth "
        "after warm-up |", "| --- | --- | --- | --- | --- | --- |",
        f"| {summary['requests']} | {summary['failed']} | {summary['reloads_done']} ({summary['reloads_ok']}) | "
        f"{summary['p99_ms_median_window']} | {summary['p99_ms_worst_window']} | {growth_txt} |", "",
        "![p99 latency and replica memory over time](soak.png)", ""]))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("windows", "reload_log")}))
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
