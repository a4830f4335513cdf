"""Activations kept on disk between processes: exact round trip, read back instead of recomputed, keyed by
everything they depend on, and a damaged file named rather than trusted."""

from __future__ import annotations

import copy

import pytest
import torch

from pyro_blora.tasks.activation_store import ActivationStore, activation_key, load_records, save_records
from pyro_blora.tasks.cached import CachedChoiceTask, CachedPrefixTask, split_decoder
from pyro_blora.tasks.causal_lm import AnswerTokenTask, ChoiceLikelihoodTask

REVIEWS = [{"text": "Worked wonders for my migraines.", "label": 1}, {"text": "Made me dizzy for a week.", "label": 0}]
QUESTIONS = [
    {"question": "Which is a fruit?", "choices": ["apple", "chair", "stone"], "label": 0},
    {"question": "What melts ice fastest?", "choices": ["salt", "sand"], "label": 0},
]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def choice_task(bottom, tokenizer, max_length=48):
    return CachedChoiceTask(ChoiceLikelihoodTask(tokenizer, normalize="chars", max_length=max_length, num_classes=3), bottom)


def test_records_round_trip_exactly(tiny_llama, smollm2_tokenizer, tmp_path):
    bottom, _ = split_decoder(tiny_llama, 2)
    answer = CachedPrefixTask(AnswerTokenTask(smollm2_tokenizer, [" no", " yes"], max_length=32), bottom)
    for name, records in (("answer", answer.cache(REVIEWS)), ("choice", choice_task(bottom, smollm2_tokenizer).cache(QUESTIONS))):
        save_records(tmp_path / f"{name}.safetensors", records)
        assert _equal(load_records(tmp_path / f"{name}.safetensors"), records)
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed


def test_second_cache_reads_back_instead_of_running_the_bottom(tiny_llama, smollm2_tokenizer, tmp_path):
    bottom, top = split_decoder(tiny_llama, 2)
    task = choice_task(bottom, smollm2_tokenizer)
    logs: list[str] = []
    store = ActivationStore(tmp_path / "store", logs.append)
    first = store.cache(task, QUESTIONS, "caching test")
    calls = []
    handle = bottom.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = store.cache(choice_task(bottom, smollm2_tokenizer), QUESTIONS, "caching test")
    finally:
        handle.remove()
    assert calls == [] and _equal(again, first)
    assert "stored in" in logs[0] and "2 records read back from" in logs[1]
    with torch.no_grad():
        torch.testing.assert_close(task.class_logits(top, task.collate(again)), task.class_logits(top, task.collate(first)),
                                   rtol=0, atol=0)


def test_key_follows_model_task_and_examples(tiny_llama, smollm2_tokenizer):
    bottom, _ = split_decoder(tiny_llama, 2)
    key = activation_key(bottom, choice_task(bottom, smollm2_tokenizer), QUESTIONS)
    assert activation_key(bottom, choice_task(bottom, smollm2_tokenizer), copy.deepcopy(QUESTIONS)) == key
    assert activation_key(bottom, choice_task(bottom, smollm2_tokenizer, max_length=40), QUESTIONS) != key
    assert activation_key(bottom, choice_task(bottom, smollm2_tokenizer), QUESTIONS[:1]) != key
    other_cut, _ = split_decoder(copy.deepcopy(tiny_llama), 1)
    assert activation_key(other_cut, choice_task(other_cut, smollm2_tokenizer), QUESTIONS) != key
    with torch.no_grad():
        bottom.layers[0].mlp.up_proj.weight.mul_(1.01)
    assert activation_key(bottom, choice_task(bottom, smollm2_tokenizer), QUESTIONS) != key


def test_damaged_file_is_named(tiny_llama, smollm2_tokenizer, tmp_path):
    bottom, _ = split_decoder(tiny_llama, 2)
    task = choice_task(bottom, smollm2_tokenizer)
    store = ActivationStore(tmp_path)
    store.cache(task, QUESTIONS)
    path = store.path(task, QUESTIONS)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="could not be read as stored activations .* delete it"):
        store.cache(task, QUESTIONS)


def test_key_ignores_the_tasks_run_time_state(tiny_llama, smollm2_tokenizer):
    """A task that has warned once about truncation must find what it stored before warning."""
    bottom, _ = split_decoder(tiny_llama, 2)
    task = choice_task(bottom, smollm2_tokenizer)
    key = activation_key(bottom, task, QUESTIONS)
    task.inner._warned_truncation = True
    assert activation_key(bottom, task, QUESTIONS) == key
