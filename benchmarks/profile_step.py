"""Profile a few pyro_blora training steps: top torch ops (torch.profiler) and top Python functions (cProfile).

    python benchmarks/profile_step.py --model smollm2 --guide flow --steps 3
    python benchmarks/profile_step.py --model tiny --steps 2 --output /tmp/profile.txt

``torch`` mode: ``torch.profiler`` over ``--steps`` steps after ``--warmup`` steps,
table of ops by self CPU time (and self CUDA time on a GPU). ``python`` mode:
``cProfile`` over the same steps, the functions of pyro_blora (``pyro_blora/``,
``models/``, ``guides/``) and Pyro by cumulative time, which says where the
per-step overhead that plain LoRA does not have comes from. ``phases`` mode:
CPU time of a step's guide, model, ELBO terms, backward, clipping and optimiser
(``--skeleton``: on the model's adapted layers alone, see ``skeleton.py``).

    python benchmarks/profile_step.py --model smollm2 --skeleton --mode phases --guide flow --steps 20
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import warnings
from pathlib import Path

# run as scripts: their own folder is sys.path[0], so ``import common`` finds benchmarks/common.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup(args):
    import torch

    import common

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, answer_ids, vocab = common.build_model(args.model, device=device)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    task = common.AnswerLogitsTask(answer_ids, device=device, autocast=autocast)
    data = common.make_examples(args.batch_size * 4, args.seq_len, vocab, task.num_classes)
    return device, model, task, data


def profile_torch(args) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import common

    device, model, task, data = _setup(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    timer = common.StepTimer(device)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
                 record_shapes=False) as prof:
        def step(state):
            timer(state)
            prof.step()

        if args.guide == "peft":
            net = common.peft_model(model)
            common.train_loop(net, task, data, args.warmup + args.steps, args.batch_size, step)
        else:
            common.blora_fit(model, task, data, args.guide, args.warmup + args.steps, args.batch_size, step)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.row_limit, max_name_column_width=60)
    steps = timer.step_times(args.warmup - 1 if args.warmup else 0)
    head = (f"torch.profiler: {args.model}, guide {args.guide}, {args.steps} profiled steps after {args.warmup}, "
            f"batch {args.batch_size} x seq {args.seq_len}, {device}, {torch.get_num_threads()} thread(s); "
            f"step times under the profiler (ms): {[round(1e3 * t, 1) for t in steps]}\n")
    return head + table


def profile_python(args) -> str:
    import common

    device, model, task, data = _setup(args)
    profiler = cProfile.Profile()
    timer = common.StepTimer(device)
    state = {"n": 0}

    def step(s):
        timer(s)
        state["n"] += 1
        if state["n"] == args.warmup:
            profiler.enable()

    if args.warmup == 0:
        profiler.enable()
    if args.guide == "peft":
        net = common.peft_model(model)
        common.train_loop(net, task, data, args.warmup + args.steps, args.batch_size, step)
    else:
        common.blora_fit(model, task, data, args.guide, args.warmup + args.steps, args.batch_size, step)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative")
    out.write(f"cProfile: {args.model}, guide {args.guide}, {args.steps} steps after {args.warmup} (cumulative)\n")
    out.write("-- pyro_blora functions --\n")
    stats.print_stats(r"(pyro_blora|/models/|/guides/|benchmarks/common)", args.row_limit)
    out.write("-- pyro functions --\n")
    stats.print_stats(r"site-packages/pyro/", args.row_limit)
    out.write("-- by own time (all) --\n")
    stats.sort_stats("tottime")
    stats.print_stats(args.row_limit)
    return out.getvalue()


def _finish_step(loss, params: list, optimizer, t: list[float]) -> list[float]:
    """Backward, clip and optimizer step, each timed after the phases already in ``t``; the phase durations."""
    import time

    import torch

    loss.backward()
    t.append(time.thread_time())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    t.append(time.thread_time())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t.append(time.thread_time())
    return [b - a for a, b in zip(t, t[1:])]


def profile_phases(args) -> str:
    """CPU time of each phase of a ``fit`` step (guide, model, ELBO terms, backward, clipping, optimiser),
    on the model or (``--skeleton``) on its adapted layers alone; peft/plain LoRA for comparison."""
    import statistics
    import time

    import pyro
    import torch
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    import common
    import skeleton
    from pyro_blora.training.elbo import MeanFieldELBO
    from pyro_blora.training.svi import KLScale, _fused
    from pyro_blora.guides import BayesianLoRAGuide
    from pyro_blora.inject import inject_adapters
    from pyro_blora.model import BayesianLoRAModel
    from pyro_blora.models.priors import shared_geometry
    from pyro_blora.tasks import TensorTask

    if args.skeleton:
        net = skeleton.AdapterSkeleton.like(args.model)
        task = TensorTask(num_classes=3)
        batch = {"inputs": torch.randn(args.batch_size, net.layers[0].q_proj.in_features),
                 "labels": torch.randint(0, 3, (args.batch_size,))}
    else:
        _, net, task, data = _setup(args)
        batch = task.collate(data[: args.batch_size])
    names = ["guide", "model", "elbo terms", "backward", "clip", "optimizer"]
    rows = []
    if args.guide == "peft":  # the plain LoRA step in the same phases: forward + loss, backward, clip, optimizer
        net = skeleton.plain_lora(net) if args.skeleton else common.peft_model(net)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        for _ in range(args.warmup + args.steps):
            t = [time.thread_time()] * 2  # no guide
            loss = torch.nn.functional.cross_entropy(task.class_logits(net, batch), batch["labels"])
            t += [time.thread_time()] * 2  # no separate ELBO terms
            rows.append(_finish_step(loss, params, optimizer, t))
        names[1] = "forward+loss"
    else:
        inject_adapters(net, common.blora_config())
        model = BayesianLoRAModel(net, task, num_data=1000)
        guide = BayesianLoRAGuide(model.factors, args.guide)
        params = [p for m in (net, guide) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, **_fused(params))
        scale, elbo = KLScale(0.5), MeanFieldELBO()
        for _ in range(args.warmup + args.steps):
            t = [time.thread_time()]
            with shared_geometry(), pyro.validation_enabled(False):
                guide_trace = poutine.trace(scale(guide)).get_trace(batch)
                t.append(time.thread_time())
                model_trace = poutine.trace(poutine.replay(scale(model), trace=guide_trace)).get_trace(batch)
                t.append(time.thread_time())
                loss, _ = elbo._differentiable_loss_particle(prune_subsample_sites(model_trace),
                                                             prune_subsample_sites(guide_trace))
                t.append(time.thread_time())
            rows.append(_finish_step(loss, params, optimizer, t))
    med = [statistics.median(r[i] for r in rows[args.warmup:]) for i in range(len(names))]
    where = f"{args.model} adapted layers alone" if args.skeleton else args.model
    head = (f"phases of a step (median CPU ms of {args.steps} after {args.warmup}): {where}, guide {args.guide}, "
            f"{len(params)} trainable tensors, {torch.get_num_threads()} thread(s)\n")
    return head + "  ".join(f"{n} {1e3 * v:.1f}" for n, v in zip(names, med)) + f"  | total {1e3 * sum(med):.1f}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or a random model of common.py (tiny, wide, llama1b)")
    p.add_argument("--guide", default="flow", choices=["peft", "delta", "normal", "mvn", "flow"])
    p.add_argument("--mode", default="both", choices=["torch", "python", "both", "phases"])
    p.add_argument("--skeleton", action="store_true", help="phases mode: the model's adapted layers alone (skeleton.py)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--autocast", choices=["bf16", "none"], default="none")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--row-limit", type=int, default=25)
    p.add_argument("--output", default=None, help="text file to write the tables to")
    args = p.parse_args(argv)
    import common

    common.set_threads(args.threads)
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.mode in ("torch", "both"):
            parts.append(profile_torch(args))
        if args.mode in ("python", "both"):
            parts.append(profile_python(args))
        if args.mode == "phases":
            parts.append(profile_phases(args))
    text = "\n\n".join(parts)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return text


if __name__ == "__main__":
    main()
