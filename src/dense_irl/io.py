"""Atomic file output: nothing a user gave or a run produced is left half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    A reader never sees a half-written checkpoint: the old folder stays until the new one is
    complete, and the swap is two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_jsonl(path: Path | str, rows) -> None:
    """Write dict rows as JSON lines, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_json(path: Path | str, obj) -> None:
    """Write one JSON document (indented), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class MetricsLog:
    """A run's metrics: one JSON line per row in ``metrics.jsonl`` and the float fields in TensorBoard (``tb/``)."""

    def __init__(self, out_dir: Path | str):
        from torch.utils.tensorboard import SummaryWriter

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, row: dict, step: int, prefix: str = "") -> None:
        """Append ``row``; its float fields go to TensorBoard as ``prefix/key`` at ``step``."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if isinstance(v, float):
                self.tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
