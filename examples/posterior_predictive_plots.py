"""Every plot of :mod:`pyro_blora.experiments.plots` for one run: what the posterior knows and doesn't.

Fits Bayesian-LoRA with a flow posterior on the drug reviews, plus MAP LoRA
(``delta``) as the baseline and a mean-field ``normal`` guide to compare q(U)
against, then draws

* ``posterior_predictive.png``: the class probabilities of each posterior sample
  for the test reviews that tell the story (``plots.choose_examples``): the most
  uncertain, the wrong ones, and one confident right one, under the class names;
* ``reliability.png`` and ``risk_coverage.png``: calibration and selective
  prediction of every method;
* ``training_curves_<method>.png``: per-example NLL and the KL per training
  example (none for MAP) from ``result.history``;
* ``uncertainty_shift.png``: predictive entropy and mutual information of the
  flow on the test reviews vs the same reviews with their words shuffled;
* ``q_u_marginals.png``: marginals of q(U) of the first Bayesian site, flow vs
  normal, over its whitened N(0, 1) prior, with the layer in the title.

The plotting functions take plain tensors, so the same calls work on anything
``result.predict`` returns. (``pyro-blora compare`` + ``pyro_blora.experiments.report.write_plots``
draw a similar set from a saved run folder.)

    python examples/posterior_predictive_plots.py --output runs/posterior_plots
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import pyro_blora
from pyro_blora import Prediction
from pyro_blora.experiments import plots
from pyro_blora.experiments.pipeline import ExperimentConfig, prepare
from pyro_blora.metrics import uncertainty_decomposition

METHODS = ("delta", "flow", "normal")


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/posterior_plots"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16, help="posterior samples per prediction")
    parser.add_argument("--examples", type=int, default=6, help="test reviews to show")
    parser.add_argument("--smoke", action="store_true", help="a few reviews and steps, to check the script runs")
    args = parser.parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)

    if args.smoke:
        cfg = ExperimentConfig(train_size=4, validation_size=3, test_size=4, trainable_layers=1, max_length=24)
        schedule: dict[str, Any] = {"num_steps": 2, "batch_size": 2}
        args.num_samples, args.examples = 4, 3
    else:
        cfg = ExperimentConfig()
        schedule = {"epochs": args.epochs, "batch_size": cfg.batch_size}
    data = prepare(cfg)  # top blocks of SmolLM2 on cached bottom activations; data.shifted: shuffled words
    config = pyro_blora.BLoRAConfig(target_modules=cfg.target_modules, bayesian_modules=cfg.bayesian_modules, r=cfg.r)

    test: dict[str, Prediction] = {}
    shifted: dict[str, Prediction] = {}
    history: dict[str, dict[str, list[float]]] = {}
    q_u: dict[str, torch.Tensor] = {}
    layer = ""
    for method in METHODS:
        result = pyro_blora.fit(data.net, data.train, guide=method, task=data.task, config=config,
                                lr=cfg.lr, seed=cfg.seed, **schedule)
        test[method] = result.predict(data.test, num_samples=args.num_samples, seed=0)
        shifted[method] = result.predict(data.shifted, num_samples=args.num_samples, seed=0)
        history[method] = result.history
        if method != "delta":  # MAP has no q(U)
            # uncentred (1000, m_r * m_c) draws of U_w: they are drawn over the whitened N(0, 1) prior
            layer, draws = next(iter(result.guide.sample_inducing(1000).items()))
            q_u[method] = draws.reshape(draws.shape[0], -1)
        pyro_blora.remove_adapters(data.net)

    flow = test["flow"]
    chosen = plots.choose_examples(flow.sample_probs, flow.labels, k=args.examples)
    plots.posterior_predictive(flow.sample_probs, flow.labels, chosen,
                               class_names=data.splits.class_names, path=out / "posterior_predictive.png")
    calibration = {method: (p.probs, p.labels) for method, p in test.items()}
    plots.reliability_diagram(calibration, path=out / "reliability.png")
    plots.risk_coverage_curve(calibration, path=out / "risk_coverage.png")
    for method in ("delta", "flow"):
        curves = {key: history[method][key] for key in ("step", "loss", "nll", "kl", "beta")}
        plots.training_curves(curves, has_posterior=method != "delta", num_data=len(data.train),
                              path=out / f"training_curves_{method}.png")
    keys = ("predictive_entropy", "mutual_information")
    in_dist = {k: v for k, v in uncertainty_decomposition(flow.sample_probs).items() if k in keys}
    out_dist = {k: v for k, v in uncertainty_decomposition(shifted["flow"].sample_probs).items() if k in keys}
    plots.uncertainty_histograms(in_dist, out_dist, path=out / "uncertainty_shift.png")
    plots.posterior_marginals(q_u, dims=range(4), layer=layer, path=out / "q_u_marginals.png")

    for method, p in test.items():
        mi = uncertainty_decomposition(p.sample_probs)["mutual_information"].mean()
        acc = (p.probs.argmax(-1) == p.labels).float().mean()
        print(f"{method:>6}: test acc {acc:.3f}, mean mutual information {mi:.2e} nats")
    written = sorted(out.glob("*.png"))
    print("wrote", ", ".join(p.name for p in written))
    return written


if __name__ == "__main__":
    main()
