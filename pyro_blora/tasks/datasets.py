"""Dataset loaders: labelled examples as plain dicts, in train / validation / test splits.

Every loader returns a :class:`DatasetSplits`. Examples follow one of two schemas:

* ``kind == "classification"``: ``{"text": str, "label": int, "id": str}``;
* ``kind == "multiple_choice"``: ``{"question": str, "choices": list[str],
  "choice_labels": list[str], "label": int, "id": str}`` plus benchmark-specific
  fields (see :mod:`pyro_blora.tasks.benchmarks`).

The split rule the whole library follows: model selection, early stopping and
temperature fitting read the validation split only; the test split is read once,
to report. Where a source has no validation (or test) split, one is carved from
the training data with a seeded, stratified draw (:func:`split_train_validation`),
so the same seed always gives the same disjoint splits.

:func:`load_benchmark` (ARC, OpenBookQA, BoolQ, WinoGrande) and
:func:`load_drug_reviews` live in :mod:`pyro_blora.tasks.benchmarks` (it builds on this module) and are
exported by :mod:`pyro_blora.tasks`.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from pyro_blora.tasks.records import read_csv, read_jsonl

__all__ = [
    "DatasetSplits",
    "split_train_validation",
    "carve_splits",
    "subsample",
    "load_classification",
]

Example = dict[str, Any]
Size = int | float

KINDS = ("multiple_choice", "classification")
SPLITS = ("train", "validation", "test")


@dataclass
class DatasetSplits:
    """Train / validation / test examples of one task, with its label space."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    num_classes: int
    class_names: list[str]
    kind: str
    name: str
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {split: len(getattr(self, split)) for split in SPLITS}

    def describe(self) -> str:
        """One line per split with its size and label counts, plus how the splits were made."""
        lines = [f"{self.name} ({self.kind}, {self.num_classes} classes: {', '.join(self.class_names)})"]
        for split in SPLITS:
            examples = getattr(self, split)
            counts = Counter(e.get("label") for e in examples)
            per_class = ", ".join(f"{self.class_names[c]}={counts[c]}" for c in range(self.num_classes))
            lines.append(f"  {split}: {len(examples)} ({per_class})")
        if self.notes:
            lines.append(f"  {self.notes}")
        return "\n".join(lines)


def _resolve_size(size: Size, n: int, what: str) -> int:
    """An int is a count; a float in [0, 1) is a fraction of ``n``, rounded half up."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"{what} must be an int count or a float fraction, got {type(size).__name__}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{what}={size} as a fraction must lie in [0, 1); pass an int for a count")
        k = math.floor(size * n + 0.5)
        # a positive fraction of a non-empty pool should never silently round to nothing
        return max(k, 1) if size > 0 and n > 0 else k
    if not 0 <= size <= n:
        raise ValueError(f"{what}={size} is not a count between 0 and the {n} examples available")
    return size


def _stratified_indices(
    examples: Sequence[Mapping[str, Any]], k: int, seed: int, stratify_key: str | None
) -> list[int]:
    """Indices of ``k`` examples drawn without replacement, class shares kept by largest remainder."""
    rng = random.Random(seed)
    n = len(examples)
    if stratify_key is None or not all(stratify_key in e for e in examples):
        order = list(range(n))
        rng.shuffle(order)
        return sorted(order[:k])
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[e[stratify_key]].append(i)
    keys = sorted(groups, key=repr)  # repr, not hash order, so the draw is reproducible across runs
    quotas = {key: k * len(groups[key]) / n for key in keys}
    take = {key: math.floor(quotas[key]) for key in keys}
    leftover = k - sum(take.values())
    for key in sorted(keys, key=lambda key: quotas[key] - take[key], reverse=True)[:leftover]:
        take[key] += 1
    chosen: list[int] = []
    for key in keys:
        members = list(groups[key])
        rng.shuffle(members)
        chosen.extend(members[: take[key]])
    return sorted(chosen)


def split_train_validation(
    examples: Sequence[Example],
    validation_size: Size,
    seed: int = 0,
    stratify_key: str | None = "label",
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into ``(train, validation)``, deterministically for a given ``seed``.

    ``validation_size`` is a count (int) or a fraction of ``examples`` (float in
    [0, 1), rounded half up). The draw is stratified on ``stratify_key`` when every
    example has it (class shares are kept by largest remainder), uniform otherwise.
    Both parts keep the input order.

    The validation part is what model selection, early stopping and temperature
    fitting may read; they must never read the test split.
    """
    k = _resolve_size(validation_size, len(examples), "validation_size")
    picked = set(_stratified_indices(examples, k, seed, stratify_key))
    train = [e for i, e in enumerate(examples) if i not in picked]
    validation = [e for i, e in enumerate(examples) if i in picked]
    return train, validation


def carve_splits(
    pool: Sequence[Example],
    sizes: Mapping[str, Size],
    seed: int = 0,
    stratify_key: str | None = "label",
) -> tuple[list[Example], dict[str, list[Example]]]:
    """Carve the named splits out of ``pool``, in the given order; return ``(rest, carved)``.

    Float sizes are fractions of the whole ``pool`` (not of what is left), so
    ``{"test": 0.2, "validation": 0.1}`` leaves 70% for training.
    """
    counts = {name: _resolve_size(size, len(pool), f"{name}_size") for name, size in sizes.items()}
    if not pool:
        raise ValueError("no examples to carve validation/test splits from: the training data is empty")
    if sum(counts.values()) >= len(pool):
        raise ValueError(f"carving {counts} from {len(pool)} examples would leave no training data")
    rest, carved = list(pool), {}
    for name, count in counts.items():
        rest, carved[name] = split_train_validation(rest, count, seed, stratify_key)
    return rest, carved


def subsample(
    splits: DatasetSplits,
    train: Size | None = None,
    validation: Size | None = None,
    test: Size | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """A copy of ``splits`` with smaller splits, e.g. to fit a CPU budget.

    Each argument is a count or a fraction of that split; ``None`` (or a count at
    least the split's size) keeps the split whole. The draw is deterministic and
    stratified on ``label`` when every example has one.
    """
    cut: dict[str, list[Example]] = {}
    for split, size in (("train", train), ("validation", validation), ("test", test)):
        examples = getattr(splits, split)
        if size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= len(examples)):
            cut[split] = list(examples)
            continue
        k = _resolve_size(size, len(examples), split)
        cut[split] = [examples[i] for i in _stratified_indices(examples, k, seed, "label")]
    sizes = ", ".join(f"{s}={len(v)}" for s, v in cut.items())
    notes = f"{splits.notes}; subsampled (seed {seed}) to {sizes}".lstrip("; ")
    return replace(splits, notes=notes, **cut)


# --------------------------------------------------------------------------- generic


def _read_source(source: Any, label_column: str, split: str) -> tuple[list[Example], list[str] | None, list[str]]:
    """Rows of ``source`` as dicts, class names declared by a ``ClassLabel`` feature if any, and where each row is."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        if path.suffix.lower() in (".jsonl", ".json"):
            return _with_names(read_jsonl(path))
        if path.suffix.lower() in (".csv", ".tsv", ".tab"):
            return _with_names(read_csv(path, label_column))
        raise ValueError(f"cannot read {path}: expected a .jsonl, .csv or .tsv file")
    features = getattr(source, "features", None)
    if features is not None and hasattr(source, "column_names"):  # a datasets.Dataset
        declared = getattr(features.get(label_column), "names", None)
        rows = [dict(row) for row in source]
        return rows, list(declared) if declared else None, [f"{split} row {i}" for i in range(1, len(rows) + 1)]
    if isinstance(source, Sequence):
        if not all(isinstance(row, Mapping) for row in source):
            raise ValueError("a list source must hold dicts, one per example")
        return [dict(row) for row in source], None, [f"{split} example {i}" for i in range(1, len(source) + 1)]
    raise TypeError(
        f"cannot read a {type(source).__name__}: pass a datasets.Dataset/DatasetDict, "
        "a path to a .jsonl/.csv file, a list of dicts, or a dict of those per split"
    )


def _with_names(read: tuple[list[Example], list[str]]) -> tuple[list[Example], None, list[str]]:
    return read[0], None, read[1]


def _encode_labels(
    split_rows: Mapping[str, list[Example]], where: Mapping[str, list[str]], label_column: str,
    class_names: Sequence[str] | None,
) -> list[str]:
    """Check labels across all splits and settle the class names; rewrites string labels to ints."""
    labels = [(where[split][i], row[label_column]) for split, rows in split_rows.items() for i, row in enumerate(rows)]
    for at, y in labels:
        if isinstance(y, bool) or not isinstance(y, (int, str)):
            raise ValueError(f"{at}: label {y!r} has type {type(y).__name__}; labels must be ints or strings")
    kinds = {type(y) for _, y in labels}
    if len(kinds) > 1:
        at = next(at for at, y in labels if type(y) is not type(labels[0][1]))
        raise ValueError(f"{at}: column {label_column!r} mixes int and str labels; use one type")
    if str in kinds:
        names = list(class_names) if class_names is not None else sorted({y for _, y in labels})
        index = {name: c for c, name in enumerate(names)}
        for at, y in labels:
            if y not in index:
                raise ValueError(f"{at}: label {y!r} is not one of the class names {names}")
        for rows in split_rows.values():
            for row in rows:
                row[label_column] = index[row[label_column]]
        return names
    seen = sorted({y for _, y in labels})
    # Without class names, a gap (labels 0, 1, 5) would quietly make a 6-class task with never-seen classes.
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(seen))]
    for at, y in labels:
        if not 0 <= y < len(names):
            given = f"the {len(names)} class_names {names}" if class_names is not None else "no class_names"
            raise ValueError(
                f"{at}: label {y} is out of range with {given} (labels seen: {seen}); int labels must be "
                "0..C-1 with C class names given (class_names=[...])"
            )
    return names


def load_classification(
    source: Any,
    text_column: str = "text",
    label_column: str = "label",
    *,
    class_names: Sequence[str] | None = None,
    id_column: str | None = None,
    validation_size: Size = 0.1,
    test_size: Size = 0.2,
    seed: int = 0,
    name: str = "classification",
) -> DatasetSplits:
    """Text classification examples ``{"text", "label", "id"}`` from a generic source.

    ``source`` is a ``datasets.Dataset``, a path to a JSONL/CSV/TSV file, a list of
    dicts, or a mapping from split name (``train``/``validation``/``test``) to any
    of those, e.g. a ``datasets.DatasetDict``. A split the source lacks is carved
    from ``train`` with a seeded stratified draw: ``test_size`` first, then
    ``validation_size``, both counts or fractions of the training source.

    Labels are ints in ``range(num_classes)`` or strings. String labels are mapped
    to ``class_names`` when given, else to the sorted distinct labels; int labels
    take their names from ``class_names``, a ``ClassLabel`` feature, or ``"0".."K-1"``.
    Ids come from ``id_column`` when given, else ``"<name>-<split>-<row>"``.
    """
    if isinstance(source, Mapping) and not hasattr(source, "features"):
        unknown = set(source) - set(SPLITS)
        if unknown or "train" not in source:
            raise ValueError(f"split names must include 'train' and be among {SPLITS}; got {sorted(source)}")
        parts = dict(source)
    else:
        parts = {"train": source}
    split_rows: dict[str, list[Example]] = {}
    declared: list[str] | None = None
    where: dict[str, list[str]] = {}
    for split, part in parts.items():
        rows, names, where[split] = _read_source(part, label_column, split)
        if not rows:
            raise ValueError(f"the {split} source of {name!r} is empty: no examples to load")
        columns = [text_column, label_column] + ([id_column] if id_column else [])
        for row, at in zip(rows, where[split]):
            # an empty label or id cell (a CSV ",," ) is as missing as an absent key; an empty text may be real
            missing = [c for c in columns if c not in row or row[c] is None or (c != text_column and row[c] == "")]
            if missing:
                raise ValueError(f"{at}: column(s) {missing} missing or empty; columns it has: {sorted(row)}")
        declared = declared or names
        split_rows[split] = [dict(r) for r in rows]  # labels get rewritten in place below
    names = _encode_labels(split_rows, where, label_column, class_names if class_names is not None else declared)
    examples: dict[str, list[Example]] = {}
    for split, rows in split_rows.items():
        examples[split] = [
            {
                "text": str(r[text_column]),
                "label": r[label_column],
                "id": str(r[id_column]) if id_column else f"{name}-{split}-{i}",
            }
            for i, r in enumerate(rows)
        ]
    ids = Counter(e["id"] for part in examples.values() for e in part)
    duplicated = sorted(i for i, count in ids.items() if count > 1)
    if duplicated:
        raise ValueError(f"column {id_column!r} has duplicate ids across the splits, e.g. {duplicated[:5]}")
    todo = {s: size for s, size in (("test", test_size), ("validation", validation_size)) if s not in examples}
    examples["train"], carved = carve_splits(examples["train"], todo, seed)
    examples.update(carved)
    notes = f"carved {', '.join(f'{s}={len(carved[s])}' for s in carved)} from train (seed {seed})" if carved else ""
    return DatasetSplits(
        examples["train"], examples["validation"], examples["test"],
        len(names), list(names), "classification", name, notes,
    )
