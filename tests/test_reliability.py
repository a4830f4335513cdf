"""Bad input and faults end in a clear message, before long work starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora.experiment import ExperimentConfig, compare


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"output folder .*a-file/run is not writable.*choose another --output"):
        compare(ExperimentConfig(output=str(blocker / "run")))


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    net = nn.Sequential(nn.Linear(4, 3))
    data = [{"inputs": torch.randn(4), "labels": 1}] * 4
    with pytest.raises(ValueError, match="is not writable"):
        pyro_blora.fit(
            net, data, config=pyro_blora.BLoRAConfig(target_modules=["0"]), progress=False,
            checkpoint_dir=str(blocker / "ckpt"), checkpoint_every=1,
        )


def test_method_names_cannot_escape_the_output_folder():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['../../etc'\]"):
        ExperimentConfig(methods=["../../etc"])


def test_non_finite_inputs_are_reported_with_the_step():
    net = nn.Sequential(nn.Linear(4, 3))
    data = [{"inputs": torch.full((4,), float("nan")), "labels": 1}] * 4
    with pytest.raises(FloatingPointError, match=r"at step 0 .*all parameters are finite: look at the inputs"):
        pyro_blora.fit(net, data, config=pyro_blora.BLoRAConfig(target_modules=["0"]), progress=False)
