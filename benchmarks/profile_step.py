"""Profile a few pyro_blora training steps: top torch ops (torch.profiler) and top Python functions (cProfile).

    python benchmarks/profile_step.py --model smollm2 --guide flow --steps 3
    python benchmarks/profile_step.py --model tiny --steps 2 --output /tmp/profile.txt

``torch`` mode: ``torch.profiler`` over ``--steps`` steps after ``--warmup`` steps,
table of ops by self CPU time (and self CUDA time on a GPU). ``python`` mode:
``cProfile`` over the same steps, the functions of pyro_blora (``pyro_blora/``,
``models/``, ``guides/``) and Pyro by cumulative time, which says where the
per-step overhead that plain LoRA does not have comes from.
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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or a random model of common.py (tiny, wide, llama1b)")
    p.add_argument("--guide", default="flow", choices=["peft", "delta", "normal", "mvn", "flow"])
    p.add_argument("--mode", default="both", choices=["torch", "python", "both"])
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
    text = "\n\n".join(parts)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return text


if __name__ == "__main__":
    main()
