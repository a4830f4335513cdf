"""BLoRAConfig / TrainConfig: every invalid value is a ValueError that names its field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pyro_blora.config import BLoRAConfig, TrainConfig, config_from_dict

BLORA_INVALID = [
    ("target_modules", "", "target_modules is an empty string"),
    ("target_modules", [], "target_modules must be a non-empty list"),
    ("target_modules", ["q_proj", ""], "target_modules must be a non-empty list"),
    ("target_modules", ["q_proj", 3], "target_modules must be a non-empty list"),
    ("target_modules", 3, "target_modules must be"),
    ("bayesian_modules", "", "bayesian_modules is an empty string"),
    ("r", 0, "r must be an integer >= 1"),
    ("r", -2, "r must be an integer >= 1"),
    ("r", 2.0, "r must be an integer >= 1"),
    ("r", True, "r must be an integer >= 1"),
    ("alpha", 0.0, "alpha must be positive"),
    ("alpha", -1.0, "alpha must be positive"),
    ("dropout", -0.1, r"dropout must be in \[0, 1\)"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("inducing_rows", 0, r"inducing_rows must be an integer in \[1, 64\]"),
    ("inducing_rows", 65, r"inducing_rows must be an integer in \[1, 64\]"),
    ("inducing_rows", 4.0, r"inducing_rows must be an integer in \[1, 64\]"),
    ("inducing_cols", 0, r"inducing_cols must be an integer in \[1, 64\]"),
    ("inducing_cols", True, r"inducing_cols must be an integer in \[1, 64\]"),
    ("prior_sd", 0.0, "prior_sd must be positive"),
    ("prior_sd", -0.1, "prior_sd must be positive"),
    ("lambda_max", 0.0, "lambda_max must be positive"),
    ("lambda_init", 0.0, r"lambda_init must be in \(0, lambda_max"),
    ("lambda_init", 0.03, r"lambda_init must be in \(0, lambda_max"),
    ("lambda_init", 0.5, r"lambda_init must be in \(0, lambda_max"),
    ("jitter", 0.0, r"jitter must be in \(0, 1\)"),
    ("jitter", 1.0, r"jitter must be in \(0, 1\)"),
]

TRAIN_INVALID = [
    ("num_steps", 0, "num_steps must be >= 1"),
    ("epochs", 0, "epochs must be >= 1"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("lr", 0.0, "lr must be positive"),
    ("lr", -1e-3, "lr must be positive"),
    ("weight_decay", -0.01, "weight_decay must be >= 0"),
    ("schedule", "exponential", "schedule must be one of constant, linear, cosine"),
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("max_grad_norm", 0.0, "max_grad_norm must be positive"),
    ("max_grad_norm", -1.0, "max_grad_norm must be positive"),
    ("kl_weight", -0.5, "kl_weight must be >= 0"),
    ("kl_warmup", -0.1, r"kl_warmup must be a fraction in \[0, 1\]"),
    ("kl_warmup", 1.5, r"kl_warmup must be a fraction in \[0, 1\]"),
    ("num_particles", 0, "num_particles must be >= 1"),
    ("eval_every", 0, "eval_every must be >= 1"),
    ("early_stopping_patience", 0, "early_stopping_patience must be >= 1"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be an integer >= 1"),
    ("gradient_accumulation_steps", 2.0, "gradient_accumulation_steps must be an integer >= 1"),
    ("mixed_precision", "fp16", "fp16 needs loss scaling, which fit does not do: use bf16"),
    ("mixed_precision", "fp8", "mixed_precision must be 'no', 'bf16' or None"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), BLORA_INVALID, ids=[f"{f}={v!r}" for f, v, _ in BLORA_INVALID]
)
def test_blora_config_rejects(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        BLoRAConfig(**{field: value})
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"), TRAIN_INVALID, ids=[f"{f}={v!r}" for f, v, _ in TRAIN_INVALID]
)
def test_train_config_rejects(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(**{field: value})
    assert field in str(info.value)


def test_defaults_are_valid_and_json_ready() -> None:
    blora, train = BLoRAConfig(), TrainConfig()
    assert json.loads(json.dumps(blora.to_dict())) == blora.to_dict()
    assert json.loads(json.dumps(train.to_dict())) == train.to_dict()
    assert config_from_dict(BLoRAConfig, blora.to_dict()) == blora
    assert config_from_dict(TrainConfig, train.to_dict()) == train


def test_edge_values_are_accepted() -> None:
    BLoRAConfig(target_modules="model\\..*\\.q_proj", r=1, dropout=0.0, inducing_rows=1, inducing_cols=64)
    BLoRAConfig(target_modules=("q_proj",), bayesian_modules=["q_proj"])
    TrainConfig(num_steps=1, weight_decay=0.0, kl_weight=0.0, kl_warmup=0.0, max_grad_norm=None, warmup_steps=0)
    TrainConfig(kl_warmup=1.0, eval_every=1, early_stopping_patience=1, schedule="constant")
    TrainConfig(gradient_accumulation_steps=1, mixed_precision="bf16", device_placement=False)
    TrainConfig(gradient_accumulation_steps=16, mixed_precision="no")


def test_tuple_targets_become_a_list() -> None:
    assert BLoRAConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]


def test_every_field_has_help() -> None:
    for cls in (BLoRAConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("cls", [BLoRAConfig, TrainConfig])
def test_unknown_keys_name_the_valid_options(cls) -> None:
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} option\(s\) \['bogus'\]; valid options: \[") as info:
        config_from_dict(cls, {"bogus": 1})
    # every valid option is listed
    for f in dataclasses.fields(cls):
        assert repr(f.name) in str(info.value)
