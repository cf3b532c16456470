"""Dataclass configs loaded from YAML and overridden with dotted ``--key=value`` flags.

Every component has one dataclass config; nested dataclasses are nested YAML mappings. Unknown
keys are an error that names the key and lists the valid ones, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dense_irl.errors import ConfigError

T = TypeVar("T")
PRESETS = "dense_irl.presets"  # the shipped recipes: package data, found by name after `pip install .`


def preset_names() -> list[str]:
    """The names of the shipped presets (``demo_online``, ``offline_tiny``, ...)."""
    from importlib.resources import files

    return sorted(f.name[:-5] for f in files(PRESETS).iterdir() if f.name.endswith(".yaml"))


def resolve_config(path_or_name: str | Path) -> Path:
    """A config file: an existing path, else a shipped preset's name (``demo_online`` or ``demo_online.yaml``)."""
    from importlib.resources import files

    p = Path(path_or_name).expanduser()
    if p.is_file():
        return p
    name = p.name if p.name.endswith(".yaml") else f"{p.name}.yaml"
    if len(p.parts) == 1:
        res = files(PRESETS) / name
        if res.is_file():
            return Path(str(res))
    raise ConfigError(f"config file not found: {path_or_name} (a path, or a preset: {', '.join(preset_names())})")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints pass as floats, nothing else is cast."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, where: str) -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys{' of ' + where if where else ''}: "
            f"{', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{key}: {p} is not a mapping")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """Turn ``["--a.b=1", "--c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key.sub=value")
        key, raw = arg[2:].split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # e.g. --x=[1 or a control character
            why = getattr(e, "problem", None) or e
            raise ConfigError(f"override {arg!r}: the value is not a YAML scalar or list ({why})") from None
        _set_dotted(out, key, value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from defaults, then the YAML file at ``path`` (or the preset of that name), then dotted
    overrides."""
    data: dict = {}
    if path is not None:
        p = resolve_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    # Nested dataclasses start from their defaults so a file may set just one sub-key.
    defaults = dataclasses.asdict(cls())
    return _build(cls, _merge(defaults, data), "")


def to_dict(cfg: Any) -> dict:
    """The config as plain data, ready for ``yaml.safe_dump``."""
    return dataclasses.asdict(cfg)


def _without_secrets(d: Any) -> Any:
    """The config with every ``token`` blanked: a secret never goes to disk (give it on the command line or
    in DENSE_IRL_TOKEN, which every reader of a token falls back to)."""
    if isinstance(d, dict):
        return {k: ("" if k == "token" and v else _without_secrets(v)) for k, v in d.items()}
    return d


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as YAML, atomically (the result loads back with ``load_config``), tokens blanked."""
    from dense_irl.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(_without_secrets(to_dict(cfg)), sort_keys=False))
