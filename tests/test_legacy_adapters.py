"""Adapters saved before the architecture move (commit 9483190) still load and predict the same.

The folders under ``tests/fixtures/legacy_v0`` were written once by the code of
that commit (``make_fixture.py.txt`` beside them is the script); they must never
be regenerated with newer code, or this test stops testing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pyro_blora
from toy import make_data, make_net

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_v0"
EXPECTED = load_file(str(FIXTURES / "expected_probs.safetensors"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_adapter_saved_by_the_previous_layout_loads_and_predicts_the_same(name: str) -> None:
    result = pyro_blora.load(FIXTURES / name, make_net())
    # stacked, as the fixture's commit predicted by default (looped draws of dropout masks come in another order)
    probs = result.predict(make_data(12, seed=5), num_samples=3, seed=7, stack_samples=True).probs
    torch.testing.assert_close(probs, EXPECTED[name], atol=1e-5, rtol=1e-4)
