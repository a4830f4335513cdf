"""Causal-LM task adapters against manual forwards on a tiny random Llama that
uses SmolLM2's real tokenizer; the classification adapter on MiniLM's weights."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pyro_blora.experiments import zoo
from pyro_blora.tasks import (
    MASKED_LOGIT,
    AnswerTokenTask,
    ChoiceLikelihoodTask,
    LanguageModelingTask,
    SequenceClassificationTask,
    Task,
)

MC = [
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium", "neon"],
     "choice_labels": ["A", "B", "C", "D"], "label": 1},
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "choice_labels": ["1", "2", "3"], "label": 1},
    {"question": "What melts ice fastest on a warm, sunny day outside in the garden?",
     "choices": ["shade", "sunlight", "wind", "snow", "a freezer"],
     "choice_labels": ["A", "B", "C", "D", "E"], "label": 1},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return zoo.prepare_tokenizer(AutoTokenizer.from_pretrained(zoo.smollm2_path()))


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _loglik(model, context: list[int], continuation: list[int]) -> float:
    whole = context + continuation
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole)))


def test_label_words_are_single_tokens(tokenizer) -> None:
    for word in [" A", " B", " C", " D", " E", " True", " False", " positive", " negative", " neutral"]:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_answer_token_logits_are_last_position_logits(tokenizer, tiny_llama) -> None:
    task = AnswerTokenTask(tokenizer, [" A", " B", " C", " D", " E"])
    assert isinstance(task, Task) and task.num_classes == 5
    batch = task.collate(MC)
    with torch.no_grad():
        logits = task.class_logits(tiny_llama, batch)
    assert logits.shape == (3, 5)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in [" A", " B", " C", " D", " E"]]
    for i, example in enumerate(MC):
        prompt = task.prompt(example)
        # left padding: the prompt ends every row, the padding sits before it
        assert batch["input_ids"][i, -len(prompt):].tolist() == prompt
        assert batch["attention_mask"][i].tolist() == [0] * (batch["input_ids"].shape[1] - len(prompt)) + [1] * len(prompt)
        expected = _last_logits(tiny_llama, prompt)[ids]
        n = len(example["choices"])
        assert torch.allclose(logits[i, :n], expected[:n], atol=1e-4, rtol=0)
        assert torch.all(logits[i, n:] == MASKED_LOGIT)
    assert batch["labels"].tolist() == [1, 1, 1]
    # masked classes get exactly zero probability
    assert torch.softmax(logits, -1)[1, 3:].sum() == 0


def test_answer_token_prompt_uses_answer_letters(tokenizer) -> None:
    task = AnswerTokenTask(tokenizer, [" A", " B", " C"])
    text = tokenizer.decode(task.prompt(MC[1]))
    assert text == ("Select one of the choices that answers the following question: 2 + 2 = "
                    "Choices: A. 3 B. 4 C. 5 Answer:")
    with_context = dict(MC[1], context="Arithmetic.")
    assert "Context: Arithmetic. Choices:" in tokenizer.decode(task.prompt(with_context))
    custom = AnswerTokenTask(tokenizer, [" no", " yes"], template="Q: {question}\nA:")
    assert tokenizer.decode(custom.prompt({"question": "Is it?", "label": 0})) == "Q: Is it?\nA:"


def test_answer_token_classification(tokenizer, tiny_llama) -> None:
    task = AnswerTokenTask(tokenizer, [" negative", " positive"], template="Review: {text}\nSentiment:")
    examples = [{"text": "Great drug, no side effects.", "label": 1}, {"text": "Awful.", "label": 0}]
    batch = task.collate(examples)
    assert batch["class_mask"].all()
    logits = task.class_logits(tiny_llama, batch)
    expected = _last_logits(tiny_llama, task.prompt(examples[1]))[task.answer_ids]
    assert torch.allclose(logits[1], expected, atol=1e-4, rtol=0)


def test_answer_word_must_be_one_token(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"'supercalifragilistic' is not a single token.*leading space"):
        AnswerTokenTask(tokenizer, [" A", "supercalifragilistic"])


def test_answer_token_truncates_the_question_from_the_left(tokenizer, caplog) -> None:
    task = AnswerTokenTask(tokenizer, [" A", " B"], max_length=40)
    long = {"question": "word " * 200 + "final clue?", "choices": ["yes", "no"], "label": 0}
    with caplog.at_level(logging.INFO, logger="pyro_blora.tasks.causal_lm"):
        ids = task.prompt(long)
        task.prompt(long)
    assert len(ids) <= 40
    text = tokenizer.decode(ids)
    assert text.startswith("Select one of the choices") and text.endswith("final clue? Choices: A. yes B. no Answer:")
    assert sum("max_length" in r.getMessage() for r in caplog.records) == 1


def test_answer_token_tokenizer_without_pad(tokenizer, caplog) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(zoo.smollm2_path())
    bare.pad_token = None
    with caplog.at_level(logging.INFO, logger="pyro_blora.tasks.causal_lm"):
        task = AnswerTokenTask(bare, [" A", " B"])
    assert task.pad_id == tokenizer.eos_token_id and "pad token" in caplog.text


def test_choice_likelihood_matches_a_per_choice_loop(tokenizer, tiny_llama) -> None:
    for normalize in (False, True, "tokens"):
        task = ChoiceLikelihoodTask(tokenizer, choice_format=" {text}", normalize=normalize, num_classes=5)
        batch = task.collate(MC)
        with torch.no_grad():
            logits = task.class_logits(tiny_llama, batch)
        assert logits.shape == (3, 5)
        for i, example in enumerate(MC):
            context = tokenizer(f"Question: {example['question']}\nAnswer:")["input_ids"]
            for c, choice in enumerate(example["choices"]):
                whole = tokenizer(f"Question: {example['question']}\nAnswer: {choice}")["input_ids"]
                assert whole[: len(context)] == context
                expected = _loglik(tiny_llama, context, whole[len(context):])
                if normalize is True:
                    expected /= len(choice)  # harness acc_norm: characters of the choice
                elif normalize == "tokens":
                    expected /= len(whole) - len(context)
                assert math.isclose(float(logits[i, c]), expected, abs_tol=2e-4), (i, c)
            assert torch.all(logits[i, len(example["choices"]):] == MASKED_LOGIT)


def test_choice_likelihood_rows_repeated(tokenizer, tiny_llama) -> None:
    task = ChoiceLikelihoodTask(tokenizer)
    batch = task.collate(MC[:2])
    assert task.num_classes == 4
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    with torch.no_grad():
        once, twice = task.class_logits(tiny_llama, batch), task.class_logits(tiny_llama, doubled)
    assert torch.allclose(twice, torch.cat([once, once]), atol=1e-5)


def test_choice_likelihood_partial_scoring(tokenizer, tiny_llama) -> None:
    example = {"prefixes": ["Sam gave Kim a gift because Sam", "Sam gave Kim a gift because Kim"],
               "continuation": "was generous.", "choices": ["Sam", "Kim"], "label": 0}
    task = ChoiceLikelihoodTask(tokenizer, num_classes=2)
    with torch.no_grad():
        logits = task.class_logits(tiny_llama, task.collate([example]))
    for c, prefix in enumerate(example["prefixes"]):
        context = tokenizer(prefix)["input_ids"]
        whole = tokenizer(prefix + " was generous.")["input_ids"]
        assert math.isclose(float(logits[0, c]), _loglik(tiny_llama, context, whole[len(context):]), abs_tol=2e-4)


def test_choice_likelihood_rejects_bad_labels(tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        ChoiceLikelihoodTask(tokenizer).collate([dict(MC[1], label=3)])
    with pytest.raises(ValueError, match="num_classes=4"):
        ChoiceLikelihoodTask(tokenizer, num_classes=4).collate([MC[2]])
    with pytest.raises(ValueError, match="normalize"):
        ChoiceLikelihoodTask(tokenizer, normalize="bytes")  # type: ignore[arg-type]


def test_language_modeling_perplexity(tokenizer, tiny_llama) -> None:
    task = LanguageModelingTask(tokenizer, max_length=8)
    text = "The quick brown fox jumps over the lazy dog near the river bank today."
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = task.windows(text)
    assert all(len(row) <= 8 for row, _ in windows)
    scored = [t for _, labels in windows for t in labels if t != -100]
    assert scored == tokens  # every token predicted exactly once
    sequence = [tokenizer.bos_token_id] + tokens
    nll = -_loglik(tiny_llama, sequence[:1], sequence[1:])  # one window holding everything
    whole = LanguageModelingTask(tokenizer, max_length=64)
    assert math.isclose(whole.perplexity(tiny_llama, [text]), math.exp(nll / len(tokens)), rel_tol=1e-4)
    assert task.perplexity(tiny_llama, [text]) > 1
    batch = whole.collate([text, {"text": "Short."}])
    assert whole.token_nll(tiny_llama, batch).shape == (2, batch["input_ids"].shape[1] - 1)


@pytest.mark.slow
def test_sequence_classification_on_minilm() -> None:
    model, tokenizer = zoo.load_minilm_classifier(num_labels=3)
    task = SequenceClassificationTask(tokenizer, max_length=16)
    examples = [{"text": "I loved it", "label": 2}, {"text": "meh " * 50, "label": 1}]
    batch = task.collate(examples)
    assert batch["input_ids"].shape[1] <= 16 and batch["labels"].tolist() == [2, 1]
    with torch.no_grad():
        logits = task.class_logits(model, batch)
    assert logits.shape == (2, 3) and task.num_classes == 3 and isinstance(task, Task)
