"""Step labels from a reward model (``dense-irl label IN OUT``): unlabelled chains in, TRL stepwise or
ProcessBench rows out, with the model's verdict and score for every step.

A step's verdict is the checkpoint's first-error rule read step by step: right when its score is at or
above the stored threshold. TRL rows (``{prompt, completions, labels}``, what TRL's ``PRMTrainer`` trains
on) carry one verdict per step; ProcessBench rows (``{problem, steps, label, final_answer_correct}``) carry
the predicted first error. A chain longer than the checkpoint's ``max_length`` is labelled on the steps that
fit: a TRL row keeps only those (a label per completion), a ProcessBench row keeps every step; both say
``truncated``. Both formats load back with ``data.readers`` (``--format trl`` / ``processbench``).
"""

from __future__ import annotations

from pathlib import Path

from dense_irl.data.readers import load_demonstrations
from dense_irl.errors import ConfigError
from dense_irl.io import write_jsonl

LABEL_FORMATS = ("trl", "processbench")


def label_rows(rm, demos, fmt: str = "trl", batch_size: int = 32, progress: str | None = "label") -> list[dict]:
    """One output row per demonstration: the reward model's verdicts in ``fmt`` (``trl`` / ``processbench``)."""
    if fmt not in LABEL_FORMATS:
        raise ConfigError(f"label format must be one of {list(LABEL_FORMATS)}, got {fmt!r}")
    cfg = rm.config
    scores = rm.score([(d.prompt, d.steps) for d in demos], batch_size, progress=progress)
    rows = []
    for d, s in zip(demos, scores):
        common = {"step_scores": s.step_rewards, "threshold": cfg.threshold, "model_version": cfg.version,
                  "truncated": s.steps_scored < len(d.steps), "steps_given": len(d.steps)}
        if fmt == "trl":
            rows.append({"id": d.id, "prompt": d.prompt, "completions": list(d.steps[: s.steps_scored]),
                         "labels": [r >= cfg.threshold for r in s.step_rewards], **common})
        else:
            rows.append({"id": d.id, "problem": d.prompt, "steps": list(d.steps), "label": s.first_error,
                         "final_answer_correct": s.first_error == -1,
                         "error_type": "none" if s.first_error == -1 else "predicted", **common})
    return rows


def label_file(reward_model: str | Path, data: str | Path, out: str | Path, fmt: str = "trl",
               data_format: str = "auto", step_separator: str | None = None, batch_size: int = 32,
               skip_bad: bool = False) -> dict:
    """Label every chain of ``data`` (any supported format) with ``reward_model``; write ``out`` (JSONL,
    atomically). Returns a summary."""
    from dense_irl.models.reward_model import RewardModel

    if fmt not in LABEL_FORMATS:
        raise ConfigError(f"--as must be one of {list(LABEL_FORMATS)}, got {fmt!r}")
    if Path(out).suffix != ".jsonl":
        raise ConfigError(f"{out}: the labelled rows are written as JSONL; give a .jsonl path")
    rm = RewardModel.from_pretrained(reward_model)
    demos, skipped = load_demonstrations(data, fmt=data_format, step_separator=step_separator, skip_bad=skip_bad)
    rows = label_rows(rm, demos, fmt, batch_size)
    write_jsonl(out, rows)
    wrong = sum((r["label"] >= 0) if fmt == "processbench" else (False in r["labels"]) for r in rows)
    return {"out": str(out), "format": fmt, "chains": len(rows), "skipped": skipped,
            "chains_with_an_error": wrong, "truncated": sum(r["truncated"] for r in rows),
            "model_version": rm.config.version, "threshold": rm.config.threshold}
