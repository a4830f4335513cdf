"""pyro_blora.training.presets and the objective's tempering: each preset's loss terms against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_blora import TrainConfig
from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.inject import inject_adapters
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.tasks import TensorTask
from pyro_blora.training.elbo import MeanFieldELBO
from pyro_blora.training.presets import train_preset, with_preset
from pyro_blora.training.svi import _lr_lambda, kl_beta
from toy import make_config, make_data, make_net

N_DATA = 40


def _plain_model(label_smoothing: float, entropy_bonus: float) -> tuple[BayesianLoRAModel, BayesianLoRAGuide]:
    """Plain LoRA on the toy net (no latent site, so the loss is the data term alone), B set non-zero."""
    net = make_net()
    inject_adapters(net, make_config(bayesian_modules=[]))
    model = BayesianLoRAModel(net, TensorTask(), N_DATA)
    model.label_smoothing, model.entropy_bonus = label_smoothing, entropy_bonus
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_B_weight.normal_()
    return model, BayesianLoRAGuide(model.factors, "delta")


def _batch(n: int = 6) -> dict:
    examples = make_data(n, seed=3)
    return {"inputs": torch.stack([e["inputs"] for e in examples]), "labels": torch.tensor([e["labels"] for e in examples])}


@pytest.mark.parametrize("name", ["proper", "paper"])
def test_each_presets_data_term_equals_the_hand_computed_loss(name: str) -> None:
    preset = train_preset(name, batch_size=6)
    model, guide = _plain_model(preset["label_smoothing"], preset["entropy_bonus"])
    batch = _batch()
    loss = MeanFieldELBO().differentiable_loss(model, guide, batch)
    logits = model.net(batch["inputs"])
    log_p = F.log_softmax(logits, -1)
    eps, bonus, k = preset["label_smoothing"], preset["entropy_bonus"], logits.shape[-1]
    smoothed = -(1 - eps) * log_p.gather(1, batch["labels"][:, None]).squeeze(1) - eps / k * log_p.sum(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    expected = N_DATA / 6 * (smoothed - bonus * entropy).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    if name == "proper":  # the plain likelihood: N/B sum -log p(y)
        assert float(loss) == pytest.approx(float(N_DATA / 6 * F.cross_entropy(logits, batch["labels"], reduction="sum")), rel=1e-5)


def test_the_paper_presets_kl_weight_schedule_and_optimiser_are_the_released_codes() -> None:
    paper = TrainConfig(**{k: v for k, v in train_preset("paper", batch_size=6).items()})
    assert (paper.lr, paper.weight_decay, paper.epochs, paper.label_smoothing, paper.entropy_bonus) == (7.39e-4, 0.027, 6, 0.05, 0.05)
    total = 600  # 100 batches per epoch, 6 epochs
    assert kl_beta(paper, 0, total) == 0.0 and kl_beta(paper, 99, total) == 0.0
    # from epoch 2: 0.1 * KL / batches_per_epoch on a mean loss = 0.1 * batch_size on this library's summed loss
    assert kl_beta(paper, 100, total) == pytest.approx(0.1 * 6) and kl_beta(paper, 599, total) == pytest.approx(0.6)
    factor = _lr_lambda(paper.schedule, 0, total)
    assert [factor(s) for s in (0, 199, 200, 399, 400, 599)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_the_proper_preset_is_the_elbo_with_its_warm_up() -> None:
    proper = TrainConfig(**train_preset("proper"), kl_warmup=0.1)
    assert (proper.kl_weight, proper.label_smoothing, proper.entropy_bonus, proper.kl_start) == (1.0, 0.0, 0.0, 0.0)
    assert kl_beta(proper, 0, 100) == pytest.approx(0.1) and kl_beta(proper, 9, 100) == 1.0 and kl_beta(proper, 50, 100) == 1.0


def test_a_preset_overrides_the_fields_it_names_and_an_unknown_one_is_refused() -> None:
    merged = with_preset("paper", {"lr": 1e-2, "batch_size": 4, "seed": 3})
    assert merged["lr"] == 7.39e-4 and merged["seed"] == 3 and merged["kl_weight"] == pytest.approx(0.4)
    assert with_preset(None, {"lr": 1e-2}) == {"lr": 1e-2}
    with pytest.raises(ValueError, match=r"unknown preset 'tuned'; choose one of \['paper', 'proper'\]"):
        train_preset("tuned")
    for field, value in (("label_smoothing", 1.0), ("entropy_bonus", -0.1), ("kl_start", 1.0), ("schedule", "steps")):
        with pytest.raises(ValueError, match=field if field != "schedule" else "schedule must be one of"):
            TrainConfig(**{field: value})
    assert math.isclose(train_preset("paper", batch_size=8)["kl_weight"], 0.8)
