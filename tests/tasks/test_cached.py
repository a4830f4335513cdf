"""Cached bottom + adapted top equals the full model."""

from __future__ import annotations

import pytest
import torch

from pyro_blora import BLoRAConfig, fit
from pyro_blora.tasks.cached import CachedPrefixTask, split_decoder
from pyro_blora.tasks.causal_lm import AnswerTokenTask

EXAMPLES = [
    {"text": "Worked wonders for my migraines, no side effects.", "label": 2},
    {"text": "Terrible. Made me dizzy for a week and did nothing.", "label": 0},
    {"text": "It is fine I guess.", "label": 1},
]


def answer_task(tokenizer):
    return AnswerTokenTask(
        tokenizer, [" negative", " neutral", " positive"], template="Review: {text}\nSentiment:", max_length=64
    )


@pytest.mark.parametrize("trainable", [1, 2, 4])
def test_cached_top_equals_full_model(tiny_llama, smollm2_tokenizer, trainable):
    inner = answer_task(smollm2_tokenizer)
    bottom, top = split_decoder(tiny_llama, trainable)
    task = CachedPrefixTask(inner, bottom)
    with torch.no_grad():
        full = inner.class_logits(tiny_llama, inner.collate(EXAMPLES))
        cached = task.class_logits(top, task.collate(task.cache(EXAMPLES)))
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert sum(1 for _ in top.model.layers) == trainable


def test_fit_adapts_only_the_top(tiny_llama, smollm2_tokenizer):
    inner = answer_task(smollm2_tokenizer)
    bottom, top = split_decoder(tiny_llama, 2)
    task = CachedPrefixTask(inner, bottom)
    data = task.cache(EXAMPLES * 4)
    config = BLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, inducing_rows=3, inducing_cols=3)
    result = fit(top, data, guide="flow", task=task, config=config, num_steps=3, batch_size=4, progress=False)
    assert [layer.layer_name for layer in result.model.layers] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert result.predict(data[:5], num_samples=2).probs.shape == (5, 3)


def test_split_rejects_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match=r"trainable_layers must be in \[1, 4\]"):
        split_decoder(tiny_llama, 0)
    with pytest.raises(TypeError, match="Llama-style causal LM"):
        split_decoder(torch.nn.Linear(2, 2), 1)


MC_EXAMPLES = [
    {"question": "Which gas do plants take in?", "choices": ["carbon dioxide", "helium", "neon", "argon"], "label": 0},
    {"question": "What melts ice fastest?", "choices": ["salt", "sand", "a very long answer of many words"], "label": 0},
    {"prefixes": ["The cup fell because the cup", "The cup fell because the table"],
     "continuation": "was slippery.", "choices": ["cup", "table"], "label": 1},
]


@pytest.mark.parametrize("normalize", [False, "chars", "tokens"])
def test_cached_choice_likelihood_equals_full_model(tiny_llama, smollm2_tokenizer, normalize):
    from pyro_blora.tasks.cached import CachedChoiceTask
    from pyro_blora.tasks.causal_lm import ChoiceLikelihoodTask

    inner = ChoiceLikelihoodTask(smollm2_tokenizer, normalize=normalize, max_length=48, num_classes=4)
    bottom, top = split_decoder(tiny_llama, 2)
    task = CachedChoiceTask(inner, bottom, batch_size=2)
    with torch.no_grad():
        full = inner.class_logits(tiny_llama, inner.collate(MC_EXAMPLES))
        cached = task.class_logits(top, task.collate(task.cache(MC_EXAMPLES)))
    assert cached.shape == (3, 4)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    from pyro_blora.tasks.causal_lm import MASKED_LOGIT

    assert bool((cached[1, 3] == MASKED_LOGIT) and (cached[2, 2:] == MASKED_LOGIT).all())  # missing choices stay masked


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "lm_head"]])
def test_cached_choice_task_trains_and_predicts_stacked_samples(tiny_llama, smollm2_tokenizer, targets):
    from pyro_blora.tasks.cached import cached_task
    from pyro_blora.tasks.causal_lm import ChoiceLikelihoodTask

    bottom, top = split_decoder(tiny_llama, 1)
    task = cached_task(ChoiceLikelihoodTask(smollm2_tokenizer, max_length=48, num_classes=4), bottom)
    data = task.cache(MC_EXAMPLES * 2)
    # a Bayesian head sees only the gathered continuation positions, still sample-major
    config = BLoRAConfig(target_modules=targets, r=2, inducing_rows=3, inducing_cols=3)
    result = fit(top, data, guide="flow", task=task, config=config, num_steps=2, batch_size=3, progress=False)
    stacked = result.predict(data, num_samples=3, seed=0)
    looped = result.predict(data, num_samples=3, seed=0, stack_samples=False)
    torch.testing.assert_close(stacked.sample_probs, looped.sample_probs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="call task.cache"):
        task.collate(MC_EXAMPLES)
    with pytest.raises(TypeError, match="no cached form"):
        cached_task(object(), bottom)
