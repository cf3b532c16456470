"""Ray Tune search over the online IRL loop (`dense-irl tune`).

A search YAML (:class:`TuneConfig`) names a base `dense-irl train` config (a file or inline), a search
space over dotted LoopConfig keys, the evaluation metric ASHA stops on, and the resources of a trial.
Each trial is a Tune function trainable running :func:`dense_irl.runtime.driver.train_online` inside a placement
group whose bundles hold the trial function and the loop's actors. A trial reports on every evaluation
iteration (with the newest loop checkpoint), so `--resume` (``Tuner.restore``) continues an interrupted
search from the trials' last checkpoints.

Written under ``<storage_path>/<name>/``: ``results.csv``, ``results.md``, ``best_config.yaml`` (loads with
``dense-irl train --config``), ``metric_vs_iteration.png``, and each trial's loop output in ``runs/<trial>/``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from dense_irl.config import load_config, resolve_config, save_config, to_dict
from dense_irl.errors import ConfigError, MissingFileError
from dense_irl.eval.report import markdown_table
from dense_irl.io import atomic_path, atomic_write_text
from dense_irl.runtime.driver import train_online
from dense_irl.runtime.loop_config import LoopConfig

# Keys a search may not sample: Tune owns each trial's output folder and resume point, and the
# iteration count / evaluation period (and no wall-clock cut) are the time axis ASHA's rungs are measured on.
FIXED_KEYS = ("output_dir", "resume", "iterations", "eval_every", "minutes")
ONE_ARG = ("choice", "grid")  # their argument is the list of values; the others take positional args


@dataclass
class ASHAConfig:
    """Asynchronous successive halving on the loop's iteration count."""

    grace_period: int = 1  # loop iterations before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int | None = None  # default: the base config's iterations


@dataclass
class ResourcesConfig:
    """One placement group per trial: the trial function (the loop's driver) first, then the actors."""

    trial_cpus: float = 0.25
    trial_gpus: float = 0.0
    bundles: list[dict[str, float]] | None = None  # replaces the bundles derived from the trial's config
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class TuneConfig:
    """`dense-irl tune --search FILE`: the search space and how the search runs."""

    base: Any = None  # LoopConfig YAML (path relative to the search file) or an inline LoopConfig mapping
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted LoopConfig keys set on the base
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # "reward.lr": {loguniform: [1e-4, 1e-2]}
    metric: Literal["eval/localisation_f1", "eval/policy_accuracy"] = "eval/localisation_f1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 4  # samples of the space (each grid value is tried once per sample)
    max_concurrent_trials: int = 2
    asha: ASHAConfig = field(default_factory=ASHAConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage_path: str = "runs/tune"
    name: str = "search"
    seed: int | None = 0  # of the search's random sampling
    best_scope: Literal["last", "avg", "all", "last-5-avg", "last-10-avg"] = "last"  # Tune's get_best_result
    keep_checkpoints: int = 2  # Tune's copies per trial (the loop keeps its own in runs/<trial>/)
    max_failures: int = 0  # retries of a trial that crashed, from its last checkpoint


# Ray Tune's samplers by name; "grid" is tune.grid_search (every value once per sample).
DISTRIBUTIONS = {
    **{n: getattr(tune, n) for n in ("uniform", "quniform", "loguniform", "qloguniform", "randn", "qrandn")},
    **{n: getattr(tune, n) for n in ("randint", "qrandint", "lograndint", "qlograndint", "choice")},
    "grid": tune.grid_search,
}


def _yaml_value(v: Any) -> str:
    if hasattr(v, "item") and not isinstance(v, (list, dict)):  # numpy scalars from Tune's samplers
        v = v.item()
    # safe_dump writes floats as 1.0e-05, which safe_load reads back as a float (1e-05 would be a string).
    return yaml.safe_dump(v, default_flow_style=True)


def as_overrides(values: dict, prefix: str = "") -> list[str]:
    """Nested or dotted ``{key: value}`` as ``--a.b=value`` overrides that load_config reads back exactly."""
    out = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += as_overrides(v, key + ".")
        else:
            out.append(f"--{key}={_yaml_value(v)}")
    return out


def loop_config(base: dict, params: dict) -> LoopConfig:
    """The LoopConfig of one trial: the resolved base (``to_dict`` of a LoopConfig) with sampled dotted keys."""
    return load_config(LoopConfig, None, as_overrides(base) + as_overrides(params))


def load_tune_config(
    path: str | Path, base: str | None = None, overrides: list[str] | None = None
) -> TuneConfig:
    """The search YAML at ``path`` (or the preset of that name); a relative ``base`` is resolved against the
    search file's folder.

    ``base`` (e.g. ``--config`` on the command line) replaces the YAML's base; ``overrides`` are dotted
    flags on the search config itself (e.g. ``--storage_path=...``).
    """
    path = resolve_config(path)
    cfg = load_config(TuneConfig, path, overrides)
    if base is not None:
        cfg.base = str(resolve_config(base).resolve()) if (Path(base).is_file() or "/" not in base) else base
    elif isinstance(cfg.base, str):
        cfg.base = str((path.resolve().parent / cfg.base).resolve())
    return cfg


def resolve_base(cfg: TuneConfig, overrides: list[str] | None = None) -> LoopConfig:
    """The base LoopConfig: ``cfg.base`` (file or mapping), then ``cfg.overrides``, then dotted flags."""
    extra = as_overrides(cfg.overrides) + list(overrides or [])
    if isinstance(cfg.base, str):
        if not Path(cfg.base).is_file():
            raise ConfigError(f"base config not found: {cfg.base}")
        return load_config(LoopConfig, cfg.base, extra)
    if isinstance(cfg.base, dict):
        return load_config(LoopConfig, None, as_overrides(cfg.base) + extra)
    raise ConfigError("no base config: set `base` in the search YAML (a file or a mapping) or pass --config")


def search_space(cfg: TuneConfig, base: LoopConfig) -> dict:
    """Tune's param space from ``cfg.space``; every key and value is checked against LoopConfig first.

    Raises ConfigError naming the key for a fixed or unknown key, an unknown distribution, bad arguments,
    or values of the wrong type for the field (each choice / grid value, or a few samples, are loaded).
    """
    base_dict, space = to_dict(base), {}
    for key, spec in cfg.space.items():
        where, top = f"search space key {key!r}", key.split(".")[0]
        if top in FIXED_KEYS:
            raise ConfigError(f"{where}: {top} is set by the search itself and cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(
                f"{where}: expected one distribution like {{loguniform: [1.0e-4, 0.01]}}: {spec!r}"
            )
        ((name, args),) = spec.items()
        if name not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {name!r}; valid: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or (name in ONE_ARG and not args):
            raise ConfigError(f"{where}: {name} takes a non-empty list, got {args!r}")
        try:
            space[key] = DISTRIBUTIONS[name](args) if name in ONE_ARG else DISTRIBUTIONS[name](*args)
            values = list(args) if name in ONE_ARG else list(space[key].sample(size=4, random_state=0))
        except (TypeError, ValueError, AssertionError) as e:
            strs = any(isinstance(a, str) for a in args)
            hint = "; write floats with a dot (1.0e-4): YAML reads 1e-4 as a string" if strs else ""
            raise ConfigError(f"{where}: bad arguments {args!r} for {name}: {e}{hint}") from e
        for v in values:
            try:
                trial = loop_config(base_dict, {key: v})
                for part in (trial.data, trial.reward, trial.rl, trial.learner, trial.rollout):
                    part.check()  # a value that loads but cannot run (e.g. objective airl with token_temperature)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from e
    return space


def check_search(cfg: TuneConfig, base: LoopConfig) -> None:
    """Search-level checks that Tune would only report mid-run (or never)."""
    if base.eval_every < 1 or base.iterations % base.eval_every:
        raise ConfigError(
            f"eval_every ({base.eval_every}) must be >= 1 and divide iterations ({base.iterations}): "
            f"trials report {cfg.metric} from the periodic evaluation"
        )
    if base.minutes:
        raise ConfigError(
            f"minutes ({base.minutes}) must be 0 in a search: ASHA compares trials at equal "
            f"iterations, and a run cut by its time budget ends unevaluated"
        )
    a = cfg.asha
    max_t = a.max_t or base.iterations
    if a.grace_period < 1 or a.reduction_factor <= 1 or max_t < a.grace_period:
        raise ConfigError(
            f"asha: need grace_period >= 1, reduction_factor > 1, max_t >= grace_period; got "
            f"grace_period={a.grace_period}, reduction_factor={a.reduction_factor}, max_t={max_t}"
        )
    for name in ("num_samples", "max_concurrent_trials", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name must be a plain folder name, got {cfg.name!r}")


def trial_bundles(loop: LoopConfig, res: ResourcesConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the trial function, then one per actor the loop starts
    (policy learners, reward learners, rollout workers); ``res.bundles`` replaces them when given."""
    if res.bundles:
        return [dict(b) for b in res.bundles]

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}

    lr, ro = loop.learner, loop.rollout
    actors = [bundle(lr.num_cpus_per_worker, lr.num_gpus_per_worker)] * (2 * lr.num_workers) + [
        bundle(ro.num_cpus_per_worker, ro.num_gpus_per_worker)
    ] * ro.num_workers
    return [bundle(res.trial_cpus, res.trial_gpus)] + [b for b in actors if b]


def _trial_resources(config: dict, base: dict, res: ResourcesConfig) -> tune.PlacementGroupFactory:
    return tune.PlacementGroupFactory(trial_bundles(loop_config(base, config), res), strategy=res.strategy)


def _trial(config: dict, base: dict, runs_dir: str, metric: str) -> None:
    """One trial: the loop with the sampled keys, reporting on evaluation iterations (Tune function API)."""
    loop = loop_config(base, config)
    loop.output_dir = str(Path(runs_dir) / tune.get_context().get_trial_id())
    pg = ray.util.get_current_placement_group()
    bundles = len(pg.bundle_specs) if pg is not None else 0
    pending: list = [None]  # the newest loop checkpoint not yet handed to Tune

    def report(metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            pending[0] = checkpoint
        if metric in metrics:  # Tune checks every result for the metric, so only evaluated iterations go up
            ckpt = tune.Checkpoint.from_directory(str(pending[0])) if pending[0] is not None else None
            tune.report({**metrics, "trial/bundles": bundles}, checkpoint=ckpt)
            pending[0] = None

    restored = tune.get_checkpoint()
    if restored is None:
        train_online(loop, report)
        return
    with restored.as_directory() as d:
        loop.resume = d
        train_online(loop, report)


def run_tune(
    cfg: TuneConfig,
    overrides: list[str] | None = None,
    resume: bool = False,
    callbacks: list[tune.Callback] | None = None,
) -> dict:
    """Run (or with ``resume`` continue) the search and write its reports; returns a summary.

    Everything in the config is checked before Ray Tune starts. ``overrides`` are dotted flags on the
    base LoopConfig; ``callbacks`` are extra Tune callbacks of a new search (a restored search keeps its
    own). An interrupted search (Ctrl-C) returns ``{"interrupted": True, ...}`` without reports.
    """
    base = resolve_base(cfg, overrides)
    check_search(cfg, base)
    space = search_space(cfg, base)
    exp = Path(cfg.storage_path).resolve() / cfg.name
    if resume and not tune.Tuner.can_restore(str(exp)):
        raise MissingFileError(f"--resume: no search to continue in {exp}")
    if not resume and exp.exists() and tune.Tuner.can_restore(str(exp)):
        raise ConfigError(f"{exp} already holds a search: continue it with --resume, or set another name")

    base_dict = to_dict(base)
    # Trials keep the caller's working directory, so relative paths in the config mean what they do for
    # `dense-irl train` (Tune passes this variable on to the trial processes).
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    if not ray.is_initialized():
        from dense_irl.logs import ray_init_kwargs

        ray.init(address=os.environ.get("RAY_ADDRESS"), **ray_init_kwargs())
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base_dict, runs_dir=str(exp / "runs"), metric=cfg.metric),
        resources=functools.partial(_trial_resources, base=base_dict, res=cfg.resources),
    )
    if resume:
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                num_samples=cfg.num_samples,
                # The variant generator limits concurrency itself (Tune ignores max_concurrent_trials for it).
                search_alg=BasicVariantGenerator(
                    random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials
                ),
                scheduler=ASHAScheduler(
                    time_attr="iteration",
                    max_t=cfg.asha.max_t or base.iterations,
                    grace_period=cfg.asha.grace_period,
                    reduction_factor=cfg.asha.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=str(exp.parent),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=callbacks,
            ),
        )
    results = tuner.fit()
    # After Ctrl-C Tune ends every trial in memory; the state it saved on disk (what --resume reads)
    # still says which trials were unfinished.
    saved = tune.ExperimentAnalysis(str(exp)).trials
    unfinished = sum(t.status not in ("TERMINATED", "ERROR") for t in saved)
    if unfinished:
        return {"interrupted": True, "experiment": str(exp), "trials": len(saved), "unfinished": unfinished}
    return write_reports(results, cfg, base, exp)


def _trial_rows(results, cfg: TuneConfig, base: LoopConfig) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    for r in results:
        df, metrics, config = r.metrics_dataframe, r.metrics or {}, r.config or {}
        trial = metrics.get("trial_id") or Path(r.path).name
        # A trial resumed from an earlier checkpoint reports some iterations twice: the later value stays.
        by_it = {} if df is None or cfg.metric not in df else dict(zip(df["iteration"], df[cfg.metric]))
        points = curves[trial] = sorted((int(i), float(v)) for i, v in by_it.items() if not math.isnan(v))
        values = [v for _, v in points]
        last_it = points[-1][0] if points else 0
        status = "completed" if last_it >= base.iterations else "stopped early"
        error = (str(r.error).strip().splitlines() or [""])[-1][:200] if r.error is not None else None
        row = {"trial": trial, "status": "error" if error is not None else status, "iterations": last_it}
        row[cfg.metric] = values[-1] if values else None
        row[f"best {cfg.metric}"] = (max(values) if cfg.mode == "max" else min(values)) if values else None
        rows.append({**row, **{k: config.get(k) for k in cfg.space}, "error": error})
    rows.sort(key=lambda row: row["trial"])
    return rows, curves


def write_reports(results, cfg: TuneConfig, base: LoopConfig, exp: Path) -> dict:
    """results.csv, results.md, best_config.yaml and metric_vs_iteration.png in ``exp``; returns a summary."""
    rows, curves = _trial_rows(results, cfg, base)
    names = {"csv": "results.csv", "md": "results.md", "best_config": "best_config.yaml"}
    out = {k: exp / v for k, v in {**names, "plot": "metric_vs_iteration.png"}.items()}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out["csv"], buf.getvalue())
    n_stopped, n_errors = (sum(r["status"] == s for r in rows) for s in ("stopped early", "error"))
    summary = {"experiment": str(exp), "trials": len(rows), "stopped_early": n_stopped, "errors": n_errors}
    # 4 significant digits: learning rates such as 3e-05 would read 0.000 at the table's 3 decimals.
    md_rows = [{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    try:
        best = results.get_best_result(cfg.metric, cfg.mode, scope=cfg.best_scope)
    except RuntimeError:
        best = None
    head = (
        f"# Tune search `{cfg.name}`\n\n{len(rows)} trials, metric `{cfg.metric}` ({cfg.mode}), ASHA on the loop "
        f"iteration (grace {cfg.asha.grace_period}, reduction {cfg.asha.reduction_factor}); {n_stopped} "
        f"stopped early.\n\n"
    )
    if best is None:
        atomic_write_text(out["md"], head + markdown_table(md_rows) + "\nNo trial reported the metric.\n")
        first = next((r["error"] for r in rows if r["error"]), None)
        raise ConfigError(
            f"no trial of {exp} reported {cfg.metric} ({n_errors} of {len(rows)} failed"
            + (f"; first error: {first}" if first else "")
            + "); see results.md and the trial logs"
        )
    params = {k: best.config[k] for k in cfg.space}
    best_loop = loop_config(to_dict(base), params)
    best_loop.output_dir, best_loop.resume = str(exp / "best_run"), "no"
    save_config(best_loop, out["best_config"])
    best_trial = best.metrics.get("trial_id")
    atomic_write_text(
        out["md"],
        head + markdown_table(md_rows) + f"\nBest (scope `{cfg.best_scope}`): trial "
        f"`{best_trial}`, {cfg.metric} = {best.metrics.get(cfg.metric):.4g}, "
        f"params {params}. Train it: `dense-irl train --config {out['best_config']}`\n",
    )
    plot_curves(curves, cfg.metric, out["plot"], {r["trial"]: r["status"] for r in rows})
    summary |= {"best_trial": best_trial, "best_metric": best.metrics.get(cfg.metric), "best_params": params}
    return summary | {k: str(v) for k, v in out.items()}


def plot_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: Path, status: dict) -> None:
    """One line of ``metric`` against the loop iteration per trial, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for trial, pts in sorted(curves.items()):
        if not pts:
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, ys, marker="o", label=f"{trial} ({status.get(trial, '?')})")
        if status.get(trial) == "stopped early":
            ax.plot(xs[-1], ys[-1], marker="x", markersize=12, color=line.get_color())
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (x: stopped by ASHA)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
