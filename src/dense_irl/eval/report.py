"""Reports of the offline evaluations: Markdown tables, JSON + Markdown files, step-reward plots."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np

from dense_irl.errors import ConfigError
from dense_irl.io import atomic_path, atomic_write_text


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows``; floats to 3 decimals, missing cells as '-'.

    ``columns`` defaults to every key in order of first appearance.
    """
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    if not columns:
        return "_no rows_\n"
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def localisation_markdown(report: dict, title: str = "Error localisation (ProcessBench)") -> str:
    """Summary of an :func:`~dense_irl.eval.localisation.evaluate_localisation` report."""
    keys = ("n", "n_error", "n_correct", "error_acc", "correct_acc", "f1", "threshold", "n_truncated")
    main = {k: report.get(k) for k in keys}
    parts = [
        f"## {title}\n",
        f"Threshold rule: {report.get('threshold_rule', '-')}.\n",
        markdown_table([main]),
    ]
    if report.get("n_truncated") or report.get("n_truncated_calibration"):
        parts.append(
            f"\n{report.get('n_truncated')} evaluated and {report.get('n_truncated_calibration') or 0} calibration "
            f"chains were longer than max_length ({report.get('n_error_cut', 0)} with their first error cut off): "
            f"{report.get('truncation_rule', 'scored on the steps that fit')}.\n"
        )
    if report.get("n_error"):
        misses = {k: report.get(k) for k in ("n_early", "n_late", "n_missed")}
        parts += ["\nErroneous chains by where the prediction fell:\n", markdown_table([misses])]
    if report.get("per_error_type"):
        rows = [{"error_type": t, **d} for t, d in report["per_error_type"].items()]
        parts += [
            "\nPer error type (erroneous chains):\n",
            markdown_table(rows, ["error_type", "error_acc", "n"]),
        ]
    return "\n".join(parts)


def bon_markdown(report: dict, title: str = "Best-of-N reranking") -> str:
    """Summary of an :func:`~dense_irl.eval.bon.evaluate_bon` report: one row per method."""
    rows = []
    for method, acc in report["accuracy"].items():
        ours = [*report.get("aggregations", []), "weighted_vote", "vote_then_reward"]
        kind = "reward model" if method in ours else "baseline"
        lo, hi = report.get("ci95", {}).get(method, (None, None))
        rows.append({"method": method, "kind": kind, "accuracy": acc, "ci95_low": lo, "ci95_high": hi})
    head = (
        f"## {title}\n\n{report['n']} problems, N = {report['N']:.3f} candidates per problem "
        f"(min {report.get('N_min', '-')}, max {report.get('N_max', '-')}). "
        f"Reward-model rows pick the candidate with the highest aggregated step score; "
        f"{report.get('tie_rule', '')}.\n"
    )
    if report.get("n_truncated"):
        head += (f"\n{report['n_truncated']} of {report.get('n_candidates', '-')} candidates were longer than "
                 f"max_length: {report.get('truncation_rule', 'aggregated over the steps that fit')}.\n")
    return head + "\n" + markdown_table(rows)


def plot_chain(row: dict, scores: list[float], path: str | Path, threshold: float | None) -> bool:
    """:func:`plot_step_rewards` of a ProcessBench row, on the steps that were scored (a truncated chain is
    titled so, its cut-off error left unmarked); False when not even its first step was scored."""
    if not scores:
        return False
    cut = len(scores) < len(row["steps"])
    plot_step_rewards(row["steps"][: len(scores)], scores, path, title=row["problem"][:80] + (" [truncated]" if cut else ""),
                      threshold=threshold, first_error_label=row["label"] if row["label"] < len(scores) else None)
    return True


def plot_step_rewards(
    steps: list[str],
    rewards: list[float],
    path: str | Path,
    title: str = "",
    threshold: float | None = None,
    first_error_label: int | None = None,
) -> None:
    """Bar plot of per-step rewards (step index on x) written atomically as a PNG to ``path``.

    ``threshold`` is drawn as a dashed line (bars below it are the flagged steps); the true first
    error ``first_error_label`` (-1 = none) is marked with a red outline and label.
    """
    if len(steps) != len(rewards):
        raise ValueError(f"{len(steps)} steps but {len(rewards)} rewards")
    if not steps:
        raise ValueError("nothing to plot: the chain has no steps")
    if first_error_label is not None and not -1 <= first_error_label < len(steps):
        raise ValueError(f"first_error_label {first_error_label} out of range for {len(steps)} steps")
    # Figure + Agg canvas, not pyplot: no global state, safe in worker threads without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(steps))
    r = np.asarray(rewards, dtype=np.float64)
    fig = Figure(figsize=(max(6.0, 0.6 * len(steps) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:orange" if threshold is not None and v < threshold else "tab:blue" for v in r]
    bars = ax.bar(x, r, color=colors)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    if first_error_label is not None and first_error_label >= 0:
        bars[first_error_label].set_edgecolor("red")
        bars[first_error_label].set_linewidth(2.5)
        ax.axvline(first_error_label, color="red", linestyle=":", linewidth=1, label="true first error")
    ax.set_xticks(x)
    if len(steps) <= 12:  # short chains: show the start of each step under its index
        ax.set_xticklabels([f"{i}\n{s[:14]}" for i, s in enumerate(steps)], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("step reward")
    ax.set_title(textwrap.fill(title, 70) if title else "step rewards", fontsize=9)
    if threshold is not None or (first_error_label is not None and first_error_label >= 0):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    # format="png": the temporary file's name ends in .tmp, so matplotlib cannot infer it.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plain(obj):
    """JSON-ready copy: numpy scalars/arrays to Python, NaN/inf to None, paths to str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(report: dict, out_json: str | Path, markdown: str) -> None:
    """Write ``report`` as JSON to ``out_json`` and ``markdown`` to the sibling ``.md``, atomically."""
    out_json = Path(out_json)
    if out_json.suffix == ".md":
        raise ConfigError(f"out_json {out_json} ends in .md; its Markdown sibling would overwrite it")
    atomic_write_text(out_json, json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_json.with_suffix(".md"), markdown)
