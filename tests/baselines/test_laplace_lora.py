"""Laplace-LoRA on laplace-torch (K-FAC over all LoRA weights): the wrapper computes the MAP function, a huge
prior precision gives MAP's argmax, the logit variance shrinks as tau grows, the evidence-optimal tau, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.baselines.laplace.lora import LoRAClassifier, check_kfac_size
from pyro_blora.baselines.laplace.lora_posterior import LaplaceLoRAResult, laplace_lora_from_map
from pyro_blora.result import make_loader
from pyro_blora.tasks import AnswerTokenTask

pytest.importorskip("laplace")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # third-party: asdl (imported by laplace-torch) decorates with torch.jit.script; functorch has no batching
    # rule for the CPU flash-attention backward that laplace-torch's jacrev goes through
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"),
]

QUESTIONS = ["Which is a fruit?", "Which one is red?", "Pick the animal.", "What do we drink?"]
CHOICES = [["apple", "chair", "stone"], ["grass", "blood", "air"], ["cat", "table", "cloud"], ["water", "sand", "dust"]]


def mc_data(n: int, offset: int = 0) -> list[dict]:
    return [{"question": QUESTIONS[i % 4], "choices": CHOICES[i % 4], "label": i % 3} for i in range(offset, offset + n)]


@pytest.fixture
def fitted(tiny_llama, smollm2_tokenizer):
    task = AnswerTokenTask(smollm2_tokenizer, [" A", " B", " C"], max_length=48)
    fresh = copy.deepcopy(tiny_llama)
    config = BLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0)
    result = pyro_blora.fit(
        tiny_llama, mc_data(12), guide="laplace_lora", task=task, config=config, val_data=mc_data(6, offset=12),
        guide_options={"marglik_steps": 20}, num_steps=6, batch_size=4, lr=5e-2, seed=0, progress=False,
    )
    return result, task, fresh


def test_wrapper_is_the_map_function_and_evidence_tau_is_positive(fitted) -> None:
    result, task, _ = fitted
    assert isinstance(result, LaplaceLoRAResult) and result.method == "laplace_lora"
    batch = next(iter(make_loader(mc_data(4, offset=20), task, 4, shuffle=False)))
    wrapper = LoRAClassifier(result.map_result)
    torch.testing.assert_close(wrapper(batch).detach(), task.class_logits(result.net, batch).float(), atol=1e-6, rtol=0)
    assert result.la.n_params == sum(p.numel() for p in wrapper.parameters()) == 4 * (2 * 64) + 4 * (2 * 48)
    tau = result.prior_precision
    assert tau == tau and 0 < tau < float("inf") and result.tuning["prior_method"] == "marglik"
    assert result.kfac_bytes == check_kfac_size(wrapper, max_gib=1.0) > 0  # the estimate made before fitting


def test_huge_prior_is_map_and_variance_shrinks(fitted) -> None:
    result, _, _ = fitted
    test = mc_data(5, offset=20)
    map_probs = result.map_result.predict(test).probs
    variances = []
    for tau in (1e-2, 1.0, 1e2, 1e8):
        with result.at_prior_precision(tau):
            variances.append(result.functional_variance(test))
            if tau == 1e8:
                for link in ("probit", "mc"):
                    result.link_approx = link
                    probs = result.predict(test, num_samples=8).probs
                    assert torch.equal(probs.argmax(-1), map_probs.argmax(-1))
                    torch.testing.assert_close(probs, map_probs, atol=1e-3, rtol=0)
                result.link_approx = "probit"
    for wide, narrow in zip(variances, variances[1:]):
        assert bool((narrow <= wide + 1e-12).all()) and float(narrow.sum()) < float(wide.sum())


def test_mc_is_seeded_and_save_load(fitted, tmp_path) -> None:
    result, task, fresh = fitted
    test = mc_data(5, offset=20)
    result.link_approx = "mc"
    first = result.predict(test, num_samples=6, seed=4)
    assert first.sample_probs.shape == (6, 5, 3)
    torch.testing.assert_close(result.predict(test, num_samples=6, seed=4).sample_probs, first.sample_probs)
    result.save(tmp_path / "ll")
    loaded = pyro_blora.load(tmp_path / "ll", fresh, task=task)
    assert isinstance(loaded, LaplaceLoRAResult) and loaded.prior_precision == pytest.approx(result.prior_precision)
    torch.testing.assert_close(loaded.predict(test, num_samples=6, seed=4).sample_probs, first.sample_probs,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.functional_variance(test), result.functional_variance(test), atol=1e-7, rtol=1e-5)


def test_plain_lora_map_layers_and_modules(tiny_llama, smollm2_tokenizer) -> None:
    """The pipeline's MAP is plain LoRA (bayesian_modules=[]): the posterior covers those layers, or the chosen ones."""
    task = AnswerTokenTask(smollm2_tokenizer, [" A", " B", " C"], max_length=48)
    config = BLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, bayesian_modules=[], dropout=0.0)
    map_result = pyro_blora.fit(tiny_llama, mc_data(12), guide="delta", task=task, config=config, num_steps=6,
                                batch_size=4, lr=5e-2, seed=0, progress=False)
    before = map_result.predict(mc_data(4, offset=20)).probs
    la = laplace_lora_from_map(map_result, mc_data(12), prior_precision=1.0, modules=["q_proj"])
    q_layers = [layer for layer in map_result.model.layers if layer.layer_name.endswith("q_proj")]
    expected = sum(layer.lora_A_weight.numel() + layer.lora_B_weight.numel() for layer in q_layers)
    assert la.modules == ["q_proj"] and la.la.n_params == expected
    with la.at_prior_precision(1e8):
        torch.testing.assert_close(la.predict(mc_data(4, offset=20)).probs, before, atol=1e-3, rtol=0)
    assert float(la.functional_variance(mc_data(4, offset=20)).sum()) > 0
    torch.testing.assert_close(map_result.predict(mc_data(4, offset=20)).probs, before)  # the MAP is left as it was
    with pytest.raises(ValueError, match=r"modules \['o_proj'\] match none of the fit's adapted layers"):
        laplace_lora_from_map(map_result, mc_data(4), prior_precision=1.0, modules=["o_proj"])


def test_a_masked_choice_stays_impossible(fitted) -> None:
    result, _, _ = fitted
    two = [{"question": "Which one is red?", "choices": ["grass", "blood"], "label": 1}] + mc_data(2)
    for link in ("probit", "mc"):
        result.link_approx = link
        prediction = result.predict(two, num_samples=5)
        assert bool((prediction.sample_probs[:, 0, 2] == 0).all()) and bool(torch.isfinite(prediction.sample_probs).all())
        torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(3))


def test_val_nll_tuning_and_bad_options(fitted) -> None:
    result, _, _ = fitted
    val = mc_data(6, offset=12)
    tuned = laplace_lora_from_map(result.map_result, mc_data(12), val, prior_method="val_nll",
                                  prior_precision_grid=[1e-2, 1.0, 1e2])
    grid = tuned.tuning["grid"]
    assert [row["prior_precision"] for row in grid] == [1e-2, 1.0, 1e2]
    assert tuned.prior_precision == pytest.approx(min(grid, key=lambda row: row["nll"])["prior_precision"], rel=1e-6)
    # the grid reuses the validation Jacobians across tau: each entry is what predict scores at that tau
    for row in grid:
        with tuned.at_prior_precision(row["prior_precision"]):
            assert tuned.evaluate(val)["nll"] == pytest.approx(row["nll"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown link_approx 'bridge'"):
        laplace_lora_from_map(result.map_result, mc_data(4), link_approx="bridge")
    with pytest.raises(ValueError, match="pass val_data"):
        laplace_lora_from_map(result.map_result, mc_data(4), prior_method="val_nll")
    with pytest.raises(ValueError, match=r"K-FAC factors would take .* GiB \(> max_kfac_gib = 1e-06\)"):
        laplace_lora_from_map(result.map_result, mc_data(4), prior_precision=1.0, max_kfac_gib=1e-6)


def test_jacobians_one_example_at_a_time_equal_the_batched_ones(fitted) -> None:
    """The default (JACOBIAN_BATCH = 1) is only faster: variances and probit predictions equal a batch of 4's."""
    from pyro_blora.baselines.laplace.lora_posterior import JACOBIAN_BATCH

    result, _, _ = fitted
    test = mc_data(5, offset=20)
    assert JACOBIAN_BATCH == 1
    torch.testing.assert_close(result.functional_variance(test), result.functional_variance(test, batch_size=4),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.predict(test).probs, result.predict(test, batch_size=4).probs, rtol=1e-5, atol=1e-7)
