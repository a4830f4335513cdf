"""Bayesian-LoRA over bitsandbytes 8-bit and 4-bit base layers (QLoRA-style): the base stays quantized.

Runs on bitsandbytes' CPU backend (bitsandbytes >= 0.46, the ``quantized`` and
``test`` extras); skipped, with the reason, where it is missing or cannot run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.io import fingerprint

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'pyro-blora[quantized]')")

pytestmark = pytest.mark.usefixtures("one_thread")

# bitsandbytes' CPU 4-bit kernel needs in_features divisible by the blocksize (64) and
# out_features by 32 (see pyro_blora.quantization), so the quantized layer is 64 -> 32.
N_FEATURES, HIDDEN, N_CLASSES = 64, 32, 3
CONFIG = BLoRAConfig(target_modules=["0", "2"], bayesian_modules=["0"], r=2, inducing_rows=3, inducing_cols=3,
                     dropout=0.0, prior_sd=1.0)
STORAGE = {8: torch.int8, 4: torch.uint8}


def dense_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(N_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, N_CLASSES))


def quantized_net(bits: int) -> nn.Module:
    """``dense_net`` with its first layer quantized the way transformers' bitsandbytes integration does it."""
    net = dense_net()
    dense = net[0]
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(N_FEATURES, HIDDEN, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(N_FEATURES, HIDDEN, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    net[0] = layer.to("cpu")  # bitsandbytes quantizes when the weight is moved to its device
    return net


@pytest.fixture(scope="module", autouse=True)
def cpu_backend() -> None:
    try:
        for bits in (8, 4):
            quantized_net(bits)(torch.randn(2, N_FEATURES))
    except (RuntimeError, NotImplementedError, AssertionError) as err:
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run a quantized linear on this machine's CPU: {err}")


def make_data(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    centers = 2.0 * torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(n) % N_CLASSES
    x = centers[labels] + torch.randn(n, N_FEATURES, generator=g)
    return [{"inputs": x[i], "labels": int(labels[i])} for i in range(n)]


def quick_fit(net: nn.Module, **options) -> pyro_blora.FitResult:
    options = {"num_steps": 4, "batch_size": 8, "lr": 2e-2, "progress": False, **options}
    return pyro_blora.fit(net, make_data(), "normal", config=CONFIG, **options)


@pytest.mark.parametrize("bits", [8, 4])
def test_fit_keeps_the_base_quantized_and_the_adapters_float32(bits) -> None:
    net = quantized_net(bits)
    base_type, stored = type(net[0]), net[0].weight.data.clone()
    result = quick_fit(net)
    base = net[0].base
    assert type(base) is base_type and base.weight.dtype == STORAGE[bits]
    assert torch.equal(base.weight.data, stored)  # never dequantized, never trained
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))
    state = result.trainable_state()
    assert state and not any(".base." in key for key in state)
    assert {value.dtype for value in state.values()} == {torch.float32}
    assert (net[0].in_features, net[0].out_features) == (N_FEATURES, HIDDEN)
    prediction = result.predict(make_data(), num_samples=2)
    assert torch.isfinite(prediction.probs).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_adapter_reloads_onto_the_same_quantized_base_only(bits, tmp_path) -> None:
    result = quick_fit(quantized_net(bits))
    assert fingerprint(result.net)["shapes"]["0"] == [HIDDEN, N_FEATURES]  # the logical (out, in), not the packed storage
    result.save(tmp_path / "adapter")
    again = pyro_blora.load(tmp_path / "adapter", quantized_net(bits))
    expected = result.predict(make_data(), num_samples=2, seed=0).probs
    torch.testing.assert_close(again.predict(make_data(), num_samples=2, seed=0).probs, expected)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        pyro_blora.load(tmp_path / "adapter", dense_net())  # the unquantized checkpoint has other weights


def test_bf16_autocast_over_an_8bit_base() -> None:
    net = quantized_net(8)
    result = quick_fit(net, mixed_precision="bf16")
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))
    assert net[0].base.weight.dtype == torch.int8


@pytest.mark.parametrize("bits", [8, 4])
def test_merging_into_a_quantized_base_is_refused_and_leaves_it_intact(bits) -> None:
    from pyro_blora.interop import merge_posterior_mean

    net = quantized_net(bits)
    stored = net[0].weight.data.clone()
    result = quick_fit(net)
    with pytest.raises(ValueError, match="cannot merge into quantized base weights"):
        merge_posterior_mean(result)
    assert torch.equal(net[0].base.weight.data, stored)
    assert pyro_blora.adapted_layers(net)  # the adapters are still in place


TOO_SMALL = [
    (64, 16, r"in_features=64, out_features=16.*out_features divisible by 32"),
    (16, 32, r"in_features=16, out_features=32, blocksize=64.*blocksize 64"),  # the old test shape
]


@pytest.mark.parametrize("in_features, out_features, broken", TOO_SMALL)
def test_a_4bit_layer_too_small_for_the_cpu_kernel_is_refused_before_training(in_features, out_features, broken) -> None:
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False, quant_type="nf4")
    net = nn.Sequential(layer.to("cpu"), nn.ReLU(), nn.Linear(out_features, N_CLASSES))
    with pytest.raises(ValueError, match=r"quantized layer '0' \(bitsandbytes Linear4bit, " + broken):
        pyro_blora.inject_adapters(net, CONFIG)
    assert not pyro_blora.adapted_layers(net)  # refused before anything was wrapped
