"""Bad input and faults end in a clear message, before long work starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora.experiments.pipeline import ExperimentConfig, compare


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


def test_unknown_flow_transform_lists_the_valid_names():
    from pyro_blora.guides import BayesianLoRAGuide
    from pyro_blora.models import BayesianLoRALinear

    layer = BayesianLoRALinear(nn.Linear(6, 6), "x", pyro_blora.BLoRAConfig(target_modules=["x"], r=2))
    with pytest.raises(ValueError, match=r"unknown flow transform 'maf'; choose from \['affine_autoregressive'"):
        BayesianLoRAGuide(layer.factors, "flow", transforms=["maf"])


def test_remote_code_is_off_unless_asked_for():
    import inspect

    from pyro_blora.experiments import zoo

    assert inspect.signature(zoo.load_model).parameters["trust_remote_code"].default is False


def test_no_pickle_in_the_library():
    import pathlib

    root = pathlib.Path(pyro_blora.__file__).resolve().parent
    sources = [*root.rglob("*.py"), *(root.parent / "models").rglob("*.py"), *(root.parent / "guides").rglob("*.py")]
    for source in sources:
        text = source.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, source
