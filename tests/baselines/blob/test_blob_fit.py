"""fit(guide="blob"): BLoB through the common loop, its predictive, save/load, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

import pyro_blora
from pyro_blora import BayesianLoRAModel, BLoRAConfig
from pyro_blora.baselines.blob.fit import BLoBResult
from pyro_blora.training.elbo import MeanFieldELBO
from pyro_blora.training.svi import KLScale
from pyro_blora.baselines.blob import BLoBGuide
from pyro_blora.baselines.blob import BLoBLinear
from pyro_blora.models import BayesianLoRALinear
from pyro_blora.tasks import TensorTask
from toy import N_CLASSES, make_data, make_net


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(**changes) -> BLoRAConfig:
    values = dict(target_modules=["0", "2"], r=4, dropout=0.0)
    values.update(changes)
    return BLoRAConfig(**values)


def blob_fit(net=None, config=None, guide_options=None, **options) -> BLoBResult:
    options = {"num_steps": 60, "lr": 1e-2, "batch_size": 16, "progress": False, **options}
    return pyro_blora.fit(net or make_net(), make_data(), guide="blob", config=config or make_config(),
                          guide_options=guide_options, **options)


@pytest.fixture(scope="module")
def fitted(one_thread) -> BLoBResult:
    return blob_fit()


def test_fit_lowers_the_loss_and_separates_the_classes(fitted) -> None:
    assert isinstance(fitted, BLoBResult) and fitted.method == "blob"
    loss = fitted.history["loss"]
    assert len(loss) == 60 and all(math.isfinite(v) for v in loss)
    assert sum(loss[-10:]) < 0.25 * sum(loss[:10])
    assert fitted.history["nll"][-1] < 0.5 * fitted.history["nll"][0]
    metrics = fitted.evaluate(make_data(60, seed=1))
    assert metrics["acc"] >= 0.9 and metrics["num_samples"] == 4
    assert metrics["mutual_information"] > 0  # a real posterior: the draws disagree somewhat
    # each adapted layer is BLoB's, the guide holds one G per layer, and it moved from its start
    assert all(isinstance(layer, BLoBLinear) for layer in fitted.model.layers)
    sds = fitted.posterior_sd()
    assert sorted(sds) == ["0.lora_A.W", "2.lora_A.W"]
    assert all(sd.mean() > 0.05**2 for sd in sds.values())
    state = fitted.trainable_state()
    assert sorted(state) == [
        "guide.sites.0__lora_A__W.lora_A_rho", "guide.sites.2__lora_A__W.lora_A_rho",
        "net.0.lora_A_weight", "net.0.lora_B_weight", "net.2.lora_A_weight", "net.2.lora_B_weight",
    ]


def test_samples_differ_and_stacked_equals_looped(fitted) -> None:
    data = make_data(12, seed=2)
    stacked = fitted.predict(data, num_samples=5, seed=3)
    looped = fitted.predict(data, num_samples=5, seed=3, stack_samples=False)
    assert stacked.sample_probs.shape == (5, 12, N_CLASSES)
    torch.testing.assert_close(stacked.sample_probs, looped.sample_probs, atol=1e-6, rtol=1e-5)
    spread = stacked.sample_probs.std(0).max()
    assert spread > 1e-3
    ten = fitted.predict(data, num_samples=10, seed=3)  # BLoB's paper predicts with 10 draws
    assert ten.num_samples == 10
    torch.testing.assert_close(ten.probs.sum(-1), torch.ones(12))


def test_posterior_mean_is_the_plain_lora_forward(fitted) -> None:
    x = torch.stack([e["inputs"] for e in make_data(6, seed=4)])
    fitted.use_posterior_mean()
    h = x
    with torch.no_grad():
        out = fitted.net(x)
        for i, layer in enumerate(fitted.model.layers):
            h = layer.base(h) + layer.scaling * h @ layer.lora_A_weight.T @ layer.lora_B_weight.T
            h = torch.relu(h) if i == 0 else h
    torch.testing.assert_close(out, h)


def test_save_and_load_round_trip(fitted, tmp_path) -> None:
    fitted.save(tmp_path / "blob")
    loaded = pyro_blora.load(tmp_path / "blob", make_net())
    assert isinstance(loaded, BLoBResult)
    assert loaded.guide.spec() == fitted.guide.spec()
    data = make_data(12, seed=5)
    before = fitted.predict(data, num_samples=4, seed=7)
    after = loaded.predict(data, num_samples=4, seed=7)
    torch.testing.assert_close(after.sample_probs, before.sample_probs)
    for key, value in fitted.trainable_state().items():
        torch.testing.assert_close(loaded.trainable_state()[key], value)
    with pytest.raises(ValueError, match="its guide is 'blob', not 'flow'"):
        pyro_blora.load(tmp_path / "blob", make_net(), guide="flow")


def test_the_training_loss_is_the_likelihood_plus_the_closed_form_kl() -> None:
    net = make_net()
    result = blob_fit(net=net, num_steps=1)
    model, guide = result.model, result.guide
    batch = TensorTask().collate(make_data(8))
    net.train()
    kl = sum(
        torch.distributions.kl_divergence(guide.distribution(layer), layer.prior()) for layer in model.layers
    )
    beta = 0.3
    scale = KLScale(beta)
    model.particle_nll.clear()
    loss = MeanFieldELBO().differentiable_loss(scale(model), scale(guide), batch)
    expected = model.num_data * model.particle_nll[-1] + beta * kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


def test_bayesian_modules_pick_the_gaussian_layers() -> None:
    result = blob_fit(config=make_config(bayesian_modules=["2"]), num_steps=2, val_data=make_data(6), eval_every=1)
    assert [v["step"] for v in result.validation] == [1, 2]  # validation runs the stacked BLoB predictive
    first, last = result.model.layers
    assert type(first) is BayesianLoRALinear and not first.bayesian
    assert isinstance(last, BLoBLinear)
    assert [name for name, _ in result.guide.named_parameters()] == ["sites.2__lora_A__W.lora_A_rho"]
    assert result.predict(make_data(6), num_samples=3).num_samples == 3


def test_a_ready_guide_goes_through_fit() -> None:
    net = make_net()
    layers = pyro_blora.inject_adapters(net, make_config(), lambda base, name, config, bayesian: BLoBLinear(base, name, config))
    guide = BLoBGuide(layers, init_eps=0.1)
    result = pyro_blora.fit(net, make_data(), guide, num_steps=2, progress=False)
    assert result.guide is guide and isinstance(result.model, BayesianLoRAModel)


@pytest.mark.parametrize(
    ("guide_options", "config", "message"),
    [
        ({"prior_std": 0.0}, None, "prior_std must be a positive finite number"),
        ({"prior_std": -0.2}, None, "prior_std must be a positive finite number"),
        ({"init_eps": float("nan")}, None, "init_eps must be a positive finite number"),
        ({"flipout": "yes"}, None, "flipout must be True or False"),
        ({"scale_max": 0.1}, None, r"unknown option\(s\) \['scale_max'\] for method 'blob'; valid options"),
        (None, make_config(target_modules=["nope"]), "matched no module"),
        (None, make_config(target_modules=["1"]), "none of them nn.Linear"),
    ],
)
def test_bad_inputs_raise_clear_errors_and_leave_the_model_alone(guide_options, config, message) -> None:
    net = make_net()
    with pytest.raises(ValueError, match=message):
        blob_fit(net=net, config=config, guide_options=guide_options)
    assert not pyro_blora.adapted_layers(net)


def test_errors_after_injection_remove_the_adapters_again() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="eval_every and early_stopping_patience need val_data"):
        blob_fit(net=net, eval_every=1)
    assert not pyro_blora.adapted_layers(net)
    assert all(p.requires_grad for p in net.parameters())
    pyro_blora.inject_adapters(net, make_config())
    with pytest.raises(ValueError, match="injects its own adapters"):
        blob_fit(net=net)


def test_a_stopped_run_resumes_to_the_uninterrupted_one(tmp_path) -> None:
    uninterrupted = blob_fit(num_steps=6).trainable_state()
    blob_fit(num_steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=3, callbacks=[lambda state: state.step == 3])
    resumed = blob_fit(num_steps=6, checkpoint_dir=str(tmp_path), resume_from=tmp_path)
    assert resumed.history["step"] == [1, 2, 3, 4, 5, 6]
    for key, value in uninterrupted.items():  # Flipout's signs come from the restored RNG state too
        torch.testing.assert_close(resumed.trainable_state()[key], value, atol=1e-7, rtol=1e-6, msg=key)
