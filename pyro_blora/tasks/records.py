"""Reading data files record by record, with errors that name the file and the 1-based line or row.

A new user's first data usually has a typo somewhere in the middle. A bare
``KeyError`` or ``JSONDecodeError`` from deep inside a loader does not say which
file or which line, and an empty file used to surface later as an odd carving
error; every reader here raises a one-line ``ValueError`` saying where and what.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["read_jsonl", "read_csv", "example_label", "example_name", "missing_field"]

Record = dict[str, Any]


def read_jsonl(path: Path) -> tuple[list[Record], list[str]]:
    """The JSON objects of a JSON Lines file and, per record, where it is (``"<path> line <n>"``).

    Blank lines are skipped. Raises ``ValueError`` for an empty file, a line that is
    not valid JSON, or a line that holds something other than a JSON object.
    """
    records, where = [], []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            where.append(f"{path} line {number}")
    if not records:
        raise ValueError(f"{path} is empty: it holds no JSON records")
    return records, where


def read_csv(path: Path, label_column: str) -> tuple[list[Record], list[str]]:
    """Rows of a CSV (or, for ``.tsv``/``.tab``, tab-separated) file and where each is (``"<path> row <n>"``).

    Rows are numbered from 1 after the header. Integer-looking labels become ints
    (CSV loses types; pandas would read them the same way).
    """
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = [dict(row) for row in reader]
        header = reader.fieldnames
    if not header:
        raise ValueError(f"{path} is empty: no header row and no data")
    if not rows:
        raise ValueError(f"{path} is empty: it has a header {list(header)} but no data rows")
    if all(re.fullmatch(r"-?\d+", str(r.get(label_column) or "")) for r in rows):
        for r in rows:
            r[label_column] = int(r[label_column])
    return rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)]


def missing_field(record: Mapping[str, Any], where: str, fields: list[str]) -> None:
    """Raise a ``ValueError`` naming ``where`` when ``record`` lacks one of ``fields``."""
    missing = [name for name in fields if name not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; it has {sorted(record)}")


def example_name(example: Mapping[str, Any], position: int) -> str:
    """How an error names an example: by its ``id`` when it has one, else by its 1-based place in the batch."""
    return f"example {example['id']!r}" if "id" in example else f"example {position + 1} of the batch"


def example_label(example: Mapping[str, Any], position: int) -> int:
    """The int ``label`` of an example at 0-based ``position`` in a batch, or a ``ValueError`` saying why not."""
    name = example_name(example, position)
    if "label" not in example:
        raise ValueError(
            f"{name} has no 'label' key (it has {sorted(example)}); training and evaluation need an int label "
            "(the index of the gold class or choice) in every example"
        )
    label = example["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        try:
            return int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{name} has label {label!r}; labels must be ints (class or choice indices)") from None
    return label
