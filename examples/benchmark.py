"""MAP LoRA vs Bayesian-LoRA on the QA benchmarks of ``../shared/data``: one table over tasks.

For each task (ARC-Easy, ARC-Challenge, OpenBookQA, BoolQ, WinoGrande-S) this
runs :func:`pyro_blora.experiments.pipeline.compare`, the pipeline behind
``pyro-blora compare``: load SmolLM2, fit every method with the same seed and
settings, evaluate on the validation and test splits, and write a run folder
(``<output>/<task>/``: adapters, metrics, plots). The test rows of all tasks are
collected into ``<output>/benchmark.md``.

Scoring (``--scoring``):

* ``answer_token`` (default): the choices are listed as ``A. ... B. ...`` in one
  prompt and each class is the next-token logit of its letter; only the top
  blocks are adapted and the frozen bottom is cached once;
* ``choice_likelihood``: each choice is scored by the log-likelihood of its text
  (lm-evaluation-harness ``acc``); one forward of the full model per choice, no cache.

The data folder is ``--data-dir``, else ``$PYRO_BLORA_DATA_DIR``, else
``../shared/data`` beside the project; without it the script says where it
looked and exits cleanly.

    python examples/benchmark.py --tasks arc_easy boolq --train-size 500 --epochs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from pyro_blora.experiments.pipeline import ExperimentConfig, compare
from pyro_blora.tasks.benchmarks import BENCHMARKS, resolve_data_dir

TASKS = ["arc_easy", "arc_challenge", "openbookqa", "boolq", "winogrande_s"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | method | ACC | ECE | NLL | Brier | val ACC | train s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t, v = row["test"], row["validation"]
        lines.append(f"| {row['task']} | {row['method']} | {t['acc']:.3f} | {t['ece']:.3f} | {t['nll']:.3f} "
                     f"| {t['brier']:.3f} | {v['acc']:.3f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(BENCHMARKS), metavar="TASK",
                        help=f"default: {' '.join(TASKS)} (--smoke: arc_easy)")
    parser.add_argument("--methods", nargs="+", default=["delta", "flow"], help="guides: delta, normal, mvn, flow")
    parser.add_argument("--scoring", choices=["answer_token", "choice_likelihood"], default="answer_token")
    parser.add_argument("--data-dir", default=None, help="folder holding ARC-Easy/, BoolQ/, ... (default ../shared/data)")
    parser.add_argument("--train-size", type=int, default=1000, help="training examples per task (at most)")
    parser.add_argument("--validation-size", type=int, default=200)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=160, help="prompt tokens at most")
    parser.add_argument("--trainable-layers", type=int, default=4, help="adapted top blocks (answer_token scoring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one task, a few examples and one step per method")
    args = parser.parse_args(argv)

    data_dir = resolve_data_dir(args.data_dir)
    if not data_dir.is_dir():
        print(f"benchmark data not found: looked in {data_dir.resolve()} (from --data-dir, $PYRO_BLORA_DATA_DIR, "
              "or ../shared/data beside the project); nothing to run.")
        return 0
    tasks = args.tasks or (["arc_easy"] if args.smoke else TASKS)
    sizes: dict[str, Any] = dict(train_size=args.train_size, validation_size=args.validation_size,
                                 test_size=args.test_size, epochs=args.epochs, max_length=args.max_length,
                                 trainable_layers=args.trainable_layers)
    if args.smoke:
        sizes = dict(train_size=4, validation_size=2, test_size=4, num_steps=1, batch_size=2, max_length=48,
                     trainable_layers=1, num_samples=2)

    rows: list[dict[str, Any]] = []
    for task in tasks:
        cfg = ExperimentConfig(task=task, scoring=args.scoring, methods=list(args.methods), data_dir=str(data_dir),
                               seed=args.seed, output=str(args.output / task), **sizes)
        try:
            results = compare(cfg)
        except FileNotFoundError as err:  # e.g. one benchmark's files are missing from the folder
            print(f"skipping {task}: {err}")
            continue
        rows.extend({"task": task, **row} for row in results)

    table = markdown_table(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "benchmark.md").write_text(f"Scoring: {args.scoring}; data: {data_dir}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
