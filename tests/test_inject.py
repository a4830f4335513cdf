"""Adapter injection: peft's target semantics, clear errors, frozen bases, and undoing it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_blora import BLoRAConfig, adapted_layers, inject_adapters, remove_adapters
from pyro_blora.inject import find_targets, matches
from pyro_blora.models import BayesianLoRALinear


class Attention(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.xq_proj = nn.Linear(width, width)  # ends with "q_proj" but not with ".q_proj"
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.q_proj(x) + self.k_proj(x) + self.v_proj(x) + self.xq_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([Attention(), Attention()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).mean(1)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def config(targets, **kw) -> BLoRAConfig:
    return BLoRAConfig(target_modules=targets, r=2, inducing_rows=2, inducing_cols=2, **kw)


def adapted_names(net: nn.Module) -> list[str]:
    return [layer.layer_name for layer in adapted_layers(net)]


# ---------------------------------------------------------------- matching


def test_list_matches_full_name_or_dotted_suffix() -> None:
    assert matches("layers.0.q_proj", ["q_proj"])
    assert matches("q_proj", ["q_proj"])
    assert matches("layers.0.q_proj", ["0.q_proj"])
    assert not matches("layers.0.xq_proj", ["q_proj"])
    assert not matches("layers.0.q_proj.weight", ["q_proj"])
    assert not matches("layers.0.q_proj", ["proj"])


def test_string_is_a_regex_that_must_match_the_full_name() -> None:
    assert matches("layers.0.q_proj", r"layers\.\d+\.(q|v)_proj")
    assert not matches("layers.0.q_proj", "q_proj")  # a regex is not a suffix
    assert not matches("layers.0.q_proj", r"layers\.\d+")  # full match, not search
    assert matches("layers.0.q_proj", r".*q_proj")


def test_suffix_list_injection() -> None:
    net = Net()
    layers = inject_adapters(net, config(["q_proj", "v_proj"]))
    expected = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert [layer.layer_name for layer in layers] == expected
    assert adapted_names(net) == expected
    assert isinstance(net.layers[0].q_proj, BayesianLoRALinear)
    assert isinstance(net.layers[0].xq_proj, nn.Linear) and not isinstance(net.layers[0].xq_proj, BayesianLoRALinear)


def test_regex_injection() -> None:
    net = Net()
    inject_adapters(net, config(r"layers\.1\.(q|k)_proj|head"))
    assert adapted_names(net) == ["layers.1.q_proj", "layers.1.k_proj", "head"]


def test_regex_that_only_matches_a_suffix_matches_nothing() -> None:
    with pytest.raises(ValueError, match="matched no module of Net"):
        inject_adapters(Net(), config("q_proj"))


def test_no_match_suggests_close_names() -> None:
    net = Net()
    with pytest.raises(ValueError, match=r"matched no module of Net\. Did you mean \[.*'q_proj'.*\]\?") as info:
        inject_adapters(net, config(["q_prj"]))
    message = str(info.value)
    assert "Linear layers it has:" in message and "v_proj" in message and "head" in message
    # nothing was touched
    assert adapted_layers(net) == []
    assert all(p.requires_grad for p in net.parameters())


def test_no_match_and_nothing_close() -> None:
    with pytest.raises(ValueError, match="matched no module of Net\\. Linear layers it has: ") as info:
        find_targets(Net(), ["zzzzzz"])
    assert "Did you mean" not in str(info.value)


def test_matched_modules_that_are_not_linear() -> None:
    with pytest.raises(ValueError, match=r"matched 2 module\(s\) of type \['GELU'\], none of them nn.Linear") as info:
        inject_adapters(Net(), config(["act"]))
    assert "q_proj" in str(info.value)  # names the linear layers there are
    with pytest.raises(ValueError, match=r"of type \['Embedding'\]"):
        inject_adapters(Net(), config(["embed"]))


def test_non_linear_matches_are_skipped_when_linear_ones_exist() -> None:
    net = Net()
    inject_adapters(net, config(["act", "head"]))
    assert adapted_names(net) == ["head"]


# ---------------------------------------------------------------- what injection does


def test_base_frozen_and_only_adapters_trainable() -> None:
    net = Net()
    base_weight = net.layers[0].q_proj.weight
    inject_adapters(net, config(["q_proj", "v_proj", "head"], bayesian_modules=["q_proj"]))
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    assert all(".lora_" not in name for name in frozen)
    assert "embed.weight" in frozen and "layers.0.k_proj.weight" in frozen and "layers.0.q_proj.base.weight" in frozen
    assert net.layers[0].q_proj.base.weight is base_weight and not base_weight.requires_grad
    # Bayesian layers train the prior's inducing inputs, point layers plain LoRA factors
    assert "layers.0.q_proj.lora_A.prior.z_rows" in trainable
    assert {"layers.0.v_proj.lora_A_weight", "layers.0.v_proj.lora_B_weight", "head.lora_B_weight"} <= set(trainable)
    assert [layer.bayesian for layer in adapted_layers(net)] == [True, False, True, False, False]


def test_point_layers_start_as_the_base() -> None:
    net = Net()
    x = torch.randint(0, 10, (4, 5))
    before = net(x)
    inject_adapters(net, config(["q_proj", "v_proj", "head"], bayesian_modules=["head"]))
    for layer in adapted_layers(net):
        if layer.bayesian:
            layer.set_adapter_weights(torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2))
    # point LoRA: B = 0 at initialisation; Bayesian layer here fixed at zero
    torch.testing.assert_close(net(x), before)


def test_remove_adapters_restores_the_originals() -> None:
    net = Net()
    originals = {name: module for name, module in net.named_modules() if name.endswith(("q_proj", "v_proj"))}
    weights = {name: p.detach().clone() for name, p in net.named_parameters()}
    x = torch.randint(0, 10, (4, 5))
    expected = net(x)
    inject_adapters(net, config(["q_proj", "v_proj"]))
    assert remove_adapters(net) is net
    assert adapted_layers(net) == []
    for name, module in originals.items():
        assert net.get_submodule(name) is module
        assert type(module) is nn.Linear
    after = dict(net.named_parameters())
    assert after.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(after[name], value), name
    torch.testing.assert_close(net(x), expected)
    # and it can be adapted again
    inject_adapters(net, config(["head"]))
    assert adapted_names(net) == ["head"]


def test_double_injection_is_refused() -> None:
    net = Net()
    inject_adapters(net, config(["q_proj"]))
    with pytest.raises(ValueError, match="already carries Bayesian-LoRA adapters; call remove_adapters first"):
        inject_adapters(net, config(["v_proj"]))
    assert adapted_names(net) == ["layers.0.q_proj", "layers.1.q_proj"]


def test_top_level_linear_and_sequential_names() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    inject_adapters(seq, config(["0", "2"]))
    assert adapted_names(seq) == ["0", "2"]
    assert isinstance(seq[0], BayesianLoRALinear) and isinstance(seq[2], BayesianLoRALinear)


def test_conv1d_is_adapted_with_its_transposed_shape() -> None:
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(12, 4)  # nf=12 outputs, nx=4 inputs

    block = Block()
    (layer,) = inject_adapters(block, config(["c_attn"]))
    assert (layer.in_features, layer.out_features) == (4, 12)
    layer.set_adapter_weights(torch.zeros(2, 4), torch.zeros(12, 2))
    x = torch.randn(3, 4)
    torch.testing.assert_close(block.c_attn(x), layer.base(x))


def test_no_bayesian_module_gives_plain_lora_everywhere_and_a_guide_of_nothing() -> None:
    """``bayesian_modules=[]``: what a peft user trains, by the same loop (the MAP baseline of the benchmark)."""
    import pyro_blora
    from toy import make_config, make_data, make_net

    result = pyro_blora.fit(make_net(), make_data(), "delta", config=make_config(bayesian_modules=[]), num_steps=3,
                            progress=False)
    assert not any(layer.bayesian for layer in result.model.layers) and not result.model.factors
    assert result.guide.sample_weights(2) == {} and result.predict(make_data(4)).probs.shape == (4, 3)
