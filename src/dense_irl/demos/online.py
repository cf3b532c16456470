"""``make demo``: the online IRL loop on the synthetic task with tiny models on a local Ray, then one table.

1. SFT warm start, then the loop (``driver``): policy samples and perturbed experts are the reward
   model's negatives, its dense step rewards train the policy (PPO). The loop keeps about one core busy,
   so while it runs the two baselines train on the other core in a Ray task, from the same SFT model and
   on the same chains with outcome labels: an implicit PRM ``beta*log(pi/pi_ref)`` and an outcome-only RM.
2. Error localisation on held-out chains of another seed (ProcessBench F1); every scorer's threshold is
   calibrated on the same held-out calibration chains. Scorers: the IRL reward model, the policy log-prob
   (SFT and after IRL), the implicit PRM, the ORM, chance.
3. Policy accuracy after SFT and after IRL on held-out problems (greedy, and the mean over 8 samples at
   temperature 1); Best-of-8 of the IRL policy's samples picked by the reward model against a random pick
   (and majority vote, oracle).
4. ``eval.json``, ``eval.md``, plots; the table is printed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import ray

from dense_irl.algo.experience import split_demos
from dense_irl.config import load_config
from dense_irl.data.demos import load_data
from dense_irl.data.perturb import make_processbench, write_processbench
from dense_irl.data.synthetic import generate, is_correct_answer
from dense_irl.eval import compare, report
from dense_irl.eval.bon import evaluate_bon
from dense_irl.io import write_json
from dense_irl.models.reward_model import RewardModel
from dense_irl.runtime.checkpoints import latest_checkpoint
from dense_irl.runtime.driver import run_iterations, start_driver
from dense_irl.runtime.loop_config import LoopConfig
from dense_irl.sampling.engines import HFEngine, RolloutConfig

PRESET = "demo_online"  # dense_irl/presets/demo_online.yaml


@ray.remote(num_cpus=0.5)
def beside_the_loop(sft_path: str, cfg: LoopConfig, chains: list, held_out: list, bon_n: int, max_steps: int,
                    minutes: float) -> dict:
    """What runs on the second core while the loop runs: the two baselines (``max_steps`` steps each, capped at
    ``minutes``) trained from the SFT policy and their scores of ``chains``, then the SFT policy's accuracy on
    ``held_out`` (greedy, and ``bon_n`` samples at T=1). One torch thread."""
    import torch

    from dense_irl.eval.baselines import train_implicit_prm, train_orm
    from dense_irl.models.factory import ModelConfig, load_policy

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(ModelConfig(name=sft_path))
    _, demos = split_demos(load_data(cfg.data), cfg.data.calibration_chains, cfg.seed)  # the driver's train split
    kw = dict(minutes=minutes, max_steps=max_steps, max_length=cfg.model.max_length, separator=cfg.data.separator,
              seed=cfg.seed, batch_size=cfg.reward.batch_size)
    out: dict = {}
    for name, train in (("implicit_prm", train_implicit_prm), ("outcome_rm", train_orm)):
        t0 = time.monotonic()
        score = train(policy, tok, demos, list(cfg.data.perturbations), **kw)
        out[name] = {"scores": score(chains), "steps": score.steps, "train_s": round(time.monotonic() - t0, 1)}
    t0 = time.monotonic()
    out["sft_policy"] = policy_outcomes(sft_path, held_out, bon_n, cfg.rollout.max_new_tokens, cfg.data.separator,
                                        cfg.seed)
    out["sft_policy"]["eval_s"] = round(time.monotonic() - t0, 1)
    del out["sft_policy"]["samples"]  # only their verdicts go back: the SFT samples are not reranked
    return out


def policy_outcomes(policy_path: str, held_out: list, n: int, max_new_tokens: int, separator: str, seed: int) -> dict:
    """A policy on ``held_out`` problems (synthetic verifier): greedy accuracy, and ``n`` samples at T=1 each
    with whether each is correct."""
    engine = HFEngine(policy_path)
    prompts = [d.prompt for d in held_out]
    greedy = engine.generate(prompts, 1, RolloutConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                                       batch_size=256), separator)
    sampled = engine.generate(prompts, n, RolloutConfig(temperature=1.0, max_new_tokens=max_new_tokens,
                                                        batch_size=256), separator, seed=seed)
    return {"greedy": sum(is_correct_answer(d.meta, g[0].completion) for d, g in zip(held_out, greedy)) / len(held_out),
            "samples": sampled,
            "correct": [[bool(is_correct_answer(d.meta, c.completion)) for c in g] for d, g in zip(held_out, sampled)]}


def _lookup(scores: list, chains: list):
    """A ScoreFn that returns precomputed scores for known chains."""
    table = {(p, tuple(s)): sc for (p, s), sc in zip(chains, scores)}
    return lambda batch: [table[(p, tuple(s))] for p, s in batch]


def run_online_demo(out: str, config: str | None = None, overrides: list[str] | None = None, *,
             test_chains: int = 600, calibration_chains: int = 300, accuracy_prompts: int = 100,
             bon_prompts: int = 100, bon_n: int = 8, baseline_steps: int = 60) -> dict:
    """Run the demo into ``out``; returns the evaluation summary (also in ``out/eval.json``)."""
    cfg = load_config(LoopConfig, config or PRESET, [f"--output_dir={out}", *(overrides or [])])
    out_dir, sep, syn = Path(cfg.output_dir), cfg.data.separator, cfg.data.synthetic
    t_start = time.monotonic()
    if not ray.is_initialized():
        from dense_irl.logs import ray_init_kwargs

        ray.init(num_cpus=2, **ray_init_kwargs())

    test_rows = make_processbench(generate(replace(syn, n_problems=test_chains, seed=syn.seed + 1000)), seed=1)
    calib_rows = make_processbench(generate(replace(syn, n_problems=calibration_chains, seed=syn.seed + 2000)),
                                   seed=2)
    write_processbench(test_rows, out_dir / "data" / "test_processbench.jsonl")
    write_processbench(calib_rows, out_dir / "data" / "calibration_processbench.jsonl")
    chains = [(r["problem"], r["steps"]) for r in test_rows + calib_rows]

    held_out = generate(replace(syn, n_problems=accuracy_prompts, seed=syn.seed + 3000))

    # 1. SFT warm start and the loop; beside it, the baselines train from the same SFT model and the SFT policy
    # is evaluated (the loop keeps about one core busy).
    drv = start_driver(cfg)
    sft_path = str(out_dir / "init" / "sft_policy")
    t_sft = time.monotonic() - t_start
    # The baselines' budget is steps (each capped at half the loop's cap, if it has one).
    beside = beside_the_loop.remote(sft_path, cfg, chains, held_out, bon_n, baseline_steps, cfg.minutes / 2)
    last = run_iterations(drv)
    t_loop = time.monotonic() - t_start - t_sft
    ckpt = latest_checkpoint(out_dir)
    rm = RewardModel.from_pretrained(ckpt / "reward_model")
    irl_policy = str(ckpt / "policy")
    base = ray.get(beside)
    t_wait = time.monotonic() - t_start - t_sft - t_loop

    # 2. Localisation: every scorer calibrated on the same held-out calibration chains.
    scorers = {
        "irl_reward_model": compare.reward_model_scorer(rm),
        "policy_logprob_sft": compare.logprob_scorer(sft_path, cfg.model.max_length, sep),
        "policy_logprob_after_irl": compare.logprob_scorer(irl_policy, cfg.model.max_length, sep),
        "implicit_prm": _lookup(base["implicit_prm"]["scores"], chains),
        "outcome_rm": _lookup(base["outcome_rm"]["scores"], chains),
        "chance": compare.chance_scorer(),
    }
    loc = compare.compare_localisation(scorers, test_rows, calib_rows)
    for i, row in enumerate(test_rows[:6]):
        report.plot_chain(row, loc["irl_reward_model"]["step_scores"][i], out_dir / "plots" / f"chain_{i}.png",
                          loc["irl_reward_model"]["threshold"])

    # 3. Policy accuracy after SFT and after IRL: greedy, and the mean over bon_n samples at temperature 1 (what
    # the policy update optimises, and a far less noisy measure of it: bon_n x as many answers). Best-of-N of
    # the IRL policy's samples reranked by the reward model.
    outcomes = {"sft": base["sft_policy"],
                "after_irl": policy_outcomes(irl_policy, held_out, bon_n, cfg.rollout.max_new_tokens, sep, cfg.seed)}
    acc = {k: v["greedy"] for k, v in outcomes.items()}
    correct = {k: v["correct"] for k, v in outcomes.items()}
    sampled_acc = {k: sum(map(sum, v)) / (bon_n * len(held_out)) for k, v in correct.items()}
    problems = [{"problem": d.prompt, "candidates": [
        {"steps": c.steps or [c.completion or "(empty)"], "is_correct": ok} for c, ok in zip(g, oks)]}
        for d, g, oks in list(zip(held_out, outcomes["after_irl"]["samples"], correct["after_irl"]))[:bon_prompts]]
    bon = evaluate_bon(compare.reward_model_scorer(rm), problems, aggregations=("min", "sum"))

    loc_rows = compare.localisation_rows(loc)
    rows = [{"measure": f"localisation F1: {r['scorer']}", "value": r["f1"],
             "note": f"erroneous {r['error_acc']:.3f} / correct {r['correct_acc']:.3f}"} for r in loc_rows]
    rows += [{"measure": "policy accuracy after SFT (greedy)", "value": acc["sft"], "note": f"{len(held_out)} problems"},
             {"measure": "policy accuracy after IRL (greedy)", "value": acc["after_irl"], "note": ""},
             {"measure": f"policy accuracy after SFT (mean of {bon_n} samples, T=1)", "value": sampled_acc["sft"],
              "note": f"{bon_n * len(held_out)} answers"},
             {"measure": f"policy accuracy after IRL (mean of {bon_n} samples, T=1)",
              "value": sampled_acc["after_irl"], "note": ""}]
    rows += [{"measure": f"Best-of-{bon_n}: {k}", "value": bon["accuracy"][k],
              "note": f"ci95 {bon['ci95'][k][0]:.2f}-{bon['ci95'][k][1]:.2f}"}
             for k in ("min", "sum", "random", "majority", "oracle")]
    timing = {"sft_s": round(t_sft, 1), "sft_steps": drv.state.get("sft_steps"), "loop_s": round(t_loop, 1),
              "iterations": drv.state["iteration"],
              "baselines_train_s": {k: base[k]["train_s"] for k in ("implicit_prm", "outcome_rm")},
              "baselines_steps": {k: base[k]["steps"] for k in ("implicit_prm", "outcome_rm")},
              "sft_policy_eval_s": base["sft_policy"]["eval_s"], "waited_for_baselines_s": round(t_wait, 1),
              "total_s": round(time.monotonic() - t_start, 1)}
    result = {
        "table": rows, "timing": timing, "policy_accuracy": acc, "policy_accuracy_sampled": sampled_acc,
        "best_of_n": bon, "last_iteration": last,
        "localisation": {k: {kk: vv for kk, vv in r.items() if kk not in ("step_scores", "preds", "labels")}
                         for k, r in loc.items()},
        "test": {"n": len(test_rows), "seed": syn.seed + 1000, "calibration_n": len(calib_rows)},
    }
    md = (f"## dense-irl demo: online IRL on the synthetic task ({timing['total_s']:.0f} s, "
          f"{timing['sft_steps']} SFT steps, {timing['iterations']} iterations)\n\n" + report.markdown_table(rows) + "\n\n"
          + report.localisation_markdown(loc["irl_reward_model"], "IRL reward model in detail"))
    report.write_report(result, out_dir / "eval.json", md)
    write_json(out_dir / "demo_summary.json", {"checkpoint": str(ckpt), "eval": str(out_dir / "eval.json"),
                                               **timing})
    print(md)
    return result
