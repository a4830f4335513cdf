"""fit under ``accelerate launch`` with two CPU processes (gloo) equals one process on the global batch.

One launch runs four fits in the same two processes: plain (batch 4 each), with
gradient accumulation (2 x 2 each), and a run stopped after step 3 then resumed
from its step-2 checkpoint. The reference is one process of batch 8 in pytest.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyro_blora.config import TrainConfig
from pyro_blora.training.distributed import ScaleOut, process_state

CASE = r'''
"""The tiny run shared by the launched processes and the one-process reference."""
import torch
from torch import nn

import pyro_blora

N, STEPS = 24, 5  # 3 global batches of 8 per epoch: the run crosses an epoch boundary


def net():
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def data():
    g = torch.Generator().manual_seed(0)
    return [{"inputs": torch.randn(6, generator=g), "labels": i % 3} for i in range(N)]


def train(batch_size, **options):
    # layer 0 Bayesian (guide + prior Z, D), layer 2 plain LoRA: every kind of trainable parameter
    config = pyro_blora.BLoRAConfig(target_modules=["0", "2"], bayesian_modules=["0"], r=2, inducing_rows=3,
                                    inducing_cols=3, dropout=0.0, prior_sd=1.0)
    options = {"num_steps": STEPS, "lr": 2e-2, "progress": False, "seed": 3, **options}
    return pyro_blora.fit(net(), data(), "normal", config=config, batch_size=batch_size, **options)


def state(result):
    return {k: v.detach().contiguous().clone() for k, v in result.trainable_state().items()}
'''

SCRIPT = r'''
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import case

torch.set_num_threads(1)
out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
sys.stderr = open(out / f"stderr-{rank}.txt", "w", buffering=1)  # where each process's progress bar would go

plain = case.train(4, progress=True, checkpoint_dir=str(out / f"ckpt-{rank}"), checkpoint_every=2)
plain.save(out / f"saved-{rank}")
save_file(case.state(plain), str(out / f"plain-{rank}.safetensors"))
accum = case.train(2, gradient_accumulation_steps=2)
save_file(case.state(accum), str(out / f"accum-{rank}.safetensors"))
ckpt = str(out / "stopped")
case.train(4, checkpoint_dir=ckpt, checkpoint_every=2, callbacks=[lambda s: s.step >= 3 and rank == 1])
resumed = case.train(4, checkpoint_dir=ckpt, checkpoint_every=2, resume_from=ckpt)
save_file(case.state(resumed), str(out / f"resumed-{rank}.safetensors"))
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("launch")
    (folder / "case.py").write_text(CASE)
    (folder / "train.py").write_text(SCRIPT)
    out = folder / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available():  # two processes must not share one GPU here; without one, fit joins gloo by itself
        env["ACCELERATE_USE_CPU"] = "1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(folder / "train.py"), str(out),
    ]
    proc = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=300)
    logs = "".join(f"\n--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(out.glob("stderr-*.txt")))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = tmp_path_factory.mktemp("case") / "case.py"
    path.write_text(CASE)
    spec = importlib.util.spec_from_file_location("distributed_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(case) -> dict[str, torch.Tensor]:
    """One process, batch 8 = 2 processes x 4; on the CPU like the launched processes, also on a GPU machine."""
    return case.state(case.train(8, device_placement=False))


def _assert_equal(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key, **tolerance)


def test_two_processes_take_the_one_process_step_on_the_global_batch(launched, reference) -> None:
    rank0, rank1 = load_file(str(launched / "plain-0.safetensors")), load_file(str(launched / "plain-1.safetensors"))
    _assert_equal(rank1, rank0, atol=0, rtol=0)  # synchronised: bit for bit
    _assert_equal(rank0, reference, atol=1e-5, rtol=1e-4)


def test_the_comparison_can_fail(case, reference) -> None:
    """One process of batch 4 (another global batch) ends elsewhere: the equality above is not trivial."""
    other = case.state(case.train(4, device_placement=False))
    assert max(float((other[k] - reference[k]).abs().max()) for k in reference) > 1e-3


def test_accumulation_across_processes_equals_the_global_batch(launched, reference) -> None:
    _assert_equal(load_file(str(launched / "accum-0.safetensors")), reference, atol=1e-5, rtol=1e-4)
    _assert_equal(load_file(str(launched / "accum-1.safetensors")), reference, atol=1e-5, rtol=1e-4)


def test_a_stop_on_one_process_stops_both_and_resuming_continues_the_run(launched) -> None:
    plain = load_file(str(launched / "plain-0.safetensors"))
    for rank in (0, 1):
        _assert_equal(load_file(str(launched / f"resumed-{rank}.safetensors")), plain, atol=1e-7, rtol=1e-6)


def test_only_the_main_process_writes_files_and_shows_progress(launched) -> None:
    assert (launched / "saved-0" / "adapter_model.safetensors").is_file()
    assert (launched / "ckpt-0" / "latest.json").is_file()
    assert not (launched / "saved-1").exists() and not (launched / "ckpt-1").exists()
    assert "fit[normal]" in (launched / "stderr-0.txt").read_text()
    assert "fit[normal]" not in (launched / "stderr-1.txt").read_text()


# ------------------------------------------------------------------ in process


def test_a_launch_that_did_not_form_a_group_is_refused(monkeypatch) -> None:
    process_state()  # this pytest process is one accelerate process (set up before WORLD_SIZE claims two)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="each process would train alone"):
        process_state()


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launches_are_refused(monkeypatch, flag) -> None:
    monkeypatch.setenv(flag, "true")
    with pytest.raises(NotImplementedError, match="does not support"):
        ScaleOut(TrainConfig())


def test_fp16_from_the_launcher_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="fp16 would need loss scaling"):
        ScaleOut(TrainConfig())
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert ScaleOut(TrainConfig()).mixed_precision == "bf16"
    assert ScaleOut(TrainConfig(mixed_precision="no")).mixed_precision == "no"  # the config wins
