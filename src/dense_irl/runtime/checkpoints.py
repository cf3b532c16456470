"""The online loop's checkpoints on disk: written whole or not at all, and found again after any crash.

A checkpoint is written into ``checkpoints/.iter_N.tmp`` (policy, reward model, optimisers, then
``state.json`` last) and renamed to ``checkpoints/iter_N`` in one step; only then does ``checkpoints/latest``
(itself replaced atomically) name it. So a folder called ``iter_N`` is always complete, a process killed at
any moment leaves at most a ``.tmp`` folder that nothing reads, and a failed write (a full disk) leaves the
previous checkpoint and ``latest`` as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from dense_irl.errors import CheckpointError, MissingFileError
from dense_irl.io import write_json

NAME = re.compile(r"iter_(\d{6,})")
STATE_KEYS = ("iteration", "cursor", "rng")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints``: the one ``latest`` names, or, when that
    one is gone (a crash between replacing a checkpoint of the same iteration and renaming its successor), the
    highest-numbered ``iter_N`` folder with its ``state.json``."""
    root = out_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / "state.json").is_file():
            return named
    done = [p for p in root.glob("iter_*") if NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[5:])) if done else None


def write_checkpoint(root: Path, iteration: int, state: dict, save_models: Callable[[Path], None]) -> Path:
    """Write ``root/iter_N`` atomically: ``save_models(tmp)`` writes the models and optimisers into the
    temporary folder, then ``state.json`` goes in, the folder is renamed and ``latest`` moved to it. Any
    failure removes the temporary folder and leaves the previous checkpoint and ``latest`` untouched; one that
    is the disk's (a full disk, a permission) is one :class:`CheckpointError` naming the path, anything else
    (a dead actor, an interrupt) is raised as it is."""
    final, tmp = root / f"iter_{iteration:06d}", root / f".iter_{iteration:06d}.tmp"
    previous = latest_checkpoint(root.parent)
    try:
        if tmp.exists():  # left by a run killed mid-write
            shutil.rmtree(tmp)
        save_models(tmp)
        write_json(tmp / "state.json", state)
        old = root / f".iter_{iteration:06d}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():  # the same iteration again: move it aside, never delete it before the new one is in
            os.replace(final, old)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = getattr(e, "cause", None) or e  # an actor's error arrives wrapped in Ray's RayTaskError
        if not isinstance(cause, OSError):  # not the disk's fault (a dead actor, Ctrl-C): the caller's to handle
            raise
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {type(cause).__name__}: {cause}; {kept} and "
                              f"{root / 'latest'} still names it") from None
    return final


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's ``state.json``; a file that is not JSON, or lacks a field, is one clear error."""
    path = checkpoint / "state.json"
    if not path.is_file():
        raise MissingFileError(f"resume: {checkpoint} is not a checkpoint of the loop (no state.json)")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"resume: {path} is not valid JSON ({e})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"resume: {path} lacks {missing}; it was not written by dense-irl's loop")
    return state
