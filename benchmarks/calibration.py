"""Calibration benchmark: tasks x methods x seeds on SmolLM2-135M, resumable.

Every run fits one method with one training seed on one task, evaluates it on the
validation and test splits (and, for OpenBookQA, on the ARC-Easy and
ARC-Challenge test sets: the distribution-shift protocol of Laplace-LoRA), and
writes ``<output>/<task>/<method>/seed<k>.json`` (metrics) plus
``seed<k>.safetensors`` (per-sample class probabilities). A finished run is never
redone: re-running the same command continues where it stopped.

Post-hoc methods reuse the trained runs: temperature scaling is fitted on a run's
validation probabilities (``delta+ts``, ``flow+ts``), the deep ensemble averages
MAP runs of consecutive seeds (``ensemble`` of seed ``k`` = MAP seeds ``k..k+size-1``,
the checkpoint-ensemble style), and last-layer Laplace is fitted right after each
MAP run on its weights. The data split is the same for every seed (data seed 0),
so runs of different seeds predict the same examples. Model selection reads the
validation split only; the settings below were fixed before looking at test.

Usage::

    python benchmarks/calibration.py                        # every task, CPU preset
    python benchmarks/calibration.py --tasks drug_reviews_binary openbookqa --seeds 0 1 2
    python benchmarks/calibration.py --summary-only         # table + reliability grid
    python benchmarks/calibration.py --device cuda --workers 6

The benchmark files are read from ``../shared/data`` (or ``--data-dir`` /
``PYRO_BLORA_DATA_DIR``); tasks whose files are missing are skipped with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from calibration_io import adapter_path, brief, label, log, predict_all, run_path, write_run
from calibration_peers import PEERS, fit_peers, fit_peers_from_saved, peer_backlog
from common import PeakMemory, env_info

from pyro_blora.experiments.pipeline import ExperimentConfig, Prepared, fit_method, prepare
from pyro_blora.inject import remove_adapters
from pyro_blora.training.callbacks import EvaluationSchedule, fraction_steps

TRAINED = ["delta", "mc_dropout", "blob", "normal", "flow"]
"""Methods that train adapters, each scored at its checkpoints as it predicts (``fit_svi``'s ``result_type``); the
post-hoc peers (``calibration_peers.PEERS``) are fitted after each ``delta`` run."""

POSTHOC = ["ensemble", "delta+ts", "flow+ts"]
SHIFT = {"openbookqa": ["arc_easy", "arc_challenge"]}
ENSEMBLE_SIZE = 3


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """How a task is sized and scored so that one training run takes minutes on 2 CPU cores."""

    max_length: int
    train_size: Optional[int]
    validation_size: Optional[int]
    test_size: Optional[int]
    epochs: int
    scoring: str = "answer_token"
    normalize: str = "none"
    num_steps: Optional[int] = None


SETTINGS: dict[str, TaskSetting] = {
    "drug_reviews_binary": TaskSetting(max_length=64, train_size=None, validation_size=None, test_size=None, epochs=5,
                                       num_steps=620),
    "arc_easy": TaskSetting(max_length=128, train_size=1000, validation_size=200, test_size=500, epochs=5,
                            scoring="choice_likelihood", normalize="chars", num_steps=625),
    "arc_challenge": TaskSetting(max_length=128, train_size=1000, validation_size=200, test_size=500, epochs=3,
                                 scoring="choice_likelihood", normalize="chars"),
    "openbookqa": TaskSetting(max_length=96, train_size=1000, validation_size=200, test_size=500, epochs=5,
                              scoring="choice_likelihood", normalize="chars", num_steps=625),
    "boolq": TaskSetting(max_length=192, train_size=1000, validation_size=200, test_size=500, epochs=3,
                         scoring="choice_likelihood"),
    "winogrande_s": TaskSetting(max_length=64, train_size=None, validation_size=None, test_size=500, epochs=5,
                                scoring="choice_likelihood"),
}
"""Per task: sizes, epochs and scoring. Letters (answer tokens) stayed at chance for the fine-tuned
MAP model on ARC-Easy (val ACC 0.25 after 2 epochs on 400 questions, train NLL at ln 4), so the
question-answering tasks are scored by choice likelihood (lm-evaluation-harness ``acc``, or
``acc_norm`` with ``normalize="chars"``), on cached activations like the answer-token tasks."""

COMMON = dict(
    model="smollm2", trainable_layers=2, r=8, alpha=16.0, lr=1e-2, batch_size=8, prior_sd=1.0,
    lambda_max=0.03, scale_max=0.1, num_samples=4, target_modules=["q_proj", "v_proj", "lm_head"],
    bayesian_modules=None, map_bayesian_modules=[], prior_scale="empirical_bayes", lambda_prior=None,
    preset=None, kl_weight=0.1,
)
"""Shared settings, fixed before the benchmark ran: the long-training protocol (a fixed step budget per
task, ``num_steps``; checkpoints scored every 10 % of it), every adapted module Bayesian for the
Bayesian methods (no prior-free path) and plain LoRA for MAP and the methods built on it (what a peft user
trains: no prior on its factors, AdamW weight decay), the prior's scale by empirical Bayes, the ELBO
for every method with the KL tempered to 0.1 (no preset: "proper" would set kl_weight 1) (chosen on validation ACC/ECE on the
drug reviews, seed 0: kl_weight 1 left flow at the class prior, val ACC 0.709 against 0.782; methods
without a KL, MAP among them, are unaffected)."""


def experiment_config(task: str, data_dir: Optional[str], device: str, overrides: dict[str, Any],
                      activation_cache: Optional[str] = None) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of ``task`` (data seed 0; the training seed varies per run)."""
    setting = SETTINGS[task]
    values = {**COMMON, **dataclasses.asdict(setting), "activation_cache": activation_cache, **overrides}
    return ExperimentConfig(task=task, methods=["delta"], seed=0, data_dir=data_dir, device=device, **values)


def _shift_sets(cfg: ExperimentConfig, prepared: Prepared) -> dict[str, list]:
    """Test sets of the shifted tasks, restricted to questions the task's answer letters cover."""
    from pyro_blora.tasks import load_benchmark, subsample

    out = {}
    for name in SHIFT.get(cfg.task, []):
        splits = subsample(load_benchmark(name, data_dir=cfg.data_dir, seed=0), test=cfg.test_size, seed=0)
        examples = [e for e in splits.test if len(e["choices"]) <= prepared.splits.num_classes]
        out[name] = prepared.cache(prepared.task, examples, f"caching {name}") if prepared.cache else examples
    return out


def _fit(cfg: ExperimentConfig, prepared: Prepared, method: str, seed: int,
         schedule: Optional[EvaluationSchedule] = None) -> Any:
    options = {"callbacks": [schedule]} if schedule is not None else {}
    return fit_method(cfg, prepared, method, seed=seed, progress=False, **options)


def _schedule(cfg: ExperimentConfig, prepared: Prepared, method: str, seed: int) -> Optional[EvaluationSchedule]:
    """Validation and test scored every 10 % of the step budget of a trained method (the ensemble, averaged
    after the fact over MAP runs, has no checkpoints of its own). The shift sets
    are scored on the finished fit only: along training they would double a QA run's prediction cost."""
    if cfg.num_steps is None:
        return None
    sets = {"validation": prepared.validation, "test": prepared.test}
    return EvaluationSchedule(sets, fraction_steps(cfg.num_steps), select_on="validation", num_samples=cfg.num_samples,
                              seed=seed)


def plan(task: str, methods: list[str], seeds: list[int], out: Path, tag: Optional[str] = None,
         peers: Optional[list[str]] = None, scoring: Optional[str] = None) -> list[tuple[str, int]]:
    """The (method, seed) runs of ``task`` still to do: MAP first, with extra MAP seeds for the ensembles, then
    the post-hoc peers still missing on MAP runs that finished earlier (fitted on their saved adapters)."""
    runs = [(m, s) for s in seeds for m in methods]
    if "delta" in methods and not tag:
        runs += [("delta", max(seeds) + i) for i in range(1, ENSEMBLE_SIZE)]
    todo = [(m, s) for m, s in runs if not run_path(out, task, label(m, tag), s).exists()]
    if "delta" in methods and not tag:
        backlog = peer_backlog(out, task, seeds, scoring or SETTINGS[task].scoring, peers)
        todo += [(name, seed) for seed, names in backlog.items() for name in names]
    return sorted(set(todo), key=lambda ms: (ms[0] != "delta", ms[0] in PEERS, ms[1], ms[0]))


def run_task(task: str, todo: list[tuple[str, int]], out: Path, data_dir: Optional[str], device: str,
             overrides: dict[str, Any], tag: Optional[str] = None, peers: Optional[list[str]] = None,
             activation_cache: Optional[str] = None, peer_seeds: Optional[list[int]] = None) -> None:
    """Fit the ``todo`` runs of ``task``; the model and the activation cache are built once.

    A ``todo`` entry naming a peer (``("tfb", 0)``) is fitted on the saved MAP adapter of that seed;
    every new MAP run saves its adapter and, when its seed is in ``peer_seeds`` (None: any; the extra
    MAP seeds of the ensembles are not), gets its peers (``peers``; None: all) right away.
    """
    if not todo:
        log(f"{task}: all runs finished")
        return
    cfg = experiment_config(task, data_dir, device, overrides, activation_cache)
    start = time.perf_counter()
    prepared = prepare(cfg, log=log)
    shifted = _shift_sets(cfg, prepared)
    log(f"{task}: prepared in {time.perf_counter() - start:.0f} s; {len(todo)} runs to do")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output", "methods", "activation_cache")}
    trained = [(m, s) for m, s in todo if m not in PEERS]
    backlog: dict[int, list[str]] = {}
    for name, seed in todo:
        if name in PEERS:
            backlog.setdefault(seed, []).append(name)
    for method, seed in trained:
        started = time.perf_counter()
        schedule = _schedule(cfg, prepared, method, seed)
        memory = PeakMemory(device)
        memory.start()
        result = _fit(cfg, prepared, method, seed, schedule)
        seconds, peak_mb = time.perf_counter() - started, memory.peak_mb()
        finished = schedule is not None and schedule.records and schedule.records[-1]["step"] == cfg.num_steps
        # the last checkpoint is the finished fit, predicted with the same seed: not predicted twice
        predictions = predict_all(result, prepared, shifted, cfg.num_samples, seed, schedule.last if finished else None)
        record = {"task": task, "method": label(method, tag), "seed": seed, "train_seconds": seconds,
                  "peak_memory_mb": peak_mb, "memory_method": memory.method, "num_train": len(prepared.train),
                  "settings": settings, "overrides": overrides,
                  # what the optimiser got (a preset overrides lr and the loss terms); the run's own seed is "seed"
                  "training": {k: v for k, v in cfg.train_options().items() if k != "seed"},
                  # the machine and versions: what to compare when a rerun does not reproduce this one
                  "environment": env_info(device),
                  "final_train_nll": (result.history.get("nll") or [float("nan")])[-1],
                  "diagnostics": _diagnostics(result, prepared)}
        if schedule is not None:
            record["trajectory"] = schedule.records
            record["selected"] = {"step": schedule.selected_step,
                                  "metrics": {k: p.metrics() for k, p in schedule.selected.items()}}
        write_run(run_path(out, task, label(method, tag), seed), record, predictions,
                  schedule.selected if schedule is not None else None)
        log(f"{task} {label(method, tag)} seed {seed}: {seconds:.0f} s, test {brief(predictions['test'])}")
        if method == "delta" and not tag:
            result.save(adapter_path(out, task, seed))  # so that a peer added later needs no retraining
            if peer_seeds is None or seed in peer_seeds or seed in backlog:
                fit_peers(result, record, cfg, prepared, shifted, out, seed, peers)
            backlog.pop(seed, None)
        remove_adapters(prepared.net)
    for seed, names in sorted(backlog.items()):
        fit_peers_from_saved(cfg, prepared, shifted, out, seed, names)


def _diagnostics(result: Any, prepared: Prepared) -> Optional[dict[str, Any]]:
    """Is the posterior alive: :func:`pyro_blora.diagnose` on 16 validation examples (Bayesian-LoRA fits only)."""
    from pyro_blora.diagnostics import diagnose, supports

    return diagnose(result, list(prepared.validation)[:16]).to_dict() if supports(result) else None


def available_tasks(tasks: list[str], data_dir: Optional[str]) -> list[str]:
    """``tasks`` whose data can be read; the others are skipped with the reason."""
    from pyro_blora.tasks import load_benchmark

    keep = []
    for task in tasks:
        if task.startswith("drug_reviews"):
            keep.append(task)
            continue
        try:
            load_benchmark(task, data_dir=data_dir)
        except FileNotFoundError as err:
            log(f"skipping {task}: its data is not there ({str(err).splitlines()[0]})")
            continue
        keep.append(task)
    return keep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=TRAINED, choices=TRAINED, help=f"trained methods (default {TRAINED})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default="runs/calibration")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="tasks run in this many parallel processes")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the table and plots")
    parser.add_argument("--no-report", action="store_true", help="run only; leave the table to a later call")
    parser.add_argument("--tag", default=None, help="store the runs as <method>-<tag> (a variant of the settings)")
    parser.add_argument("--only", nargs="*", default=None, metavar="METHOD:SEED",
                        help="run exactly these runs of the (single) task (used by --workers); a peer's name "
                             "(laplace_lora:0) fits it on that seed's saved MAP adapter")
    parser.add_argument("--peers", nargs="*", default=None, choices=list(PEERS),
                        help=f"post-hoc peers fitted on each MAP run (default: all of {list(PEERS)})")
    parser.add_argument("--activation-cache", default=None, metavar="DIR",
                        help="where the frozen blocks' activations are kept between invocations "
                             "(default <output>/activation_cache; 'none': recomputed each time)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override an ExperimentConfig field for every task (JSON values), e.g. epochs=1")
    return parser


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    overrides = _overrides(args.set)
    if not args.summary_only:
        tasks = available_tasks(args.tasks, args.data_dir)
        todo = {task: plan(task, args.methods, args.seeds, out, args.tag, args.peers, overrides.get("scoring"))
                for task in tasks}
        if args.only:
            only = _parse_only(args.only)
            todo = {task: [(m, s) for m, s in only if not run_path(out, task, label(m, args.tag), s).exists()]
                    for task in tasks}
            _check_saved_maps(todo, out)
        if args.workers > 1:
            _run_workers(todo, args)
        else:
            for task, runs in todo.items():
                run_task(task, runs, out, args.data_dir, args.device, overrides, args.tag, args.peers,
                         None if args.activation_cache == "none" else args.activation_cache or str(out / "activation_cache"),
                         peer_seeds=args.seeds)
    if args.no_report:
        return 0
    from calibration_report import write_report

    protocol = {"common": {k: v for k, v in {**COMMON, **overrides}.items()},
                "tasks": {t: dataclasses.asdict(s) for t, s in SETTINGS.items() if t in args.tasks},
                "checkpoints": "every 10 % of num_steps; rows are the last checkpoint, METHOD@val the lowest "
                               "validation NLL", "ece_bins": 15, "seeds": args.seeds}
    write_report(out, seeds=args.seeds, ensemble_size=ENSEMBLE_SIZE, shift=SHIFT, protocol=protocol)
    return 0


def _parse_only(entries: list[str]) -> list[tuple[str, int]]:
    """``["flow:0", "tfb:1"]`` -> ``[("flow", 0), ("tfb", 1)]``; a malformed entry is a one-line error."""
    out = []
    for entry in entries:
        method, sep, seed = entry.partition(":")
        if not sep or not method or not seed.isdigit():
            raise SystemExit(f"--only expects METHOD:SEED (e.g. flow:0), got {entry!r}")
        if method not in TRAINED and method not in PEERS:
            raise SystemExit(f"--only {entry}: {method!r} is neither a trained method {TRAINED} nor a peer {list(PEERS)}")
        out.append((method, int(seed)))
    return out


def _check_saved_maps(todo: dict[str, list[tuple[str, int]]], out: Path) -> None:
    """Before any model loads: a peer asked for by ``--only`` needs its seed's finished, saved MAP run."""
    for task, runs in todo.items():
        for name, seed in runs:
            if name in PEERS and ("delta", seed) not in runs and not adapter_path(out, task, seed).is_dir():
                raise SystemExit(f"--only {name}:{seed}: no saved MAP adapter {adapter_path(out, task, seed)} "
                                 f"(run delta:{seed} first, or list it in --only too)")


def _run_workers(todo: dict[str, list[tuple[str, int]]], args: argparse.Namespace) -> None:
    """Spread the runs over ``args.workers`` subprocesses, each holding one task's model and cache.

    A task's runs are cut into chunks so that all workers have work; a MAP run and
    its Laplace fit stay together, and each chunk starts with its MAP runs.
    """
    total = sum(len(runs) for runs in todo.values())
    per_worker = max(1, -(-total // args.workers))
    jobs = [(task, runs[i:i + per_worker]) for task, runs in todo.items() for i in range(0, len(runs), per_worker)]
    keep = [a for a in sys.argv[1:]]
    base = [sys.executable, str(Path(__file__).resolve())] + keep + ["--workers", "1", "--no-report"]
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < args.workers:
            task, runs = pending.pop(0)
            running.append(subprocess.Popen(base + ["--tasks", task, "--only", *[f"{m}:{s}" for m, s in runs]]))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]


if __name__ == "__main__":
    raise SystemExit(main())
