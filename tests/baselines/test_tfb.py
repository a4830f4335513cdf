"""TFB: the searched sd keeps the anchor NLL within the tolerance (a larger one does not), tolerance 0 is MAP,
the noise lives in B's column space, seeded predictions, save/load and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.baselines.tfb import TFBResult, map_factors, tfb_from_map
from pyro_blora.tasks import AnswerTokenTask

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["Which is a fruit?", "Which one is red?", "Pick the animal.", "What do we drink?", "Which is cold?"]
CHOICES = [["apple", "chair", "stone"], ["grass", "blood", "air"], ["cat", "table", "cloud"], ["water", "sand", "dust"]]


def mc_data(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        k = i % len(CHOICES)
        out.append({"question": QUESTIONS[k], "choices": CHOICES[k], "label": i % 3})
    return out


def llama_config() -> BLoRAConfig:
    return BLoRAConfig(target_modules=["q_proj", "v_proj", "lm_head"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0,
                       prior_scale="fixed")


@pytest.fixture
def fitted(tiny_llama, smollm2_tokenizer):
    task = AnswerTokenTask(smollm2_tokenizer, [" A", " B", " C"], max_length=48)
    fresh = copy.deepcopy(tiny_llama)
    val = mc_data(6, offset=12)
    result = pyro_blora.fit(
        tiny_llama, mc_data(12), guide="tfb", task=task, config=llama_config(), val_data=val,
        guide_options={"tolerance": 0.05, "search_bounds": (0.0, 4.0), "iterations": 6, "num_samples": 4, "seed": 3},
        num_steps=8, batch_size=4, lr=5e-2, seed=0, progress=False,
    )
    return result, task, val, fresh


def test_searched_sd_is_within_tolerance_and_a_larger_one_is_not(fitted) -> None:
    result, _, val, _ = fitted
    assert isinstance(result, TFBResult) and result.method == "tfb" and len(result.history["loss"]) == 8
    assert set(result.sigma) == {layer.layer_name for layer in result.map_result.model.layers}
    sigma = next(iter(result.sigma.values()))
    assert 0 < sigma < 4.0 and len(set(result.sigma.values())) == 1
    assert result.map_nll == pytest.approx(result.map_result.evaluate(val)["nll"], rel=1e-5)
    # re-scored with the search's own draws: within the tolerance at sigma, beyond it at the next infeasible value
    assert result.anchor_nll(val, sigma, num_samples=4, seed=3) - result.map_nll <= 0.05
    larger = min(row["sigma"] for row in result.search if not row["feasible"])
    assert larger > sigma
    assert result.anchor_nll(val, larger, num_samples=4, seed=3) - result.map_nll > 0.05


def test_per_module_search_keeps_the_joint_nll_within_tolerance(fitted) -> None:
    result, _, val, _ = fitted
    per = tfb_from_map(result.map_result, val, tolerance=0.05, search_bounds=(0.0, 4.0), iterations=4, num_samples=4,
                       seed=3, per_module=True)
    names = list(per.sigma)
    assert names == [layer.layer_name for layer in result.map_result.model.layers]
    assert {row["module"] for row in per.search[1:]} == set(names)
    assert per.anchor_nll(val, per.sigma, num_samples=4, seed=3) - per.map_nll <= 0.05
    last = [row for row in per.search if row["module"] == names[-1] and not row["feasible"]]
    assert last  # lm_head, searched last, reaches an infeasible sd: one larger breaks the joint tolerance
    larger = {**per.sigma, names[-1]: min(row["sigma"] for row in last)}
    assert per.anchor_nll(val, larger, num_samples=4, seed=3) - per.map_nll > 0.05


def test_tolerance_zero_is_the_map_and_noise_stays_in_b_column_space(fitted) -> None:
    result, _, val, _ = fitted
    test = mc_data(5, offset=20)
    exact = tfb_from_map(result.map_result, val, tolerance=0.0)
    assert exact.is_deterministic and set(exact.sigma.values()) == {0.0}
    torch.testing.assert_close(exact.predict(test, num_samples=3).probs, result.map_result.predict(test).probs,
                               atol=1e-6, rtol=0)
    for f in map_factors(result.map_result).values():
        z = torch.randn(2, *f.a.shape, dtype=torch.float64)
        noise = f.b.double() @ (f.lift @ z)  # B (A + V diag(1/d) Z) - B A = U Z: sd-1 entries in the column space of B
        u = torch.linalg.svd(f.b.double(), full_matrices=False)[0]
        torch.testing.assert_close(noise, u @ z, atol=1e-8, rtol=1e-8)


def test_seeded_predictions_and_save_load(fitted, tmp_path) -> None:
    result, task, _, fresh = fitted
    test = mc_data(5, offset=20)
    first = result.predict(test, num_samples=4, seed=7)
    torch.testing.assert_close(result.predict(test, num_samples=4, seed=7).sample_probs, first.sample_probs)
    assert first.sample_probs.shape == (4, 5, 3) and (first.sample_probs[0] - first.sample_probs[1]).abs().max() > 0
    result.save(tmp_path / "tfb")
    loaded = pyro_blora.load(tmp_path / "tfb", fresh, task=task)
    assert isinstance(loaded, TFBResult) and loaded.sigma == result.sigma and loaded.search == result.search
    torch.testing.assert_close(loaded.predict(test, num_samples=4, seed=7).sample_probs, first.sample_probs)


def test_bad_inputs(tiny_llama, smollm2_tokenizer) -> None:
    task, data = AnswerTokenTask(smollm2_tokenizer, [" A", " B", " C"], max_length=48), mc_data(4)

    def run(**kwargs):
        options = {"task": task, "val_data": data, "num_steps": 1, "progress": False, **kwargs}
        return pyro_blora.fit(tiny_llama, data, guide="tfb", config=llama_config(), **options)

    with pytest.raises(ValueError, match="pass val_data"):
        run(val_data=None)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        run(guide_options={"tolerance": -1.0})
    with pytest.raises(ValueError, match="search_bounds must be"):
        run(guide_options={"search_bounds": (1.0, 0.5)})
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        run(guide_options={"iterations": 0})
    assert not pyro_blora.adapted_layers(tiny_llama)


def test_plain_lora_map_is_perturbed_and_restored(tiny_llama, smollm2_tokenizer) -> None:
    """The pipeline's MAP is plain LoRA (bayesian_modules=[]): TFB perturbs those layers' A and puts them back."""
    task = AnswerTokenTask(smollm2_tokenizer, [" A", " B", " C"], max_length=48)
    config = BLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, bayesian_modules=[], dropout=0.0)
    map_result = pyro_blora.fit(tiny_llama, mc_data(12), guide="delta", task=task, config=config, num_steps=8,
                                batch_size=4, lr=5e-2, seed=0, progress=False)
    val = mc_data(6, offset=12)
    before = map_result.predict(val).probs
    result = tfb_from_map(map_result, val, tolerance=0.05, search_bounds=(0.0, 4.0), iterations=6, num_samples=4)
    assert set(result.sigma) == {layer.layer_name for layer in map_result.model.layers} and len(result.sigma) == 8
    sigma = next(iter(result.sigma.values()))
    assert 0 < sigma <= 4.0 and result.anchor_nll(val, sigma, num_samples=4) - result.map_nll <= 0.05
    spread = result.predict(val, num_samples=4).sample_probs  # the noise reaches the output
    assert float((spread - spread.mean(0)).abs().max()) > 0
    torch.testing.assert_close(map_result.predict(val).probs, before)  # the plain layers got their parameters back
