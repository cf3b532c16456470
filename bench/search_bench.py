"""Benchmark (not a test): reward-guided search against greedy decoding, majority vote and the oracle, in one run.

    python bench/search_bench.py --run RUN_DIR [--data FILE] [--n-prompts 300] [--n 4] [--beam-width 2]
        [--expand 2] [--temperature 1.0] [--max-new-tokens 160] [--max-step-tokens 48] [--threads 0]
        [--out bench/results/search.md]

``RUN_DIR`` is a ``dense-irl train-reward`` output (``sft_policy/`` samples, ``reward_model/`` ranks;
``make bench-search`` trains one with ``offline_tiny`` first when absent). The prompts: ``--data`` (any file ``dense-irl search``
reads; answers are checked), else fresh synthetic problems of the run's own task (a seed the run never saw).
On the same prompts, with the ``hf`` engine:

- greedy: one chain at temperature 0;
- Best-of-N: ``--n`` chains sampled once, then picked by the reward model under every aggregation (min, last,
  sum, mean), by majority vote over their answers, at random (the expectation: the mean accuracy of the
  samples) and by the oracle (any sample right) -- all at the same tokens;
- step-level beam search: ``--beam-width`` chains kept, ``--expand`` next steps each (about the tokens of
  ``beam_width x expand`` chains), aggregation min.

Accuracy with 95% bootstrap intervals over prompts, and generated tokens per prompt, so methods are compared
at equal cost. Writes ``--out`` (Markdown) and its JSON sibling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
AGGS = ("min", "last", "sum", "mean")
TEST_SEED = 987_654  # synthetic test problems: a seed no preset trains on


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `dense-irl train-reward` output folder")
    ap.add_argument("--data", default=None, help="prompts with answers (default: synthetic problems of the run's task)")
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--n", type=int, default=4, help="Best-of-N samples per prompt")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=160, help="tokens per chain (greedy, Best-of-N)")
    ap.add_argument("--max-step-tokens", type=int, default=48, help="tokens per step (beam)")
    ap.add_argument("--max-steps", type=int, default=8, help="steps per chain (beam)")
    ap.add_argument("--prompts-per-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "search.md"))
    return ap.parse_args(argv)


def _ci(hits: list[float], seed: int = 0) -> list[float]:
    h = np.asarray(hits, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(h), size=(1000, len(h)))
    m = h[idx].mean(1)
    return [float(np.quantile(m, 0.025)), float(np.quantile(m, 0.975))]


def _prompts(args, run: Path):
    from dense_irl.search.run import load_prompts

    if args.data:
        return load_prompts(args.data)[: args.n_prompts], args.data
    import yaml

    from dense_irl.config import _build
    from dense_irl.data.synthetic import SyntheticConfig, generate

    raw = yaml.safe_load((run / "config.yaml").read_text())["data"]["synthetic"]
    syn = _build(SyntheticConfig, {**raw, "n_problems": args.n_prompts, "seed": TEST_SEED}, "data.synthetic")
    return generate(syn), f"{args.n_prompts} synthetic problems of the run's task (seed {TEST_SEED})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    t_start = time.monotonic()
    from dense_irl.data.answers import is_correct
    from dense_irl.models.reward_model import RewardModel
    from dense_irl.sampling.engines import HFEngine
    from dense_irl.search.config import SearchConfig
    from dense_irl.search.step_search import aggregate, reward_model_scorer, search

    demos, source = _prompts(args, run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    trained = (f"{summary['sft_steps']} SFT steps, {summary['reward_steps']} reward steps" if "sft_steps" in summary
               else "training budget not recorded")
    rm = RewardModel.from_pretrained(run / "reward_model")
    engine = HFEngine(str(run / "sft_policy"), args.seed)
    sep, scorer = rm.config.separator, reward_model_scorer(rm)
    prompts = [d.prompt for d in demos]
    common = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                  max_step_tokens=args.max_step_tokens, max_steps=args.max_steps)

    def run_method(cfg: SearchConfig):
        t, out = time.monotonic(), []
        for s in range(0, len(prompts), args.prompts_per_batch):
            out += search(engine, scorer, prompts[s : s + args.prompts_per_batch], cfg, sep)
        return out, time.monotonic() - t

    def right(demo, c) -> float:
        return float(c is not None and bool(c.steps) and is_correct(demo, c.completion(sep)))

    rows: dict[str, dict] = {}

    def add(name: str, hits: list[float], tokens: list[int], seconds: float) -> None:
        rows[name] = {"accuracy": float(np.mean(hits)), "ci": _ci(hits), "tokens_per_prompt": float(np.mean(tokens)),
                      "seconds": round(seconds, 1)}
        print(json.dumps({name: rows[name]}), flush=True)

    greedy, s = run_method(SearchConfig(method="greedy", **common))
    add("greedy", [right(d, r.best) for d, r in zip(demos, greedy)], [r.tokens_generated for r in greedy], s)
    bon, s = run_method(SearchConfig(method="best_of_n", n=args.n, **common))
    toks = [r.tokens_generated for r in bon]
    for agg in AGGS:  # the same samples, re-ranked under each aggregation (finished chains first)
        picks = [max(r.candidates, key=lambda c, a=agg: (c.finished, float(aggregate(a, c.step_scores))))
                 for r in bon]
        add(f"Best-of-{args.n}, reward model ({agg})", [right(d, c) for d, c in zip(demos, picks)], toks, s)
    add(f"majority vote over the {args.n} samples", [right(d, r.majority()) for d, r in zip(demos, bon)], toks, s)
    add(f"random pick among the {args.n} (expectation)",
        [float(np.mean([right(d, c) for c in r.candidates])) for d, r in zip(demos, bon)], toks, s)
    add(f"oracle over the {args.n}", [max(right(d, c) for c in r.candidates) for d, r in zip(demos, bon)], toks, s)
    beam, s = run_method(SearchConfig(method="beam", beam_width=args.beam_width, expand=args.expand,
                                      aggregation="min", **common))
    add(f"step beam search {args.beam_width}x{args.expand}, reward model (min)",
        [right(d, r.best) for d, r in zip(demos, beam)], [r.tokens_generated for r in beam], s)

    cmd = "python bench/search_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Reward-guided search (`bench/search_bench.py`)", "",
        f"Command: `{cmd}`", "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Wall time: "
        f"{time.monotonic() - t_start:.0f} s. Machine: {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads.", "",
        f"Run: `{run}` (policy `sft_policy/`, reward model `reward_model/`, readout `{rm.config.readout}`; "
        f"{trained}). "
        f"Prompts: {source}, {len(demos)} of them. Sampling at temperature {args.temperature}, "
        f"{args.max_new_tokens} tokens per chain at most ({args.max_step_tokens} per step in beam search, "
        f"{args.max_steps} steps). Every Best-of-{args.n} row uses the same samples; intervals are 95% "
        "bootstrap over prompts.", "",
        "| method | accuracy | 95% CI | generated tokens per prompt |", "| --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['ci'][0]:.3f}-{r['ci'][1]:.3f} | "
                     f"{r['tokens_per_prompt']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from dense_irl.io import atomic_write_text, write_json

    atomic_write_text(out, "\n".join(lines) + "\n")
    result = {"command": cmd, "run": str(run), "prompts": len(demos), "source": source, "rows": rows}
    write_json(out.with_suffix(".json"), result)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
