"""pyro_blora.interop: peft export / load round trip, merging the posterior mean, and starting from a peft adapter."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pytest
import torch
from torch import Tensor, nn

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.interop import export_peft, from_peft, merge_posterior_mean, read_peft

peft = pytest.importorskip("peft")

# peft 0.21 reads a transformers property that transformers 5 deprecates; not ours to fix
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

VOCAB, N_CLASSES, SEQ = 64, 3, 6



class LastTokenTask:
    """Class logits = the first ``N_CLASSES`` next-token logits after the last token."""

    num_classes = N_CLASSES

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        return {
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return model(input_ids=batch["input_ids"]).logits[:, -1, :N_CLASSES]


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def llama_data(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": ids[i], "labels": int(ids[i, -1]) % N_CLASSES} for i in range(n)]


def config(**changes: Any) -> BLoRAConfig:
    values: dict[str, Any] = dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8.0, dropout=0.0, prior_sd=1.0)
    values.update(changes)
    return BLoRAConfig(**values)


def mean_logits(result: pyro_blora.FitResult, ids: Tensor, seed: int = 0) -> Tensor:
    """Our posterior-mean prediction: ``use_posterior_mean()`` (under the export's seed), then the net."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result.use_posterior_mean()
    with torch.no_grad():
        return result.net(input_ids=ids).logits


@pytest.fixture(scope="module")
def fitted() -> pyro_blora.FitResult:
    # q_proj Bayesian, v_proj a plain point-estimate LoRA: both kinds go through peft
    # Every location drawn from N(0, I) (the paper's init, not the zero-B start), so both
    # factors are O(1) and the relative Monte Carlo error of the flow's mean is meaningful.
    cfg = config(bayesian_modules=["q_proj"])
    return pyro_blora.fit(tiny_llama(), llama_data(), "flow", task=LastTokenTask(), config=cfg,
                          guide_options={"zero_init_b": False}, num_steps=4, lr=2e-2, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def ids() -> Tensor:
    return torch.stack([e["input_ids"] for e in llama_data(5)])


def test_export_loads_in_peft_and_matches_the_posterior_mean(fitted, ids, tmp_path) -> None:
    folder = export_peft(fitted, tmp_path / "adapter", task_type="CAUSAL_LM")
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8.0
    assert meta["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    ours = mean_logits(fitted, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # the adapter does something: the logits differ from the base model's
    with torch.no_grad():
        assert (tiny_llama()(input_ids=ids).logits - ours).abs().max() > 1e-4


def test_export_of_a_sequential_without_task_type(tmp_path) -> None:
    def net() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    g = torch.Generator().manual_seed(0)
    data = [{"inputs": torch.randn(8, generator=g), "labels": i % 3} for i in range(16)]
    cfg = config(target_modules=["0", "2"], inducing_rows=4, inducing_cols=4)
    result = pyro_blora.fit(net(), data, "normal", config=cfg, num_steps=3, lr=2e-2, batch_size=8, progress=False)
    export_peft(result, tmp_path / "seq")
    x = torch.stack([d["inputs"] for d in data])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result.use_posterior_mean()
    with torch.no_grad():
        ours = result.net(x)
        theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path / "seq")).eval()(x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_merge_folds_the_posterior_mean_into_the_base(fitted, ids) -> None:
    ours = mean_logits(fitted, ids)
    merged = merge_posterior_mean(fitted, copy_net=True)
    assert not pyro_blora.adapted_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, atol=1e-5, rtol=0)
    assert pyro_blora.adapted_layers(fitted.net)  # copy_net left the result alone


def test_merge_respects_conv1d_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(6, 5), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    data = [{"inputs": torch.randn(5, generator=g), "labels": i % 3} for i in range(16)]
    cfg = config(target_modules=["0", "2"], inducing_rows=4, inducing_cols=4)
    result = pyro_blora.fit(net, data, "normal", config=cfg, num_steps=3, lr=5e-2, batch_size=8, progress=False)
    x = torch.stack([d["inputs"] for d in data])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result.use_posterior_mean()
    with torch.no_grad():
        ours = result.net(x)
        merged = merge_posterior_mean(result)
        assert isinstance(merged[0], Conv1D)
        torch.testing.assert_close(merged(x), ours, atol=1e-5, rtol=0)


def test_from_peft_starts_at_the_peft_adapter(fitted, ids, tmp_path) -> None:
    folder = export_peft(fitted, tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()(input_ids=ids).logits
    # exact when the inducing inputs are turned towards the adapter's subspaces
    result, report = from_peft(tiny_llama(), folder, config=config(bayesian_modules=["q_proj"]), align_inducing=True)
    assert set(report) == {f"model.layers.{i}.self_attn.q_proj.lora_{f}" for i in (0, 1) for f in "AB"}
    assert max(r["least_squares"] for r in report.values()) < 1e-5
    assert max(r["posterior_mean"] for r in report.values()) < 1e-3  # Monte Carlo mean of the flow
    torch.testing.assert_close(mean_logits(result, ids), theirs, atol=1e-4, rtol=0)
    # then training continues from there with the same adapters and guide
    pyro_blora.fit(result.net, llama_data(), result.guide, task=LastTokenTask(), num_steps=1, batch_size=8, progress=False)


def test_from_peft_reports_the_reconstruction_error(fitted, ids, tmp_path) -> None:
    folder = export_peft(fitted, tmp_path / "adapter")
    base = tiny_llama()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()(input_ids=ids).logits
    result, report = from_peft(base, folder, guide="normal")  # config read from the peft folder
    assert result.config.r == 4 and result.config.alpha == 8.0
    errors = [r["least_squares"] for r in report.values()]
    assert all(0 <= e <= 1 + 1e-9 for e in errors)
    for r in report.values():  # the placed guide's mean achieves the least-squares optimum
        assert r["posterior_mean"] == pytest.approx(r["least_squares"], abs=1e-5)
    ours = mean_logits(result, ids)
    # the adapter's effect is reproduced up to the reconstruction error
    gap, effect = (ours - theirs).norm(), (theirs - base_logits).norm()
    assert gap <= 2 * max(errors) * effect + 1e-5


def test_read_peft_rejects_what_it_cannot_map(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a peft LoRA adapter"):
        read_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="use_dora"):
        read_peft(tmp_path)
