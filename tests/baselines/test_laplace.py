"""Last-layer Laplace (laplace-torch on the answer head): the GGN against autograd, the predictive against dense algebra,
tau tuning and its limits, the effective head weights, save/load and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.baselines.laplace.posterior import LaplaceResult, laplace_from_map
from pyro_blora.baselines.laplace.curvature import HeadLaplace
from pyro_blora.baselines.laplace.head import collect_features, find_head, head_weight
from pyro_blora.tasks import AnswerTokenTask, ChoiceLikelihoodTask
from pyro_blora.tasks.cached import CachedPrefixTask, split_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["Which is a fruit?", "Which one is red?", "Pick the animal.", "What do we drink?", "Which is cold?"]
CHOICES = [["apple", "chair", "stone"], ["grass", "blood"], ["cat", "table", "cloud"], ["water", "sand"], ["ice", "fire", "sun"]]


def mc_data(n: int, offset: int = 0) -> list[dict]:
    """Multiple choice with 2 or 3 choices: the 3rd answer word is masked out for 2-choice records."""
    out = []
    for i in range(offset, offset + n):
        k = i % len(QUESTIONS)
        out.append({"question": QUESTIONS[k], "choices": CHOICES[k], "label": i % len(CHOICES[k])})
    return out


def mc_task(tokenizer) -> AnswerTokenTask:
    return AnswerTokenTask(tokenizer, [" A", " B", " C"], max_length=48)


def llama_config(**changes) -> BLoRAConfig:
    values = dict(target_modules=["q_proj", "lm_head"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0)
    values.update(changes)
    return BLoRAConfig(**values)


def brute_force_hessian(phi: torch.Tensor, logits_bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hessian of sum_n CE(W phi_n + b_n, y_n) in vec(W) (rows stacked) by autograd; the labels drop out."""
    labels = torch.zeros(phi.shape[0], dtype=torch.long)

    def nll(flat: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(phi @ flat.view_as(weight).T + logits_bias, labels, reduction="sum")

    return torch.autograd.functional.hessian(nll, weight.reshape(-1))


def random_problem(n: int, c: int = 3, h: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, h, generator=g, dtype=torch.float64)
    phi = torch.randn(n, h, generator=g, dtype=torch.float64)
    bias = torch.randn(n, c, generator=g, dtype=torch.float64)  # logits need not pass through 0
    return weight, phi, bias


# ---------------------------------------------------------------- laplace-torch's curvature = autograd GGN


def test_diag_is_the_exact_ggn_diagonal_and_kron_is_exact_for_one_example() -> None:
    weight, phi, _ = random_problem(n=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    exact = brute_force_hessian(phi, torch.zeros(6, 3, dtype=torch.float64), weight)  # linear in W: Hessian = GGN
    diag = HeadLaplace(weight, "diag")
    diag.fit(phi, None, labels, batch_size=2)  # batches sum like one
    torch.testing.assert_close(diag.ggn(), torch.diag(torch.diagonal(exact)), atol=1e-10, rtol=1e-10)
    assert diag.la.n_data == 6

    one = HeadLaplace(weight, "kron")
    one.fit(phi[:1], None, labels[:1])
    torch.testing.assert_close(one.ggn(), brute_force_hessian(phi[:1], torch.zeros(1, 3, dtype=torch.float64), weight),
                               atol=1e-10, rtol=1e-10)

    kron = HeadLaplace(weight, "kron")
    kron.fit(phi, None, labels, batch_size=4)
    # KFAC: (sum_n Lambda_n) (x) (sum_n phi phi^T) / N, an approximation of the exact GGN for N > 1
    p = torch.softmax(phi @ weight.T, dim=-1)
    factors = torch.kron(torch.diag(p.sum(0)) - p.T @ p, phi.T @ phi) / 6
    torch.testing.assert_close(kron.ggn(), factors, atol=1e-10, rtol=1e-10)
    assert (kron.ggn() - exact).abs().max() > 1e-3


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_functional_covariance_equals_the_dense_computation(structure: str) -> None:
    weight, phi, _ = random_problem(n=7, c=3, h=5, seed=1)
    curvature = HeadLaplace(weight, structure)
    curvature.fit(phi, None, torch.arange(7) % 3)
    tau = 0.7
    covariance = torch.linalg.inv(curvature.ggn() + tau * torch.eye(15, dtype=torch.float64))
    test_phi = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    jac = torch.stack([torch.kron(torch.eye(3, dtype=torch.float64), x.unsqueeze(0)) for x in test_phi])  # (4, 3, 15)
    dense = jac @ covariance @ jac.transpose(1, 2)
    jacobians = curvature.jacobians(test_phi, None)
    torch.testing.assert_close(jacobians.double(), jac)
    torch.testing.assert_close(curvature.functional_covariance(jacobians, tau), dense, atol=1e-10, rtol=1e-8)
    # saved and rebuilt: the same predictive
    rebuilt = HeadLaplace.from_state(weight, structure, curvature.state())
    torch.testing.assert_close(rebuilt.functional_covariance(jacobians, tau), dense, atol=1e-10, rtol=1e-8)


def test_masked_classes_have_no_variance_and_stay_at_zero_probability() -> None:
    weight, phi, _ = random_problem(n=5, c=3, h=4, seed=3)
    keep = torch.tensor([[True, True, False]] * 5)
    curvature = HeadLaplace(weight, "kron")
    curvature.fit(phi, keep, torch.arange(5) % 2)
    jacobians = curvature.jacobians(phi, keep)
    assert float(jacobians[:, 2].abs().max()) == 0.0
    mean = (phi @ weight.T).masked_fill(~keep, -1e4)
    probs = curvature.sample_probs(mean, jacobians, 1.0, "mc", 8, torch.Generator().manual_seed(0))
    assert probs.shape == (8, 5, 3) and float(probs[..., 2].max()) < 1e-30


def test_curvature_rejects_bad_input() -> None:
    weight = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown Laplace structure 'full'"):
        HeadLaplace(weight, "full")
    curvature = HeadLaplace(weight, "kron")
    with pytest.raises(ValueError, match=r"phi must have shape \(N, 3\)"):
        curvature.fit(torch.zeros(2, 4), None, torch.zeros(2))
    curvature.fit(torch.ones(1, 3), None, torch.zeros(1))
    jacobians = curvature.jacobians(torch.ones(1, 3), None)
    for tau in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="prior precision tau must be a finite number > 0"):
            curvature.functional_covariance(jacobians, tau)
    with pytest.raises(ValueError, match=r"needs tensors \['diag', 'loss', 'n_data'\]"):
        HeadLaplace.from_state(weight, "diag", curvature.state())


# ---------------------------------------------------------------- the head of a real (tiny) LM


def test_head_weights_are_rows_of_the_effective_lora_weight(tiny_llama, smollm2_tokenizer) -> None:
    task = mc_task(smollm2_tokenizer)
    config = llama_config(bayesian_modules=["q_proj"])  # lm_head: plain LoRA parameters
    pyro_blora.inject_adapters(tiny_llama, config)
    head = find_head(tiny_llama, task)
    assert head.name == "lm_head" and head.ids == task.answer_ids and not head.has_bias
    with torch.no_grad():
        head.module.lora_B_weight.normal_()
    a, b = head.module.adapter_weights()
    effective = head.module.base.weight.double() + (config.alpha / config.r) * (b.double() @ a.double())
    torch.testing.assert_close(head_weight(head), effective[task.answer_ids], atol=1e-6, rtol=1e-6)
    # the same rows reproduce the network's answer logits from the hooked head input (checked inside too)
    for layer in pyro_blora.adapted_layers(tiny_llama):
        if layer.bayesian:
            layer.set_adapter_weights(torch.zeros(config.r, layer.in_features), torch.zeros(layer.out_features, config.r))
    features = collect_features(tiny_llama, task, head, mc_data(4), batch_size=4)
    assert features.keep is not None and not bool(features.keep[1, 2])  # a 2-choice record
    linear = features.phi.double() @ head_weight(head).T
    torch.testing.assert_close(linear[features.keep], features.mean.double()[features.keep], atol=1e-4, rtol=1e-4)


def test_fit_predict_tune_save_load(tiny_llama, smollm2_tokenizer, tmp_path) -> None:
    task = mc_task(smollm2_tokenizer)
    fresh = copy.deepcopy(tiny_llama)
    train, val, test = mc_data(12), mc_data(6, offset=12), mc_data(5, offset=18)
    grid = [1e-3, 1e-1, 1e1, 1e3]
    result = pyro_blora.fit(
        tiny_llama, train, guide="laplace", task=task, config=llama_config(), val_data=val,
        guide_options={"prior_precision_grid": grid, "tune_samples": 16, "tune_seed": 5},
        num_steps=6, batch_size=4, lr=1e-2, seed=0, progress=False,
    )
    assert isinstance(result, LaplaceResult) and result.method == "laplace" and result.structure == "kron"
    assert result.curvature.la.n_data == len(train)
    assert result.history is result.map_result.history and len(result.history["loss"]) == 6

    # tuning picked the grid value whose validation NLL (the same predictive, same draws) is lowest
    nll = [result.with_prior_precision(t).predict(val, num_samples=16, seed=5).metrics()["nll"] for t in grid]
    assert [row["nll"] for row in result.tuning] == pytest.approx(nll, rel=1e-6)
    assert result.prior_precision == grid[min(range(len(grid)), key=nll.__getitem__)]

    # tau -> infinity: the posterior collapses onto the MAP head
    map_probs = result.map_result.predict(test).probs
    torch.testing.assert_close(result.with_prior_precision(1e12).predict(test, seed=0).probs, map_probs, atol=1e-5, rtol=0)
    wide = result.with_prior_precision(1e-3).predict(test, num_samples=8, seed=0)
    assert wide.sample_probs.shape == (8, 5, 3)
    assert (wide.sample_probs - map_probs).abs().max() > 1e-3  # a loose prior moves the samples
    two = torch.tensor([len(e["choices"]) == 2 for e in test])
    assert two.any() and bool((wide.sample_probs[:, two, 2] == 0).all())  # a masked third choice stays impossible
    metrics = result.evaluate(test)
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["num_samples"] == 4

    result.save(tmp_path / "laplace")
    assert {"method.json", "adapter_config.json", "laplace_posterior.safetensors"} <= {p.name for p in (tmp_path / "laplace").iterdir()}
    with pytest.raises(ValueError, match="pass task="):
        pyro_blora.load(tmp_path / "laplace", copy.deepcopy(fresh))
    other = AnswerTokenTask(smollm2_tokenizer, [" X", " Y", " Z"], max_length=48)
    with pytest.raises(ValueError, match="answer ids .* differ from those the Laplace posterior was fitted on"):
        pyro_blora.load(tmp_path / "laplace", copy.deepcopy(fresh), task=other)
    loaded = pyro_blora.load(tmp_path / "laplace", fresh, task=task)
    assert isinstance(loaded, LaplaceResult) and loaded.prior_precision == result.prior_precision
    torch.testing.assert_close(loaded.predict(test, seed=3).sample_probs, result.predict(test, seed=3).sample_probs)

    probit = LaplaceResult(loaded.map_result, loaded.head, loaded.curvature, 1e-2, link_approx="probit")
    prediction = probit.predict(test)
    assert prediction.sample_probs.shape == (1, 5, 3)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(5))


def test_laplace_from_map_on_a_cached_top_with_diag_structure(tiny_llama, smollm2_tokenizer) -> None:
    bottom, top = split_decoder(tiny_llama, 1)
    task = CachedPrefixTask(mc_task(smollm2_tokenizer), bottom)
    data = task.cache(mc_data(8))
    map_result = pyro_blora.fit(top, data, guide="delta", task=task, config=llama_config(), num_steps=2, batch_size=4, progress=False)
    result = laplace_from_map(map_result, data, structure="diag", prior_precision=2.0)
    assert result.head.ids == task.inner.answer_ids and result.curvature.la.H.shape == (3 * 32,)
    torch.testing.assert_close(result.with_prior_precision(1e12).predict(data[:4]).probs, map_result.predict(data[:4]).probs,
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- a plain classifier (TensorTask)


def blobs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = 2.0 * torch.eye(3, 5)[labels] + torch.randn(n, 5, generator=g)
    return [{"inputs": x[i], "labels": int(labels[i])} for i in range(n)]


def test_linear_classifier_with_bias() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    config = BLoRAConfig(target_modules=["0", "2"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0)
    result = pyro_blora.fit(net, blobs(30, 0), guide="laplace", config=config, val_data=blobs(12, 1),
                            guide_options={"structure": "diag"}, num_steps=5, batch_size=10, progress=False)
    assert result.head.kind == "linear" and result.head.has_bias and result.curvature.num_features == 9
    assert result.tuning and result.prior_precision in [row["prior_precision"] for row in result.tuning]
    test = blobs(6, 2)
    torch.testing.assert_close(result.with_prior_precision(1e12).predict(test).probs, result.map_result.predict(test).probs,
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- errors


def test_bad_inputs_fail_before_training(tiny_llama, smollm2_tokenizer) -> None:
    task, data = mc_task(smollm2_tokenizer), mc_data(4)

    def run(**kwargs):
        options = {"task": task, "val_data": data, "num_steps": 1, "progress": False, **kwargs}
        return pyro_blora.fit(tiny_llama, data, guide="laplace", config=llama_config(), **options)

    with pytest.raises(ValueError, match="needs an answer-token task.*ChoiceLikelihoodTask has no answer head"):
        run(task=ChoiceLikelihoodTask(smollm2_tokenizer))
    with pytest.raises(ValueError, match="pass val_data"):
        run(val_data=None)
    with pytest.raises(ValueError, match="unknown Laplace structure 'full'"):
        run(guide_options={"structure": "full"})
    for tau in (0.0, -2.0):
        with pytest.raises(ValueError, match="prior precision tau must be a finite number > 0"):
            run(guide_options={"prior_precision": tau})
    with pytest.raises(ValueError, match="unknown link_approx 'bridge'"):
        run(guide_options={"link_approx": "bridge"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['hessian'\]"):
        run(guide_options={"hessian": "kron"})
    assert not pyro_blora.adapted_layers(tiny_llama)  # nothing was injected


def test_logits_that_are_not_linear_in_the_head_are_refused() -> None:
    net = nn.Sequential(nn.Linear(5, 3), nn.Tanh())  # soft-capped logits
    config = BLoRAConfig(target_modules=["0"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0)
    with pytest.raises(ValueError, match="task's logits differ from the head's outputs.*not linear"):
        pyro_blora.fit(net, blobs(6, 0), guide="laplace", config=config, guide_options={"prior_precision": 1.0},
                       num_steps=1, progress=False)


def test_a_laplace_folder_of_another_format_is_named(tmp_path) -> None:
    import json

    from pyro_blora.baselines.laplace.posterior import load_laplace

    (tmp_path / "method.json").write_text(json.dumps({"method": "laplace", "format_version": 99}))
    with pytest.raises(ValueError, match=r"method.json is not a last-layer Laplace result of format 2$"):
        load_laplace(tmp_path, None)
    (tmp_path / "method.json").write_text(json.dumps({"method": "laplace", "format_version": 1}))
    with pytest.raises(ValueError, match=r"format 1 held our own K-FAC factors: refit it with laplace_from_map"):
        load_laplace(tmp_path, None)


@pytest.mark.parametrize("method", ["laplace", "laplace_lora"])
def test_a_missing_laplace_torch_is_named_before_training(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyro_blora.baselines.laplace.glm as glm
    import pyro_blora.baselines.laplace.lora_posterior as lora_posterior
    import pyro_blora.baselines.laplace.posterior as posterior

    monkeypatch.setattr(glm, "find_spec", lambda name: None)
    for module in (posterior, lora_posterior):
        monkeypatch.setattr(module, "fit_svi", lambda *a, **k: pytest.fail("trained before checking for laplace-torch"))
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = [{"inputs": torch.randn(4), "labels": i % 2} for i in range(8)]
    with pytest.raises(ImportError, match=r"needs laplace-torch: pip install 'pyro-blora\[baselines\]'"):
        pyro_blora.fit(net, data, guide=method, config=BLoRAConfig(target_modules=["0", "2"], r=2), val_data=data,
                       num_steps=1, progress=False)
