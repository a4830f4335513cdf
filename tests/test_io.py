"""Saving and loading: safetensors plus JSON (no pickle), and clear errors for the wrong base or broken files."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig, adapted_layers
from pyro_blora.io import CONFIG_NAME, WEIGHTS_NAME

N_FEATURES, N_CLASSES = 16, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed: int = 1234) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def make_data(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, N_FEATURES, generator=g)
    return [{"inputs": x[i], "labels": i % N_CLASSES} for i in range(n)]


CONFIG = BLoRAConfig(target_modules=["0", "2"], bayesian_modules=["2"], r=4, inducing_rows=4, inducing_cols=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted flow adapter (one Bayesian, one point layer) saved to a folder."""
    net = make_net()
    fresh = copy.deepcopy(net)
    result = pyro_blora.fit(net, make_data(), "flow", config=CONFIG, num_steps=3, batch_size=8, progress=False)
    folder = tmp_path_factory.mktemp("adapter")
    result.save(folder)
    return result, folder, fresh


def copy_folder(folder, tmp_path):
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    return tmp_path


def test_files_are_safetensors_and_json_not_pickle(saved) -> None:
    result, folder, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    raw = (folder / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # neither pickle nor torch.save's zip
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert set(header) == set(result.trainable_state())
    floats = {k for k, entry in header.items() if entry["dtype"] == "F32"}
    assert {k for k in header if not k.endswith(".permutation")} <= floats  # the MADE input order is int64
    assert "net.0.lora_A_weight" in header and "net.2.lora_A.prior.z_rows" in header
    assert any(key.startswith("guide.sites.2__lora_A.") for key in header)

    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1
    assert meta["guide"] == {"family": "flow", "options": {}}
    assert meta["blora_config"]["target_modules"] == ["0", "2"]
    assert meta["blora_config"]["bayesian_modules"] == ["2"]
    assert [layer["name"] for layer in meta["layers"]] == ["0", "2"]
    assert [layer["bayesian"] for layer in meta["layers"]] == [False, True]
    assert meta["num_data"] == 24
    assert meta["train_config"]["num_steps"] == 3
    assert set(meta["base_fingerprint"]) == {"shapes", "digest"}


def test_round_trip(saved) -> None:
    result, folder, fresh = saved
    loaded = pyro_blora.load(folder, copy.deepcopy(fresh))
    assert not loaded.net.training
    assert [layer.bayesian for layer in loaded.model.layers] == [False, True]
    original = result.trainable_state()
    for key, value in loaded.trainable_state().items():
        assert torch.equal(value, original[key]), key
    data = make_data()
    torch.testing.assert_close(
        loaded.predict(data, num_samples=3, seed=5).probs, result.predict(data, num_samples=3, seed=5).probs, atol=0, rtol=0
    )
    assert loaded.config == result.config
    assert loaded.train_config == result.train_config


def test_other_base_weights_raise_the_fingerprint_error(saved) -> None:
    _, folder, _ = saved
    other = make_net(seed=999)
    with pytest.raises(ValueError, match=r"adapted weights differ .*\(fingerprint mismatch\).*check_base=False"):
        pyro_blora.load(folder, other)
    # a failed load leaves the model as it was, so it can be retried
    assert adapted_layers(other) == []
    assert all(p.requires_grad for p in other.parameters())
    loaded = pyro_blora.load(folder, other, check_base=False)
    assert len(loaded.model.layers) == 2
    assert loaded.predict(make_data(), num_samples=2).probs.shape == (24, N_CLASSES)


def test_other_architecture_is_refused(saved) -> None:
    _, folder, _ = saved
    wider = nn.Sequential(nn.Linear(N_FEATURES, 48), nn.ReLU(), nn.Linear(48, N_CLASSES))
    with pytest.raises(ValueError, match="other adapted layers"):
        pyro_blora.load(folder, wider)
    assert adapted_layers(wider) == []
    with pytest.raises(ValueError, match="saved shape .* != model shape"):
        pyro_blora.load(folder, wider, check_base=False)


def test_load_refuses_an_adapted_model(saved) -> None:
    _, folder, fresh = saved
    net = copy.deepcopy(fresh)
    pyro_blora.inject_adapters(net, CONFIG)
    with pytest.raises(ValueError, match="needs a base model without adapters"):
        pyro_blora.load(folder, net)


def test_truncated_safetensors(saved, tmp_path) -> None:
    _, folder, fresh = saved
    copy_folder(folder, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    raw = weights.read_bytes()
    for cut in (len(raw) // 2, 20, 4):
        weights.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated or corrupted"):
            pyro_blora.load(tmp_path, copy.deepcopy(fresh))
    weights.write_bytes(b"\x80\x04\x95" + raw[3:])  # garbage header
    with pytest.raises(ValueError, match="truncated or corrupted"):
        pyro_blora.load(tmp_path, copy.deepcopy(fresh))


def test_corrupted_json(saved, tmp_path) -> None:
    _, folder, fresh = saved
    copy_folder(folder, tmp_path)
    config_file = tmp_path / CONFIG_NAME
    text = config_file.read_text()
    config_file.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON \\(truncated or corrupted\\?\\)"):
        pyro_blora.load(tmp_path, copy.deepcopy(fresh))
    config_file.write_text(json.dumps({**json.loads(text), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        pyro_blora.load(tmp_path, copy.deepcopy(fresh))


def test_missing_files(saved, tmp_path) -> None:
    _, folder, fresh = saved
    with pytest.raises(FileNotFoundError, match="not a saved pyro_blora adapter folder"):
        pyro_blora.load(tmp_path / "nowhere", copy.deepcopy(fresh))
    copy_folder(folder, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="is incomplete"):
        pyro_blora.load(tmp_path, copy.deepcopy(fresh))


def test_custom_guide_needs_guide_argument(tmp_path) -> None:
    from pyro_blora.guides import NormalGuide

    class MyGuide(NormalGuide):
        pass

    net = make_net()
    fresh = copy.deepcopy(net)
    result = pyro_blora.fit(net, make_data(), MyGuide, config=CONFIG, num_steps=2, batch_size=8, progress=False)
    result.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["guide"]["family"] == "MyGuide"
    with pytest.raises(ValueError, match="custom guide 'MyGuide'; pass guide="):
        pyro_blora.load(tmp_path, copy.deepcopy(fresh))
    loaded = pyro_blora.load(tmp_path, copy.deepcopy(fresh), guide=MyGuide)
    assert isinstance(loaded.guide.site_guide("2.lora_A"), MyGuide)


def test_save_overwrites_in_place(saved, tmp_path) -> None:
    result, _, fresh = saved
    result.save(tmp_path)
    result.save(tmp_path)  # a second save replaces the files atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    pyro_blora.load(tmp_path, copy.deepcopy(fresh))


def test_a_saved_flow_adapter_evaluates_to_the_same_numbers_every_time(saved) -> None:
    _, folder, fresh = saved
    loaded = pyro_blora.load(folder, copy.deepcopy(fresh))
    data = make_data(12)
    first, second = loaded.evaluate(data), loaded.evaluate(data)
    assert first == second
    torch.manual_seed(123)  # the caller's RNG state does not leak into the default prediction
    assert loaded.evaluate(data) == first
    assert not torch.equal(loaded.predict(data, seed=None).sample_probs, loaded.predict(data, seed=None).sample_probs)


def test_saved_files_and_checkpoints_follow_the_users_umask(tmp_path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        net = make_net()
        result = pyro_blora.fit(net, make_data(), "delta", config=CONFIG, num_steps=2, batch_size=8, progress=False,
                                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
        result.save(tmp_path / "adapter")
    finally:
        os.umask(old)
    files = [*(tmp_path / "adapter").iterdir(), *(tmp_path / "ckpt").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)}
    assert wrong == {}


def test_load_names_the_layers_that_differ_and_blames_an_edited_rank_on_the_config(saved, tmp_path) -> None:
    _, folder, fresh = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    edited = copy_folder(folder, tmp_path)
    config["blora_config"]["r"] = 2
    (edited / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"saved shape .* != model shape .*adapter_config.json: the config and the tensors disagree \(was r"):
        pyro_blora.load(edited, copy.deepcopy(fresh))
    narrowed = copy.deepcopy(fresh)
    narrowed[2] = nn.Linear(32, 4)
    with pytest.raises(ValueError, match=r"other shapes: \['2 \[3, 32\] -> \[4, 32\]'\]"):
        pyro_blora.load(folder, narrowed)
