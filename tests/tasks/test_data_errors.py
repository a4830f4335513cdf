"""Malformed data files fail with one-line ValueErrors that name the file, the 1-based line or row, and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyro_blora.tasks import (
    AnswerTokenTask,
    ChoiceLikelihoodTask,
    SequenceClassificationTask,
    load_benchmark,
    load_classification,
)
from pyro_blora.tasks.records import example_label

ARC_OK = {"id": "q1", "answerKey": "B", "question": {"stem": "Which?", "choices": [
    {"text": "a", "label": "A"}, {"text": "b", "label": "B"}, {"text": "c", "label": "C"}]}}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def arc_dir(tmp_path: Path, train: list) -> Path:
    ok = [dict(ARC_OK, id=f"q{i}") for i in range(4)]
    write_jsonl(tmp_path / "ARC-Easy" / "train.jsonl", train)
    write_jsonl(tmp_path / "ARC-Easy" / "validation.jsonl", ok)
    write_jsonl(tmp_path / "ARC-Easy" / "test.jsonl", ok)
    return tmp_path


def test_an_arc_record_without_answer_key_names_the_file_and_line(tmp_path: Path) -> None:
    broken = {k: v for k, v in ARC_OK.items() if k != "answerKey"}
    data = arc_dir(tmp_path, [ARC_OK, broken])
    with pytest.raises(ValueError, match=r"ARC-Easy/train\.jsonl line 2: record: missing field\(s\) \['answerKey'\]"):
        load_benchmark("arc_easy", data_dir=data)


def test_an_arc_answer_key_outside_the_choices_names_the_file_and_line(tmp_path: Path) -> None:
    data = arc_dir(tmp_path, [ARC_OK, ARC_OK, dict(ARC_OK, answerKey="F")])
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: answerKey 'F' is not one of .* \['A', 'B', 'C'\]"):
        load_benchmark("arc_easy", data_dir=data)


def test_an_empty_benchmark_file_is_named(tmp_path: Path) -> None:
    data = arc_dir(tmp_path, [])
    with pytest.raises(ValueError, match=r"ARC-Easy/train\.jsonl is empty"):
        load_benchmark("arc_easy", data_dir=data)


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    data = arc_dir(tmp_path, [ARC_OK])
    with (data / "ARC-Easy" / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write("\n{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: not valid JSON"):
        load_benchmark("arc_easy", data_dir=data)


def test_boolq_and_winogrande_records_are_checked(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "BoolQ" / "validation.jsonl",
                [{"question": "q", "passage": "p", "answer": True}, {"question": "q", "passage": "p", "answer": "false"}])
    with pytest.raises(ValueError, match=r"BoolQ/validation\.jsonl line 2: answer 'false' must be a JSON true or false"):
        load_benchmark("boolq", data_dir=tmp_path)
    good = {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}
    write_jsonl(tmp_path / "WinoGrande" / "dev.jsonl", [good])
    write_jsonl(tmp_path / "WinoGrande" / "train_s.jsonl", [good, dict(good, sentence="no blank")])
    with pytest.raises(ValueError, match=r"train_s\.jsonl line 2: sentence 'no blank' must hold exactly one '_'"):
        load_benchmark("winogrande_s", data_dir=tmp_path)


def test_the_unknown_benchmark_error_names_the_drug_review_tasks() -> None:
    with pytest.raises(ValueError, match=r"unknown benchmark 'arc_ez'.*drug_reviews and drug_reviews_binary"):
        load_benchmark("arc_ez")


def test_a_classification_row_without_label_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c"}])
    with pytest.raises(ValueError, match=r"data\.jsonl line 3: column\(s\) \['label'\] missing"):
        load_classification(path)


def test_a_csv_row_without_label_names_the_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\na,0\nb,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv row 2: column\(s\) \['label'\] missing or empty"):
        load_classification(path, class_names=["x", "y"])


def test_an_int_label_past_the_classes_seen_needs_class_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": t, "label": y} for t, y in zip("abcd", [0, 1, 0, 5])])
    with pytest.raises(ValueError, match=r"data\.jsonl line 4: label 5 is out of range with no class_names "
                                         r"\(labels seen: \[0, 1, 5\]\); int labels must be 0\.\.C-1 with C class names"):
        load_classification(path)
    with pytest.raises(ValueError, match=r"line 4: label 5 is out of range with the 3 class_names"):
        load_classification(path, class_names=["x", "y", "z"])


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.csv", ""),
                                        ("header.csv", "text,label\n")])
def test_an_empty_data_file_is_named(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} is empty"):
        load_classification(tmp_path / name)


def test_an_example_without_label_is_named_before_training() -> None:
    with pytest.raises(ValueError, match=r"example 'r7' has no 'label' key \(it has \['id', 'text'\]\)"):
        example_label({"text": "a", "id": "r7"}, 0)
    with pytest.raises(ValueError, match=r"example 2 of the batch has label 'yes'; labels must be ints"):
        example_label({"text": "a", "label": "yes"}, 1)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pyro_blora.experiments import zoo

    return zoo.prepare_tokenizer(AutoTokenizer.from_pretrained(zoo.smollm2_path()))


@pytest.mark.parametrize("make", [lambda tok: AnswerTokenTask(tok, [" x", " y"], template="{text}:"),
                                  lambda tok: ChoiceLikelihoodTask(tok),
                                  lambda tok: SequenceClassificationTask(tok)])
def test_task_collate_without_label_is_a_value_error(tokenizer, make) -> None:
    example = {"text": "ab", "question": "q", "choices": ["a", "b"], "id": "e1"}
    with pytest.raises(ValueError, match=r"example 'e1' has no 'label' key"):
        make(tokenizer).collate([example])


def test_a_label_past_the_choices_names_the_example(tokenizer) -> None:
    example = {"question": "q", "choices": ["a", "b"], "label": 3, "id": "e2"}
    with pytest.raises(ValueError, match=r"label 3 of example 'e2' is out of range for its 2 choices"):
        ChoiceLikelihoodTask(tokenizer).collate([example])
