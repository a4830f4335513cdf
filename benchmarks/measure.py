"""The measurements of ``speed.py``, each run in a fresh interpreter: ``python measure.py SPEC_JSON OUT_JSON``.

* ``timing``: every method on its own copy of the model, trained side by side,
  one step each in turn (:mod:`interleave`), then prediction with ``N`` posterior
  samples against one plain forward, also in turn. Per step: wall time and the
  thread's CPU time.
* ``memory``: one method alone (a fresh process per method), peak resident set
  (or CUDA allocation) above what was resident after loading the model.
* ``layers``: a stack of ``L`` adapted ``nn.Linear(64, 64)`` per method and ``L``,
  the methods side by side as in ``timing``.
* ``overhead``: a model's adapted layers alone (``skeleton.py``), every method and
  hand-written LoRA side by side: what each method adds to LoRA's step.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

# run as scripts: their own folder is sys.path[0], so ``import common`` finds benchmarks/common.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _train(method: str, model: Any, task: Any, data: list, num_steps: int, batch_size: int, clock: Any,
           config: Any = None) -> Any:
    """One method's training loop; ``clock`` is called after every step. Returns the peft model or FitResult."""
    import common

    if method == "peft":
        net = common.peft_model(model)
        common.train_loop(net, task, data, num_steps, batch_size, clock)
        return net
    if method == "plain":
        common.train_loop(model, task, data, num_steps, batch_size, clock)
        return model
    return common.blora_fit(model, task, data, method, num_steps, batch_size, clock, config=config)


def _setup(spec: dict[str, Any]):
    import torch

    import common

    common.set_threads(spec["threads"])
    device = spec.get("device", "cpu")
    torch.manual_seed(0)
    model, answer_ids, vocab = common.build_model(spec["model"], device=device)
    task = common.AnswerLogitsTask(answer_ids, device=device)
    data = common.make_examples(spec["batch_size"] * 4, spec["seq_len"], vocab, task.num_classes)
    return model, task, data, device


def run_timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Step times of every method side by side, then prediction times side by side."""
    import copy

    import common
    import interleave

    model, task, data, device = _setup(spec)
    methods = spec["methods"]
    copies = [model] + [copy.deepcopy(model) for _ in methods[1:]]
    steps = 1 + spec["warmup"] + spec["steps"]
    batch_size = spec["batch_size"]
    loops: list[Callable] = [
        (lambda clock, m=m, net=net: _train(m, net, task, data, steps, batch_size, clock))
        for m, net in zip(methods, copies)
    ]
    load = os.getloadavg()
    trained, clocks = interleave.run_interleaved(loops, sync=lambda: common.sync(device))
    out: dict[str, Any] = {"model": spec["model"], "loadavg_before": load, "loadavg_after": os.getloadavg(),
                           "methods": {}}
    for method, clock, result in zip(methods, clocks, trained):
        times = clock.step_times(1 + spec["warmup"])  # the first interval has no predecessor: skip it too
        net = result if method == "peft" else result.net
        extra = 0 if method == "peft" else common.count_params(result.guide)
        out["methods"][method] = {"wall_s": times["wall"], "cpu_s": times["cpu"], "faults": times["faults"],
                                  "trainable_params": common.count_params(net) + extra}
    samples = spec.get("predict_samples") or []
    if samples and "peft" in methods:
        guides = {m: r for m, r in zip(methods, trained) if m in spec.get("predict_guides", [])}
        out["prediction"] = _time_prediction(trained[methods.index("peft")], guides, task, data[:batch_size],
                                             samples, spec.get("predict_repeats", 3), device)
    if spec.get("overhead_steps"):  # in this process: one interpreter start less, the same conditions
        del trained, copies, model
        out["overhead"] = run_overhead({**spec, "methods": ["plain"] + [m for m in methods if m != "peft"],
                                        "warmup": 2, "steps": spec["overhead_steps"]})
    return out


def _time_prediction(peft_net: Any, results: dict[str, Any], task: Any, examples: list, samples: list[int],
                     repeats: int, device: str) -> dict[str, Any]:
    """One no-grad forward of the peft model vs ``predict(num_samples=N)`` (default, stacked, one forward per draw,
    default without merging the draws), in turn."""
    import torch

    import common

    batch = task.collate(examples)
    peft_net.eval()

    def forward() -> None:
        with torch.no_grad():
            task.class_logits(peft_net, batch)

    jobs: dict[str, Callable[[], Any]] = {"forward": forward}
    for method, result in results.items():
        for n in samples:
            # the library's default (stacked on accelerators, one forward per draw on a CPU), then both ways
            for mode, stack in (("default", None), ("stacked", True), ("loop", False)):
                jobs[f"{method}/{n}/{mode}"] = (lambda r=result, n=n, stack=stack: r.predict(
                    examples, num_samples=n, batch_size=len(examples), stack_samples=stack))
            # the default without merging each draw into W0 (models/merging.py): what the merge saves
            jobs[f"{method}/{n}/unmerged"] = lambda r=result, n=n: _predict_unmerged(r, examples, n)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in jobs}
    for job in jobs.values():
        job()  # warm-up
    for _ in range(repeats):
        for name, job in jobs.items():
            common.sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            job()
            common.sync(device)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.thread_time() - c0)
    return times


def _predict_unmerged(result: Any, examples: list, num_samples: int) -> Any:
    from pyro_blora.models.merging import adapter_path

    with adapter_path(result.model.layers):
        return result.predict(examples, num_samples=num_samples, batch_size=len(examples))


def run_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one method alone, above the resident set after loading the model."""
    import common

    model, task, data, device = _setup(spec)
    memory = common.PeakMemory(device)
    memory.start()
    timer = common.StepTimer(device)
    _train(spec["method"], model, task, data, 1 + spec["warmup"] + spec["steps"], spec["batch_size"], timer)
    return {"peak_memory_mb": memory.peak_mb(), "baseline_memory_mb": memory.baseline_mb(),
            "memory_method": memory.method}


def _plain_lora_stack(num_layers: int, width: int, seed: int):
    from torch import nn

    import skeleton

    return nn.Sequential(*[skeleton.PlainLoRALinear(layer) for layer in _linear_stack(num_layers, width, seed)])


def _linear_stack(num_layers: int, width: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        layer = nn.Linear(width, width)
        nn.init.orthogonal_(layer.weight)  # keeps activations O(1) through 128 layers (no denormals)
        nn.init.zeros_(layer.bias)
        layers.append(layer)
    return nn.Sequential(*layers)


def run_layers(spec: dict[str, Any]) -> dict[str, Any]:
    """Step times of a stack of adapted ``nn.Linear(width, width)``, per layer count, methods side by side."""
    import torch

    import common
    import interleave
    from pyro_blora.tasks import TensorTask

    common.set_threads(spec["threads"])
    torch.set_flush_denormal(True)
    width, batch_size = spec["width"], spec["batch_size"]
    steps = 1 + spec["warmup"] + spec["steps"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * 4, width, generator=g)
    y = torch.randint(0, width, (batch_size * 4,), generator=g)
    data = [{"inputs": x[i], "labels": y[i]} for i in range(len(x))]
    task = TensorTask(num_classes=width)
    config = common.blora_config(target_modules=r"\d+")
    results: dict[str, dict[str, Any]] = {m: {} for m in spec["methods"]}
    for count in spec["counts"]:
        nets = {m: _plain_lora_stack(count, width, 0) if m == "plain" else _linear_stack(count, width, 0)
                for m in spec["methods"]}
        loops = [(lambda clock, m=m: _train(m, nets[m], task, data, steps, batch_size, clock, config=config))
                 for m in spec["methods"]]
        _, clocks = interleave.run_interleaved(loops)
        for method, clock in zip(spec["methods"], clocks):
            times = clock.step_times(1 + spec["warmup"])
            results[method][str(count)] = {"wall_s": times["wall"], "cpu_s": times["cpu"]}
    return {"width": width, "batch_size": batch_size, "counts": spec["counts"], "results": results}


def run_overhead(spec: dict[str, Any]) -> dict[str, Any]:
    """Step times of a model's adapted layers alone (:class:`skeleton.AdapterSkeleton`), methods side by side.

    ``plain`` is hand-written LoRA on the same layers: a method's step minus
    plain's, in the same round, is what the method adds to LoRA's step.
    """
    import torch

    import common
    import interleave
    import skeleton
    from pyro_blora.tasks import TensorTask

    common.set_threads(spec["threads"])
    blocks, hidden, kv = skeleton.skeleton_shape(spec["model"])
    batch_size = spec["batch_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * 4, hidden, generator=g)
    y = torch.randint(0, 3, (batch_size * 4,), generator=g)
    data = [{"inputs": x[i], "labels": y[i]} for i in range(len(x))]
    task = TensorTask(num_classes=3)
    steps = 1 + spec["warmup"] + spec["steps"]
    config = common.blora_config()
    nets = {}
    for method in spec["methods"]:
        net = skeleton.AdapterSkeleton.like(spec["model"])
        nets[method] = skeleton.plain_lora(net) if method == "plain" else net
    loops = [(lambda clock, m=m: _train(m, nets[m], task, data, steps, batch_size, clock, config=config))
             for m in spec["methods"]]
    _, clocks = interleave.run_interleaved(loops)
    return {"model": spec["model"], "shape": [blocks, hidden, kv],
            "methods": {m: c.step_times(1 + spec["warmup"]) for m, c in zip(spec["methods"], clocks)}}


KINDS = {"timing": run_timing, "memory": run_memory, "layers": run_layers, "overhead": run_overhead}


def main(argv: list[str]) -> None:
    warnings.simplefilter("ignore")
    spec = json.loads(argv[0])
    result = KINDS[spec["kind"]](spec)
    Path(argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
