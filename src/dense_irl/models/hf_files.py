"""Loading ``save_pretrained`` folders with errors that name the file: a missing, truncated or edited
checkpoint is one :class:`CheckpointError` (or :class:`MissingFileError`), never a traceback from deep
inside transformers, safetensors or torch."""

from __future__ import annotations

import json
from pathlib import Path

from dense_irl.errors import CheckpointError, MissingFileError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def check_safetensors(file: Path) -> None:
    """The file's header parses (its tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{file} is not a readable safetensors file ({_first_line(e)})") from None


def check_model_folder(path: str | Path, what: str) -> Path:
    """Cheap checks of a model folder before anything loads it: ``config.json`` is JSON, weights exist and
    each safetensors header parses. Returns the path."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{what} not found: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise MissingFileError(f"{what} {path} has no config.json: not a save_pretrained folder")
    try:
        json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config} is not valid JSON ({e})") from None
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise MissingFileError(f"{what} {path} has no weights (none of {list(WEIGHT_FILES)})")
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    return path


def load_causal_lm(path: str | Path, what: str, checked: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` after :func:`check_model_folder` (unless the caller
    ``checked`` it already); whatever still fails (wrong shapes, an edited config) is one error naming the
    folder."""
    from transformers import AutoModelForCausalLM

    path = Path(path) if checked else check_model_folder(path, what)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise CheckpointError(f"{what} {path} does not load ({_first_line(e)})") from None


def load_tokenizer(path: str | Path, what: str):
    """``AutoTokenizer.from_pretrained(path)``; a failure is one error naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"the tokenizer of {what} {path} does not load ({_first_line(e)})") from None
