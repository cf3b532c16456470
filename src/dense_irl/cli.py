"""The ``dense-irl`` command. Thin: it parses arguments and calls the library.

    dense-irl data convert IN OUT [--format F] [--step-separator S] [--skip-bad]
    dense-irl data stats FILE [--format F]
    dense-irl data synth OUT [--n N] [--seed S] [--min-steps A] [--max-steps B] [--max-value V] [--phrasing P] [--step-styles K]
    dense-irl data perturb IN OUT.jsonl [--kinds K,K] [--seed S] [--correct-fraction X] [--format F]
    dense-irl train-reward --config FILE [--key.sub=value ...]
    dense-irl train --config FILE [--resume auto|PATH] [--key.sub=value ...]
    dense-irl tune --search SEARCH.yaml [--config FILE] [--storage-path DIR] [--name N] [--resume]
                   [--key.sub=value ...]
    dense-irl eval localisation --reward-model PATH --data FILE.jsonl [--out report.json]
                                [--calibration FILE.jsonl] [--policy PATH] [--plots N]
    dense-irl eval bon --reward-model PATH --data FILE.jsonl [--out report.json] [--policy PATH]
    dense-irl search --policy PATH --reward-model PATH --data FILE [--out F] [--config FILE] [--search.key=value ...]
    dense-irl serve --reward-model PATH [--policy PATH] [--host 127.0.0.1] [--port 8000] [--replicas N] [--token T] [--ingress haproxy|proxy] ...
    dense-irl score [--url URL] (--prompt P --step S [--step S ...] | --text T | --data FILE [--out F] | --info)
    dense-irl demo [--out runs/demo] [--config FILE] [--offline] [--key.sub=value ...]

``--config`` takes a YAML path or a shipped preset's name (``demo_online``, ``offline_tiny``, ...).
``--verbose`` (anywhere on the line) brings back the libraries' own chatter: Ray's worker logs, transformers'
loading bars, DeepSpeed's notices. A user error (bad config, data, missing file or checkpoint) ends in one
line ``error: ...`` on stderr and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dense_irl.errors import UserError
from dense_irl.serving.ingress import INGRESS, use_ingress


def _data(args) -> None:
    from dense_irl.data import perturb, readers, synthetic
    from dense_irl.data.schema import write_demos

    if args.data_cmd == "convert":
        print(json.dumps(readers.convert(args.input, args.output, args.format, args.step_separator, args.skip_bad)))
    elif args.data_cmd == "stats":
        print(json.dumps(readers.stats(args.file, args.format), indent=2))
    elif args.data_cmd == "synth":
        cfg = synthetic.SyntheticConfig(n_problems=args.n, seed=args.seed, min_steps=args.min_steps,
                                        max_steps=args.max_steps, max_value=args.max_value, phrasing=args.phrasing,
                                        **({} if args.step_styles is None else {"step_styles": args.step_styles}))
        demos = synthetic.generate(cfg)
        if args.output.endswith(".jsonl"):
            from dense_irl.io import write_jsonl

            write_jsonl(args.output, [{**d.to_row(), "meta": d.meta} for d in demos])
        else:
            write_demos(demos, args.output)
        print(json.dumps({"rows": len(demos), "out": args.output}))
    elif args.data_cmd == "perturb":
        demos, skipped = readers.load_demonstrations(args.input, args.format, args.step_separator, args.skip_bad)
        kinds = args.kinds.split(",") if args.kinds else perturb.KINDS
        rows = perturb.make_processbench(demos, kinds=kinds, seed=args.seed, correct_fraction=args.correct_fraction)
        perturb.write_processbench(rows, args.output)
        n_err = sum(r["label"] >= 0 for r in rows)
        print(json.dumps({"rows": len(rows), "erroneous": n_err, "skipped": skipped, "out": args.output}))


def _eval(args) -> None:
    from dense_irl.eval import compare, report
    from dense_irl.models.reward_model import RewardModel

    rm = RewardModel.from_pretrained(args.reward_model)
    scorers = {"reward_model": compare.reward_model_scorer(rm)}
    if args.policy:
        scorers["policy_logprob"] = compare.logprob_scorer(args.policy, rm.config.max_length, rm.config.separator)
    if args.eval_cmd == "localisation":
        from dense_irl.eval.localisation import load_processbench_rows

        rows = load_processbench_rows(args.data)
        calib = load_processbench_rows(args.calibration) if args.calibration else None
        if calib:
            scorers["chance"] = compare.chance_scorer()
        # Truncated chains are counted for every scorer before any runs, then scored on the steps that fit.
        reports = compare.compare_localisation(scorers, rows, calib, None if calib else rm.config.threshold,
                                               progress=True)
        md = "\n\n".join(report.localisation_markdown(r, f"Localisation: {name}") for name, r in reports.items())
        md = report.markdown_table(compare.localisation_rows(reports)) + "\n\n" + md
        if args.plots:
            main = reports["reward_model"]
            out_dir = Path(args.out or "localisation.json").with_suffix("").parent / "plots"
            for i, row in enumerate(rows[: args.plots]):
                scores = main["step_scores"][i]
                if not scores:
                    continue  # not even the first step fit in max_length
                cut = len(scores) < len(row["steps"])
                report.plot_step_rewards(row["steps"][: len(scores)], scores, out_dir / f"chain_{i}.png",
                                         title=row["problem"][:80] + (" [truncated]" if cut else ""),
                                         threshold=main["threshold"],
                                         first_error_label=row["label"] if row["label"] < len(scores) else None)
        result = {name: {k: v for k, v in r.items() if k not in ("step_scores", "preds", "labels")}
                  for name, r in reports.items()}
    else:
        from dense_irl.eval.bon import load_bon

        problems = load_bon(args.data)
        reports = compare.compare_bon(scorers, problems, progress=True)
        md = "\n\n".join(report.bon_markdown(r, f"Best-of-N: {name}") for name, r in reports.items())
        result = reports
    print(md)
    if args.out:
        report.write_report(result, Path(args.out), md)


def _train_reward(args, overrides: list[str]) -> None:
    from dense_irl.config import load_config
    from dense_irl.offline.config import TrainRewardConfig
    from dense_irl.offline.train import train_reward_model

    cfg = load_config(TrainRewardConfig, args.config, overrides)
    print(json.dumps(train_reward_model(cfg), indent=2))


def _train(args, overrides: list[str]) -> None:
    from dense_irl.config import load_config
    from dense_irl.runtime.driver import train_online
    from dense_irl.runtime.loop_config import LoopConfig

    if args.resume:
        overrides = [*overrides, f"--resume={args.resume}"]
    cfg = load_config(LoopConfig, args.config, overrides)
    last = train_online(cfg)
    print(json.dumps({k: v for k, v in last.items() if k != "batch_ids"}, indent=2))


def _tune(args, overrides: list[str]) -> int:
    from dense_irl.runtime.tune import as_overrides, load_tune_config, run_tune

    flags = as_overrides({k: v for k, v in (("storage_path", args.storage_path), ("name", args.name)) if v})
    cfg = load_tune_config(args.search, args.config, flags)
    summary = run_tune(cfg, overrides, resume=args.resume)
    print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        print(f"interrupted: the search state is saved in {summary['experiment']}; continue it with --resume",
              file=sys.stderr)
        return 130
    return 0


def _serve(args) -> None:
    use_ingress(args.ingress)  # before ray.serve is imported: Serve reads its switches at import
    from dense_irl.serving.launch import serve_forever

    serve_forever({"reward_model": args.reward_model, "num_replicas": args.replicas, "num_cpus": args.num_cpus,
                   "num_gpus": args.num_gpus, "token": args.token, "max_batch_size": args.max_batch_size,
                   "reward_aggregate": args.reward_aggregate, "log_steps": args.log_steps, "step_tag": args.step_tag,
                   "policy": args.policy, "policy_engine": args.policy_engine, "reload_root": args.reload_root},
                  args.host, args.port)


def _search(args, overrides: list[str]) -> None:
    from dense_irl.config import load_config
    from dense_irl.search.config import SearchJobConfig
    from dense_irl.search.run import run_search

    named = [f"--{k}={v}" for k, v in (("policy", args.policy), ("reward_model", args.reward_model),
                                      ("data", args.data), ("out", args.out), ("engine", args.engine)) if v]
    print(json.dumps(run_search(load_config(SearchJobConfig, args.config, named + overrides)), indent=2))


def _label(args) -> None:
    from dense_irl.eval.label import label_file

    print(json.dumps(label_file(args.reward_model, args.input, args.output, args.as_format, args.format,
                                args.step_separator, args.batch_size, args.skip_bad), indent=2))


def _score(args) -> None:
    from dense_irl.serving.client import score_command

    print(json.dumps(score_command(args.url, args.token, args.data, args.out, args.format, args.prompt, args.steps,
                                   args.text, args.step_separator, args.batch_size, args.info), indent=2))


def _demo(args, overrides: list[str]) -> None:
    if args.offline:
        from dense_irl.demos.offline import run_offline_demo

        run_offline_demo(args.out or "runs/demo_offline", args.config, overrides)
    else:
        from dense_irl.demos.online import run_online_demo

        run_online_demo(args.out or "runs/demo", args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dense-irl`` (dotted ``--key=value`` overrides pass through)."""
    p = argparse.ArgumentParser(prog="dense-irl", description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' own output (Ray worker logs, loading bars, DeepSpeed notices)")
    sub = p.add_subparsers(dest="cmd", required=True)

    data = sub.add_parser("data", help="convert, inspect, generate and perturb data").add_subparsers(
        dest="data_cmd", required=True)
    c = data.add_parser("convert", help="read any supported format, write Parquet or JSONL")
    c.add_argument("input")
    c.add_argument("output")
    s = data.add_parser("stats", help="rows, steps per chain, step lengths")
    s.add_argument("file")
    g = data.add_parser("synth", help="generate the synthetic arithmetic task")
    g.add_argument("output")
    g.add_argument("--n", type=int, default=2000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-steps", type=int, default=2)
    g.add_argument("--max-steps", type=int, default=4)
    g.add_argument("--max-value", type=int, default=20)
    g.add_argument("--phrasing", type=int, default=3)
    g.add_argument("--step-styles", type=int, default=None, help="ways a step is written (default: the task's)")
    pt = data.add_parser("perturb", help="ProcessBench JSONL with known first errors")
    pt.add_argument("input")
    pt.add_argument("output")
    pt.add_argument("--kinds", default=None, help="comma-separated perturbation kinds (default: all)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--correct-fraction", type=float, default=0.5)
    for cmd in (c, s, pt):
        cmd.add_argument("--format", default="auto")
    for cmd in (c, pt):
        cmd.add_argument("--step-separator", default=None)
        cmd.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")

    config_help = "YAML config: a path or a shipped preset's name (default: the defaults, which are the recipe)"
    tr = sub.add_parser("train-reward", help="offline IRL of the step reward model")
    tr.add_argument("--config", default=None, help=config_help)

    tl = sub.add_parser("train", help="the online IRL loop on Ray (rollouts, reward and policy updates)")
    tl.add_argument("--config", default=None, help=config_help)
    tl.add_argument("--resume", default=None, help="'auto' (latest checkpoint in output_dir) or a checkpoint")

    tn = sub.add_parser("tune", help="Ray Tune search (ASHA) over the online IRL loop's hyper-parameters")
    tn.add_argument("--search", required=True, help="search YAML: base config, space, metric, ASHA, resources")
    tn.add_argument("--config", default=None, help="base `dense-irl train` config (replaces the YAML's base)")
    tn.add_argument("--storage-path", default=None, help="folder of searches (default: the YAML's storage_path)")
    tn.add_argument("--name", default=None, help="this search's folder name (default: the YAML's name)")
    tn.add_argument("--resume", action="store_true", help="continue the interrupted search in storage/name")

    ev = sub.add_parser("eval", help="localisation (ProcessBench) and Best-of-N").add_subparsers(
        dest="eval_cmd", required=True)
    for name in ("localisation", "bon"):
        e = ev.add_parser(name)
        e.add_argument("--reward-model", required=True)
        e.add_argument("--data", required=True)
        e.add_argument("--out", default=None, help="report JSON path (a .md table is written beside it)")
        e.add_argument("--policy", default=None, help="a policy folder: adds its log-prob as a baseline")
        if name == "localisation":
            e.add_argument("--calibration", default=None, help="held-out ProcessBench JSONL to set thresholds")
            e.add_argument("--plots", type=int, default=0, help="plot the step rewards of the first N chains")

    lb = sub.add_parser("label", help="step labels from a reward model: chains in, TRL stepwise or ProcessBench out")
    lb.add_argument("input", help="chains (any supported format)")
    lb.add_argument("output", help="labelled rows (.jsonl)")
    lb.add_argument("--reward-model", required=True)
    lb.add_argument("--as", dest="as_format", choices=["trl", "processbench"], default="trl",
                    help="trl: {prompt, completions, labels}; processbench: {problem, steps, label, ...}")
    lb.add_argument("--format", default="auto", help="the input's format")
    lb.add_argument("--step-separator", default=None)
    lb.add_argument("--batch-size", type=int, default=32, help="chains per forward pass")
    lb.add_argument("--skip-bad", action="store_true", help="skip and count bad input rows instead of stopping")

    se = sub.add_parser("search", help="reward-guided search: Best-of-N or step-level beam search over prompts")
    se.add_argument("--config", default=None, help="YAML of `dense-irl search` (SearchJobConfig; default: defaults)")
    se.add_argument("--policy", default=None, help="the policy that samples (a save_pretrained folder)")
    se.add_argument("--reward-model", default=None, help="the reward model that ranks")
    se.add_argument("--data", default=None, help="prompts: any data file, or JSONL {prompt, answer?}")
    se.add_argument("--out", default=None, help="JSONL of results, one row per prompt (default: search.jsonl)")
    se.add_argument("--engine", choices=["hf", "vllm"], default=None, help="the rollout engine (default: hf)")

    sv = sub.add_parser("serve", help="serve a reward model over HTTP (Ray Serve; endpoints in the README)")
    sv.add_argument("--reward-model", required=True, help="reward model checkpoint folder")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    sv.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (> 0: the model runs on cuda)")
    sv.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (default: env DENSE_IRL_TOKEN)")
    sv.add_argument("--max-batch-size", type=int, default=32, help="chains gathered per batch")
    sv.add_argument("--reward-aggregate", choices=["sum", "min", "last"], default="sum",
                    help="/get_reward's and /classify's reward")
    sv.add_argument("--log-steps", type=int, default=0,
                    help="/get_reward: the first N step rewards in extra_logs (step_reward_1..N), for OpenRLHF's logs")
    sv.add_argument("--step-tag", default="<extra_0>", help="/pooling, /classify: the marker that ends each step")
    sv.add_argument("--policy", default=None, help="a policy folder: enables POST /v1/search (sampled on the replica)")
    sv.add_argument("--policy-engine", choices=["hf", "vllm"], default="hf", help="/v1/search's sampler")
    sv.add_argument("--ingress", choices=sorted(INGRESS), default=None,
                    help="haproxy (default): HAProxy straight to the replicas, Ray Serve's high-throughput mode; "
                    "proxy: Serve's Python proxy. Applies to the Ray that serve starts (on a cluster: its env)")
    sv.add_argument("--reload-root", default=None,
                    help="/admin/reload loads only checkpoints under this folder (default: the current folder)")
    sc = sub.add_parser("score", help="score chains with a running 'dense-irl serve'")
    sc.add_argument("--url", default="http://127.0.0.1:8000")
    sc.add_argument("--token", default=None, help="default: env DENSE_IRL_TOKEN")
    sc.add_argument("--data", default=None, help="a file of chains (any supported format)")
    sc.add_argument("--format", default="auto")
    sc.add_argument("--step-separator", default=None)
    sc.add_argument("--out", default=None, help="JSONL of per-chain results (with --data)")
    sc.add_argument("--batch-size", type=int, default=32, help="chains per request (with --data)")
    sc.add_argument("--prompt", default=None)
    sc.add_argument("--step", dest="steps", action="append", default=None, help="one step; repeat in order")
    sc.add_argument("--text", default=None, help="the whole solution, split by --step-separator")
    sc.add_argument("--info", action="store_true", help="print the live checkpoint")

    d = sub.add_parser("demo", help="the end-to-end demo on the synthetic task (the online IRL loop on Ray)")
    d.add_argument("--out", default=None, help="output folder (runs/demo, or runs/demo_offline with --offline)")
    d.add_argument("--config", default=None, help="a YAML path or preset name (default: demo_online, or "
                   "offline_tiny with --offline)")
    d.add_argument("--offline", action="store_true",
                   help="the offline run instead: reward model vs the log-prob of SFT trained as long")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dense-irl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # anywhere: the Jobs entry points put their command first
    argv = [a for a in argv if a != "--verbose"]
    args, rest = build_parser().parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    stray = [a for a in rest if a not in overrides]
    if stray or (overrides and args.cmd not in ("train-reward", "train", "tune", "demo", "search")):
        print(f"error: unrecognised arguments: {' '.join(stray or overrides)}", file=sys.stderr)
        return 2
    from dense_irl.logs import quiet

    quiet(verbose)
    try:
        if args.cmd == "data":
            _data(args)
        elif args.cmd == "eval":
            _eval(args)
        elif args.cmd == "train-reward":
            _train_reward(args, overrides)
        elif args.cmd == "train":
            _train(args, overrides)
        elif args.cmd == "tune":
            return _tune(args, overrides)
        elif args.cmd == "serve":
            _serve(args)
        elif args.cmd == "score":
            _score(args)
        elif args.cmd == "label":
            _label(args)
        elif args.cmd == "search":
            _search(args, overrides)
        elif args.cmd == "demo":
            _demo(args, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
