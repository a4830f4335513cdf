"""Shared pieces of the benchmarks: models, synthetic data, the loss head, peft LoRA, memory probes.

Every method compared in ``speed.py`` and ``gpu_check.py`` scores a batch the same way
(:class:`AnswerLogitsTask`): the causal LM's next-token logits at the last position,
restricted to three answer token ids, as the README's demo does; so plain peft LoRA
and pyro_blora run the same network, the same LM-head work (``logits_to_keep=1``)
and the same loss head.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

# Random Llama-shaped models (LlamaConfig keyword arguments). SmolLM2-135M is hidden 576,
# intermediate 1536, 30 blocks, 9 heads (3 KV heads), vocab 49152, tied embeddings.
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    # seconds-long smoke runs
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    # SmolLM2-135M's exact shape with random weights: where the embedded model is not installed (a GPU box)
    "smollm2_random": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # 2x SmolLM2's width = 4x the parameters of every adapted/attention matrix; few blocks to stay fast
    "wide": dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=18,
                 num_key_value_heads=6, vocab_size=49152, tie_word_embeddings=True),
    # ~1.1B parameters, TinyLlama-1.1B's shape (for the GPU check)
    "llama1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}

TARGET_MODULES = ["q_proj", "v_proj"]
RANK = 8
ALPHA = 16.0
DROPOUT = 0.05
LR = 5e-4
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0  # pyro_blora.fit's default; the peft loop clips the same way


def set_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- models


def build_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(model, answer_ids, vocab_size)`` for ``smollm2`` (the real embedded model) or a random one."""
    if name == "smollm2":
        from pyro_blora.experiments.zoo import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        answer_ids = []
        for word in (" negative", " neutral", " positive"):
            ids = tokenizer.encode(word, add_special_tokens=False)
            answer_ids.append(ids[-1])
        model.config.use_cache = False
        return model.to(device).eval(), answer_ids, model.config.vocab_size
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown model {name!r}; choose smollm2 or one of {sorted(RANDOM_MODELS)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=2048, use_cache=False, **RANDOM_MODELS[name])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    vocab = config.vocab_size
    answer_ids = [vocab // 7, vocab // 5, vocab // 3]
    return model.eval(), answer_ids, vocab


def make_examples(num: int, seq_len: int, vocab: int, num_classes: int = 3, seed: int = 0) -> list[dict[str, Tensor]]:
    """Random token sequences (no padding) with random labels: timing needs shapes, not meaning."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (num, seq_len), generator=g)
    labels = torch.randint(0, num_classes, (num,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
        for i in range(num)
    ]


class AnswerLogitsTask:
    """Class logits = last-position next-token logits at ``answer_ids`` (a pyro_blora Task).

    ``autocast`` (a dtype) runs the network's forward under ``torch.autocast``; the
    loss, the guide and the optimiser stay in float32 either way.
    """

    def __init__(self, answer_ids: Sequence[int], device: str = "cpu", autocast: Optional[torch.dtype] = None):
        self.answer_ids = list(answer_ids)
        self.num_classes = len(self.answer_ids)
        self.device = torch.device(device)
        self.autocast = autocast
        self._index = torch.tensor(self.answer_ids, device=self.device)

    def collate(self, examples: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        return {
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
            "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples]),
        }

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        with self._autocast():
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        return out.logits[:, -1].index_select(-1, self._index).float()


# --------------------------------------------------------------------------- training loops


class StepTimer:
    """A ``fit`` callback: a timestamp after every step (synchronising CUDA first)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, state: Any) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return None

    def step_times(self, warmup: int) -> list[float]:
        diffs = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return diffs[warmup:]


def cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))


def peft_model(model: nn.Module, target_modules: Sequence[str] = TARGET_MODULES, r: int = RANK) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(target_modules), bias="none")
    return get_peft_model(model, config)


def train_loop(
    model: nn.Module,
    task: Any,
    data: Sequence[Any],
    num_steps: int,
    batch_size: int,
    timer: StepTimer,
    seed: int = 0,
) -> None:
    """A plain LoRA training loop as one writes it by hand (or HF Trainer runs it):
    AdamW, mean cross-entropy, gradient clipping at 1, cosine schedule, ``float(loss)`` per step."""
    from torch.utils.data import DataLoader

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(num_steps))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=task.collate,
                        generator=torch.Generator().manual_seed(seed))
    batches = cycle(loader)
    model.train()
    for _ in range(num_steps):
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        logits = task.class_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        float(loss.detach())
        timer(None)
    model.eval()


def blora_config(target_modules: Any = TARGET_MODULES, bayesian_modules: Any = None, r: int = RANK):
    import pyro_blora

    return pyro_blora.BLoRAConfig(
        target_modules=target_modules, bayesian_modules=bayesian_modules, r=r, alpha=ALPHA, dropout=DROPOUT
    )


def blora_fit(model: nn.Module, task: Any, data: Sequence[Any], guide: str, num_steps: int, batch_size: int,
              timer: StepTimer, config: Any = None, seed: int = 0):
    import pyro_blora

    return pyro_blora.fit(
        model, data, guide=guide, task=task, config=config or blora_config(), num_steps=num_steps,
        batch_size=batch_size, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
        progress=False, callbacks=[timer], seed=seed,
    )


# --------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of what runs after :meth:`start`, above what was resident then.

    CPU: the kernel's high-water mark of the resident set (``VmHWM``), reset at
    ``start`` through ``/proc/self/clear_refs`` where the kernel allows it; else
    ``ru_maxrss`` (which then also counts whatever peak came before ``start``,
    e.g. loading the model: the ``method`` field says which was used).
    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at ``start``.
    """

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.method = ""
        self.base_kb = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_bytes = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
            return
        self.base_kb = _proc_status_kb("VmRSS") or _maxrss_kb()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            hwm = _proc_status_kb("VmHWM")
            self.method = "VmHWM(reset)" if hwm is not None and hwm <= self.base_kb * 1.01 + 1024 else "ru_maxrss"
        except OSError:
            self.method = "ru_maxrss"

    def peak_mb(self) -> float:
        """Peak since :meth:`start`, in MiB above the resident/allocated memory at start."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base_bytes) / 2**20
        peak = _proc_status_kb("VmHWM") if self.method.startswith("VmHWM") else _maxrss_kb()
        return max(0.0, (peak or 0) - self.base_kb) / 1024

    def baseline_mb(self) -> float:
        if self.device.type == "cuda":
            return self.base_bytes / 2**20
        return self.base_kb / 1024


def _cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux), None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def env_info(device: str = "cpu") -> dict[str, Any]:
    """The machine and package versions a figure depends on: a rerun that does not reproduce a run bit for bit
    (kernels and thread counts change results) can then be told apart by its CPU, kernel capability and versions."""
    import platform

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name in ("transformers", "peft", "pyro", "numpy"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
