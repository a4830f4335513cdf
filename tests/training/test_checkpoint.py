"""Checkpoints of fit: kill and resume equals an uninterrupted run, Ctrl-C writes one, damaged files are named, NaN keeps the last good one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.training.checkpoint import latest_checkpoint, load_checkpoint
from pyro_blora.tasks.base import TensorTask

SCRIPT = r'''
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from torch import nn
from safetensors.torch import save_file
import pyro_blora

ckpt, out, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "resume", float(sys.argv[4])
every = None if sys.argv[5] == "none" else int(sys.argv[5])
torch.manual_seed(1234)
net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
g = torch.Generator().manual_seed(0)
data = [{"inputs": torch.randn(6, generator=g), "labels": i % 3} for i in range(20)]
config = pyro_blora.BLoRAConfig(target_modules=["0", "2"], bayesian_modules=["0"], r=2, inducing_rows=3,
                                inducing_cols=3, dropout=0.1, prior_sd=1.0)

def slow(state):
    Path(ckpt + ".progress").write_text(str(state.step))
    time.sleep(delay)

result = pyro_blora.fit(net, data, "normal", config=config, num_steps=24, lr=2e-2, batch_size=6, progress=False,
                        checkpoint_dir=ckpt, checkpoint_every=every, callbacks=[slow],
                        resume_from=ckpt if resume else None)
save_file({k: v.contiguous() for k, v in result.trainable_state().items()}, out)
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "train.py"
    path.write_text(SCRIPT)
    return path


def launch(script: Path, ckpt: Path, out: Path, mode: str = "run", delay: float = 0.0, every: str = "4") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(ckpt), str(out), mode, str(delay), every]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the awaited point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - start > timeout:
            proc.kill()
            proc.communicate()
            pytest.fail("timed out waiting for the training subprocess")
        time.sleep(0.02)


def latest_step(ckpt: Path) -> int:
    try:
        return json.loads((ckpt / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


@pytest.fixture(scope="module")
def uninterrupted(script, tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("full")
    proc = launch(script, folder / "ckpt", folder / "final.safetensors")
    finish(proc)
    return load_file(str(folder / "final.safetensors"))


def test_killed_then_resumed_equals_uninterrupted(script, uninterrupted, tmp_path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.safetensors"
    proc = launch(script, ckpt, out, delay=0.15)
    wait_for(lambda: latest_step(ckpt) >= 8, proc)  # 24 steps, 4 per epoch-ish: stops mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()
    step = latest_step(ckpt)
    assert 8 <= step < 24
    # older checkpoints are removed once latest.json points past them (a kill may fall in between)
    assert (ckpt / f"step-{step:08d}" / "state.json").is_file() and len(list(ckpt.glob("step-*"))) <= 2
    finish(launch(script, ckpt, out, mode="resume"))
    resumed = load_file(str(out))
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-7, rtol=1e-6, msg=key)


def test_ctrl_c_writes_a_checkpoint_that_resumes(script, uninterrupted, tmp_path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.safetensors"
    proc = launch(script, ckpt, out, delay=0.15, every="none")
    progress = Path(str(ckpt) + ".progress")
    wait_for(lambda: progress.exists() and progress.read_text() not in ("", "0", "1", "2"), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not out.exists()
    step = latest_step(ckpt)
    assert 3 <= step < 24
    assert load_checkpoint(ckpt).step == step
    finish(launch(script, ckpt, out, mode="resume"))
    resumed = load_file(str(out))
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-7, rtol=1e-6, msg=key)


# ------------------------------------------------------------------ in process


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def data() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"inputs": torch.randn(6, generator=g), "labels": i % 3} for i in range(16)]


CONFIG = BLoRAConfig(target_modules=["0", "2"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0, prior_sd=1.0)


def quick(ckpt: Path, **options) -> pyro_blora.FitResult:
    options = {"num_steps": 6, "lr": 1e-2, "batch_size": 8, "progress": False, "checkpoint_dir": str(ckpt),
               "checkpoint_every": 2, **options}
    return pyro_blora.fit(net(), data(), "normal", config=CONFIG, **options)


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_a_truncated_checkpoint_file_is_named(tmp_path, name) -> None:
    quick(tmp_path / "ckpt")
    file = latest_checkpoint(tmp_path / "ckpt") / name
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(ValueError, match=f"{file}.*truncated or corrupted"):
        quick(tmp_path / "ckpt", resume_from=tmp_path / "ckpt")


def test_resume_refuses_another_run(tmp_path) -> None:
    quick(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="total_steps"):
        quick(tmp_path / "ckpt", num_steps=9, resume_from=tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        quick(tmp_path / "other", resume_from=tmp_path / "other")


class InfLogitsTask(TensorTask):
    """Once ``broken`` is set, the gold class gets probability 0: the loss is infinite, the parameters stay finite."""

    broken = False

    def class_logits(self, model, batch):
        logits = super().class_logits(model, batch)
        if not self.broken:
            return logits
        wrong = torch.nn.functional.one_hot((batch["labels"] + 1) % logits.shape[-1], logits.shape[-1]).bool()
        return torch.where(wrong, 3e38, -3e38) + 0 * logits


def test_a_nan_loss_keeps_the_last_good_checkpoint(tmp_path) -> None:
    task = InfLogitsTask()

    def breaks(state) -> None:
        task.broken = state.step == 3  # step 4's loss is NaN

    ckpt = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError, match="at step 3"):
        quick(ckpt, callbacks=[breaks], task=task)
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint.step == 2 and checkpoint.position == (1, 0)  # 2 batches an epoch
    assert all(torch.isfinite(v).all() for v in checkpoint.trainable.values())


def test_non_finite_parameters_are_never_checkpointed(tmp_path) -> None:
    def poison(state) -> None:
        if state.step == 4:  # a checkpoint step
            with torch.no_grad():
                next(state.result.guide.parameters()).fill_(float("nan"))

    ckpt = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError, match="not writing a checkpoint at step 4"):
        quick(ckpt, callbacks=[poison])
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint.step == 2
    assert all(torch.isfinite(v).all() for v in checkpoint.trainable.values())
    assert not list(ckpt.glob(".tmp-*"))


def test_train_config_checks_checkpoint_options() -> None:
    with pytest.raises(ValueError, match="checkpoint_dir"):
        pyro_blora.TrainConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint_every"):
        pyro_blora.TrainConfig(checkpoint_every=0, checkpoint_dir="x")
    assert pyro_blora.TrainConfig(checkpoint_dir=Path("x")).checkpoint_dir == "x"


def test_resuming_with_another_batch_size_names_it(tmp_path) -> None:
    from toy import make_config, make_data, make_net

    options = dict(num_steps=4, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    pyro_blora.fit(make_net(), make_data(), "delta", config=make_config(), batch_size=8, **options)
    with pytest.raises(ValueError, match=r"differs from the checkpointed one in .*batch_size 8 -> 4"):
        pyro_blora.fit(make_net(), make_data(), "delta", config=make_config(), batch_size=4, resume_from=tmp_path,
                       **options)
