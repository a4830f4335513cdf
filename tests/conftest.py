"""Shared fixtures: offline mode and the real SmolLM2 tokenizer from the embedded default."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and a busy 2-core machine makes them spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's real tokenizer (converted once into the user cache by pyro_blora.experiments.zoo)."""
    from transformers import AutoTokenizer

    from pyro_blora.experiments import zoo

    return zoo.prepare_tokenizer(AutoTokenizer.from_pretrained(zoo.smollm2_path()))


@pytest.fixture
def tiny_llama():
    """A random 4-block Llama causal LM with SmolLM2's vocabulary size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()
