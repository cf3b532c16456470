"""``dense-irl search``: reward-guided search over a file of prompts, one JSONL row per prompt.

    dense-irl search --policy=PATH --reward_model=PATH --data=FILE [--out=search.jsonl]
                     [--search.method=beam --search.beam_width=2 --search.expand=2 ...] [--config FILE]

Each row: the prompt, the chosen chain (steps, step scores, score, answer), every ranked candidate, the tokens
generated and, when the data has answers, whether the choice is right. The summary (printed, and written
beside the rows as ``<out>.summary.json``) gives accuracy of the reward-guided choice and, on the same
samples, of majority vote over the candidates' answers and of the oracle (any candidate right).
"""

from __future__ import annotations

import time
from pathlib import Path

from dense_irl.data.answers import is_correct
from dense_irl.data.readers import detect_format, jsonl_rows, load_demonstrations
from dense_irl.data.schema import Demonstration
from dense_irl.errors import DataError
from dense_irl.io import write_json, write_jsonl
from dense_irl.search.config import SearchJobConfig
from dense_irl.search.step_search import Candidate, SearchResult, reward_model_scorer, search


def load_prompts(path: str, fmt: str = "auto") -> list[Demonstration]:
    """The problems to search: any demonstration file (its answers check the choices), or a JSONL of bare
    prompts ``{"prompt": ..., "answer"?: ...}`` (no steps needed)."""
    if fmt == "auto" and detect_format(path) == "plain" and Path(path).suffix != ".parquet":
        first = next((row for _, row in jsonl_rows(Path(path)) if isinstance(row, dict)), {})
        if "steps" not in first and "solution" not in first:
            out = []
            for ln, row in jsonl_rows(Path(path)):
                if isinstance(row, DataError):
                    raise row
                if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                    raise DataError(path, ln, "prompt", "missing or not a non-empty string")
                answer = row.get("answer")
                out.append(Demonstration(str(row.get("id", f"prompt-{ln}")), row["prompt"], [],
                                         None if answer is None else str(answer), "prompts", {}))
            if not out:
                raise DataError(path, None, None, "no rows in file")
            return out
    return load_demonstrations(path, fmt)[0]


def _correct(demo: Demonstration, c: Candidate | None, separator: str) -> bool | None:
    if demo.answer is None and demo.source != "synthetic":
        return None
    return c is not None and bool(c.steps) and is_correct(demo, c.completion(separator))


def result_row(demo: Demonstration, res: SearchResult, separator: str) -> dict:
    """One output row: the choice, its verdict when the answer is known, and every ranked candidate."""
    def cand(c: Candidate) -> dict:
        return {"steps": c.steps, "step_scores": c.step_scores, "score": c.score, "finished": c.finished,
                "answer": c.answer, "correct": _correct(demo, c, separator)}

    return {"id": demo.id, "prompt": demo.prompt, "completion": res.best.completion(separator),
            **cand(res.best), "majority_correct": _correct(demo, res.majority(), separator),
            "tokens_generated": res.tokens_generated, "candidates": [cand(c) for c in res.candidates]}


def summarise(rows: list[dict], method: str) -> dict:
    """Accuracy of the reward-guided choice, of majority vote and of the oracle over the same candidates."""
    known = [r for r in rows if r["correct"] is not None]
    out = {"prompts": len(rows), "method": method,
           "tokens_generated": sum(r["tokens_generated"] for r in rows),
           "finished": sum(r["finished"] for r in rows) / max(1, len(rows))}
    if known:
        out |= {"with_answers": len(known),
                "accuracy": sum(r["correct"] for r in known) / len(known),
                "majority_accuracy": sum(r["majority_correct"] for r in known) / len(known),
                "oracle_accuracy": sum(any(c["correct"] for c in r["candidates"]) for r in known) / len(known)}
    return out


def make_engine(cfg: SearchJobConfig):
    """The rollout engine that samples for the search (``hf`` or ``vllm``), on the configured device."""
    import torch

    from dense_irl.sampling.engines import HFEngine, RolloutConfig, VLLMEngine

    if cfg.engine == "vllm":
        return VLLMEngine(cfg.policy, cfg.search.seed, cfg=RolloutConfig(engine="vllm"))
    engine = HFEngine(cfg.policy, cfg.search.seed)
    if cfg.device != "auto":
        engine.device = cfg.device
        engine.model.to(torch.device(cfg.device))
    return engine


def run_search(cfg: SearchJobConfig, engine=None, rm=None, progress: bool = True) -> dict:
    """Search every prompt of ``cfg.data``; writes ``cfg.out`` (+ ``.summary.json``) and returns the summary.

    ``engine`` / ``rm``: already loaded ones (a benchmark reuses them across methods)."""
    from tqdm import tqdm

    from dense_irl.models.reward_model import RewardModel

    cfg.check()
    demos = load_prompts(cfg.data, cfg.format)
    if cfg.limit:
        demos = demos[: cfg.limit]
    if rm is None:
        import torch

        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        rm = RewardModel.from_pretrained(cfg.reward_model, device)
    engine = engine or make_engine(cfg)
    separator, scorer = rm.config.separator, reward_model_scorer(rm, cfg.batch_size)
    rows, t0 = [], time.monotonic()
    with tqdm(total=len(demos), desc=f"search ({cfg.search.method})", unit="prompt", disable=not progress,
              mininterval=2) as bar:
        for s in range(0, len(demos), cfg.prompts_per_batch):
            chunk = demos[s : s + cfg.prompts_per_batch]
            results = search(engine, scorer, [d.prompt for d in chunk], cfg.search, separator, cfg.batch_size)
            rows += [result_row(d, r, separator) for d, r in zip(chunk, results)]
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{sum(r['tokens_generated'] for r in rows) / (time.monotonic() - t0):.0f}")
    summary = summarise(rows, cfg.search.method) | {"seconds": round(time.monotonic() - t0, 1), "out": cfg.out}
    write_jsonl(cfg.out, rows)
    write_json(str(cfg.out) + ".summary.json", summary)
    return summary
