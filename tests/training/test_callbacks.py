"""pyro_blora.training.callbacks: the evaluation schedule of the long-training protocol."""

from __future__ import annotations

import pytest
import torch

import pyro_blora
from pyro_blora.training.callbacks import EvaluationSchedule, fraction_steps
from toy import make_config, make_data, make_net


def test_fraction_steps_are_every_tenth_of_the_budget() -> None:
    assert fraction_steps(100) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert fraction_steps(4) == [1, 2, 3, 4] and fraction_steps(7, 0.5) == [4, 7]
    with pytest.raises(ValueError, match="fraction must be in"):
        fraction_steps(10, 0.0)


def test_the_schedule_scores_every_set_at_its_steps_and_selects_on_validation_only() -> None:
    val, test = make_data(12, seed=1), make_data(12, seed=2)
    schedule = EvaluationSchedule({"validation": val, "test": test}, [2, 4, 6], num_samples=2)
    result = pyro_blora.fit(make_net(), make_data(), "normal", config=make_config(), num_steps=6, lr=1e-2,
                            progress=False, callbacks=[schedule])
    assert [r["step"] for r in schedule.records] == [2, 4, 6]
    nll = {r["step"]: r["validation"]["nll"] for r in schedule.records}
    assert schedule.selected_step == min(nll, key=nll.get)
    # the last checkpoint is the finished fit: its test metrics are what predict gives afterwards
    assert schedule.records[-1]["test"] == pytest.approx(result.predict(test, num_samples=2).metrics())
    assert set(schedule.last) == {"validation", "test"}
    with pytest.raises(ValueError, match="select_on='dev' is not one of the data sets"):
        EvaluationSchedule({"validation": val}, [1], select_on="dev")


@pytest.mark.parametrize("method", ["delta", "normal", "flow", "mc_dropout", "blob"])
def test_every_trained_method_is_scored_along_training_as_it_predicts_at_the_end(method: str) -> None:
    # the contract the benchmark's checkpoint rows rest on: the callbacks see the method's own predictive
    data = make_data(9, seed=3)
    schedule = EvaluationSchedule({"validation": data}, [3, 6], num_samples=3, seed=4)
    config = make_config(dropout=0.2 if method == "mc_dropout" else 0.0)
    result = pyro_blora.fit(make_net(), make_data(), method, config=config, num_steps=6, lr=1e-2, progress=False,
                            callbacks=[schedule])
    final = result.predict(data, num_samples=3, seed=4)
    assert schedule.last["validation"].num_samples == final.num_samples
    assert torch.equal(schedule.last["validation"].sample_probs, final.sample_probs)
