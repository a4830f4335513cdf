"""Swap the posterior family: one task, one prior, six guides for q(U).

Bayesian-LoRA's model is fixed (LoRA factors generated from 9 x 9 inducing
matrices ``U`` under a matrix-normal prior); only the guide changes:

* ``delta``: a point mass, i.e. MAP, i.e. plain LoRA;
* ``normal``: mean-field Gaussian; ``mvn``: low-rank-plus-diagonal Gaussian;
* ``flow``: the paper's masked affine autoregressive flow, and two other chains of
  Pyro transforms chosen with ``guide_options={"transforms": [...]}``.

Every guide is fitted on the same drug-review data (the top blocks of SmolLM2
adapted, the frozen bottom cached once by :func:`pyro_blora.experiments.pipeline.prepare`),
with the same seed and steps. The script prints and writes a Markdown table of
test ACC / ECE / NLL / Brier and training time, a reliability diagram of every
guide, and the marginals of ``q(U)`` (500 draws, centred at each guide's mean) of
the first Bayesian site.

    python examples/swap_guides.py --output runs/swap_guides --epochs 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor

import pyro_blora
from pyro_blora.experiments import plots
from pyro_blora.experiments.pipeline import ExperimentConfig, prepare
from pyro_blora.metrics import classification_metrics

# label -> (guide, guide_options)
GUIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "delta": ("delta", {}),
    "normal": ("normal", {}),
    "mvn": ("mvn", {"rank": 8}),
    "flow": ("flow", {}),
    "flow[spline_coupling]": ("flow", {"transforms": ["spline_coupling"]}),
    "flow[2 x affine_autoregressive]": ("flow", {"transforms": ["affine_autoregressive", "affine_autoregressive"]}),
}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| guide | ACC | ECE | NLL | Brier | train s |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['guide']} | {row['acc']:.3f} | {row['ece']:.3f} | {row['nll']:.3f} "
                     f"| {row['brier']:.3f} | {row['train_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/swap_guides"))
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES), metavar="GUIDE",
                        help=f"subset of {list(GUIDES)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=8, help="posterior samples per prediction")
    parser.add_argument("--smoke", action="store_true", help="a few reviews and steps, to check the script runs")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)

    if args.smoke:
        cfg = ExperimentConfig(train_size=4, validation_size=3, test_size=4, trainable_layers=1, max_length=24)
        schedule: dict[str, Any] = {"num_steps": 2, "batch_size": 2}
        args.num_samples = 2
    else:
        cfg = ExperimentConfig()
        schedule = {"epochs": args.epochs, "batch_size": cfg.batch_size}
    data = prepare(cfg)  # data.net: the top blocks; data.task: reads the cached bottom activations
    config = pyro_blora.BLoRAConfig(target_modules=cfg.target_modules, bayesian_modules=cfg.bayesian_modules, r=cfg.r)

    rows: list[dict[str, Any]] = []
    reliability: dict[str, tuple[Tensor, Tensor]] = {}  # guide -> (test probs, labels)
    q_u: dict[str, Tensor] = {}
    for label in args.guides:
        guide, options = GUIDES[label]
        start = time.perf_counter()
        result = pyro_blora.fit(data.net, data.train, guide=guide, guide_options=options, task=data.task,
                                config=config, lr=cfg.lr, seed=cfg.seed, **schedule)
        seconds = time.perf_counter() - start
        prediction = result.predict(data.test, num_samples=args.num_samples, seed=0)
        metrics = classification_metrics(prediction.probs, prediction.labels)
        rows.append({"guide": label, **metrics, "train_seconds": seconds})
        reliability[label] = (prediction.probs, prediction.labels)
        site, draws = next(iter(result.guide.sample_inducing(500).items()))  # (500, 81) draws of U_w
        q_u[label] = draws - draws.mean(0)  # centred: the guides' locations differ, compare spread and shape
        pyro_blora.remove_adapters(data.net)  # the next fit injects fresh adapters into the same network

    table = markdown_table(rows)
    print(table)
    (args.output / "swap_guides.md").write_text(f"Drug reviews, test split ({len(data.test)} reviews)\n\n{table}\n")
    plots.reliability_diagram(reliability, path=args.output / "reliability.png")
    fig = plots.posterior_marginals(q_u, dims=(0, 1, 2, 3), prior_sd=None)  # draws centred on each guide's mean
    fig.suptitle(f"q(U) - E_q[U], first entries of {site}")
    fig.savefig(args.output / "q_u_marginals.png", dpi=120, bbox_inches="tight")
    print(f"table and plots in {args.output}")
    return rows


if __name__ == "__main__":
    main()
