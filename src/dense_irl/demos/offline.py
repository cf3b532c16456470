"""``make demo-offline``: the offline IRL run on the synthetic task, end to end, with its baselines.

1. train the reward model (SFT warm start, then IRL against perturbed experts) — ``dense_irl.offline.train``;
2. train the SFT baseline as long as the whole reward-model run took (the fair log-prob baseline);
3. evaluate error localisation on held-out chains from another seed: reward model vs SFT log-prob
   (at the warm start and trained as long) vs chance; every threshold is calibrated on the run's own held-out
   calibration chains (the reward model's was, during training, and is stored in its checkpoint);
4. write ``eval.json``, ``eval.md`` and plots, and print one table.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from dense_irl.algo.experience import split_demos
from dense_irl.algo.sft import LocalSFT, train_sft
from dense_irl.config import load_config
from dense_irl.data.demos import load_data
from dense_irl.data.layout import ChainLayout
from dense_irl.data.perturb import make_processbench, write_processbench
from dense_irl.data.synthetic import generate
from dense_irl.eval import compare, report
from dense_irl.io import write_json
from dense_irl.models.factory import load_policy, save_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.offline.config import TrainRewardConfig
from dense_irl.offline.train import SFT_STATE, calibration_rows, train_reward_model

PRESET = "offline_tiny"  # dense_irl/presets/offline_tiny.yaml


def run_offline_demo(out: str, config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Run the demo into ``out``; returns the evaluation summary."""
    cfg = load_config(TrainRewardConfig, config or PRESET, [f"--output_dir={out}", *(overrides or [])])
    out_dir = Path(cfg.output_dir)
    t0 = time.monotonic()
    summary = train_reward_model(cfg)
    train_s = time.monotonic() - t0

    # Baseline: the SFT policy trained for as long as the reward model's whole run (SFT + IRL): the IRL phase's
    # measured wall time more, whichever of its time or step budgets ended it.
    extra = summary["reward_s"] / 60
    # It goes on with the warm start's data, optimiser and batch stream, as one SFT run of the whole length would.
    policy, tokenizer = load_policy(replace(cfg.model, name=summary["sft_policy"]))
    state = out_dir / SFT_STATE
    resume = torch.load(state, weights_only=False) if state.is_file() else None
    calib, train = split_demos(load_data(cfg.data), cfg.data.calibration_chains, cfg.seed)
    sft = LocalSFT(policy, tokenizer, ChainLayout(cfg.data.separator, cfg.model.max_length), cfg.sft)
    if resume is not None:
        sft.opt.load_state_dict(resume["optimizer"])
    if extra > 0:  # (0 minutes would mean "no cap" to the budget)
        train_sft(sft, train, replace(cfg.sft, minutes=extra, max_steps=100_000), seed=cfg.seed, log=lambda m: None,
                  rng_state=resume["rng"] if resume is not None else None)
    save_policy(policy, tokenizer, out_dir / "sft_as_long")

    syn = cfg.data.synthetic
    test_rows = make_processbench(generate(replace(syn, n_problems=600, seed=syn.seed + 1000)), seed=1)
    calib_rows = calibration_rows(calib, cfg.data.perturbations, cfg.seed)  # the chains the reward model's threshold came from
    write_processbench(test_rows, out_dir / "data" / "test_processbench.jsonl")
    write_processbench(calib_rows, out_dir / "data" / "calibration_processbench.jsonl")

    rm = RewardModel.from_pretrained(summary["reward_model"])
    sep, max_len = rm.config.separator, rm.config.max_length
    scorers = {
        "reward_model": compare.reward_model_scorer(rm),
        "sft_logprob_as_long": compare.logprob_scorer(str(out_dir / "sft_as_long"), max_len, sep),
        "sft_logprob_warm_start": compare.logprob_scorer(summary["sft_policy"], max_len, sep),
        "chance": compare.chance_scorer(),
    }
    reports = compare.compare_localisation(scorers, test_rows, calib_rows, rm.config.threshold)
    for i, row in enumerate(test_rows[:6]):
        report.plot_chain(row, reports["reward_model"]["step_scores"][i], out_dir / "plots" / f"chain_{i}.png",
                          rm.config.threshold)
    table = compare.localisation_rows(reports)
    result = {
        "localisation": {k: {kk: vv for kk, vv in r.items() if kk not in ("step_scores", "preds", "labels")}
                         for k, r in reports.items()},
        "table": table,
        "budget": {"sft_minutes": cfg.sft.minutes, "reward_minutes": cfg.reward.minutes,
                   "reward_model_run_s": round(train_s, 1), "sft_as_long_minutes": round(summary["sft_s"] / 60 + extra, 2),
                   "steps": {k: summary.get(k) for k in ("sft_steps", "reward_steps")}},
        "test": {"n": len(test_rows), "seed": syn.seed + 1000},
    }
    md = ("## Error localisation on held-out synthetic chains (ProcessBench F1)\n\n"
          + report.markdown_table(table) + "\n\n"
          + report.localisation_markdown(reports["reward_model"], "Reward model in detail"))
    report.write_report(result, out_dir / "eval.json", md)
    print(md)
    write_json(out_dir / "demo_summary.json", {**summary, "eval": str(out_dir / "eval.json")})
    return result
