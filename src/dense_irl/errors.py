"""The project's user errors: what the user gave is wrong (a config, a data row, a path, a checkpoint).

The CLI prints such an error as one line ``error: ...`` and exits with status 2; any other exception is
a bug of dense-irl and shows its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Base of every error caused by the user's input; its message names what is wrong and where."""


class ConfigError(UserError, ValueError):
    """A config file, override or option value that cannot run."""


class DataError(UserError, ValueError):
    """A data row that cannot be read; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, problem: str):
        self.path, self.line, self.field = str(path), line, field_name
        where = str(path) + (f", line {line}" if line is not None else "")
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{problem}")


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (data, model, checkpoint) is not there."""


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that exists but cannot be loaded (a missing part, a bad file)."""


class ActorDiedError(UserError, RuntimeError):
    """An actor of the loop died mid-run (killed, out of memory, its node lost); the message names the actor
    and how to resume from the last complete checkpoint."""
