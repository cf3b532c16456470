"""The Arrow schema of a demonstration (docs/architecture.md §3), stored as Parquet."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dense_irl.errors import DataError, MissingFileError
from dense_irl.io import atomic_path

DEMO_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("steps", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("source", pa.string()),
        # Free-form extras (labels of ProcessBench / TRL rows, calculator notes, ...) as JSON text,
        # so one schema holds every source without a union type.
        pa.field("meta", pa.string()),
    ]
)

@dataclass
class Demonstration:
    """One expert (or labelled) reasoning chain: a prompt and its steps."""

    id: str
    prompt: str
    steps: list[str]
    answer: str | None = None
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "steps": list(self.steps),
            "answer": self.answer,
            "source": self.source,
            "meta": json.dumps(self.meta) if self.meta else None,
        }

    @classmethod
    def from_row(cls, row: dict) -> Demonstration:
        return cls(
            id=row["id"],
            prompt=row["prompt"],
            steps=list(row["steps"]),
            answer=row.get("answer"),
            source=row.get("source"),
            meta=json.loads(row["meta"]) if row.get("meta") else {},
        )


def write_demos(demos: list[Demonstration], path: str | Path) -> None:
    """Write demonstrations to Parquet, atomically."""
    table = pa.Table.from_pylist([d.to_row() for d in demos], schema=DEMO_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_demos(path: str | Path) -> list[Demonstration]:
    """Read demonstrations from a Parquet file written with :func:`write_demos`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    table = pq.read_table(path)
    missing = [n for n in ("id", "prompt", "steps") if n not in table.column_names]
    if missing:
        raise DataError(path, None, missing[0], "column missing from the Parquet file")
    return [Demonstration.from_row(r) for r in table.to_pylist()]
