"""Plots of a finished ``compare`` run, read back from its output folder (``pyro-blora plot``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from safetensors.torch import load_file

from pyro_blora.experiments import plots
from pyro_blora.metrics import uncertainty_decomposition

__all__ = ["write_plots", "load_run"]


def load_run(folder: str | Path) -> dict[str, dict]:
    """``{method: {"metrics", "history", "tensors"}}`` for every method folder of a run."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a run folder")
    runs = {}
    for method_dir in sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()):
        runs[method_dir.name] = {
            "metrics": json.loads((method_dir / "metrics.json").read_text()),
            "history": json.loads((method_dir / "history.json").read_text()),
            "tensors": load_file(str(method_dir / "predictions.safetensors")),
        }
    if not runs:
        raise FileNotFoundError(f"{root} holds no method folders with metrics.json; run `pyro-blora compare` first")
    return runs


def _class_names(root: Path) -> Optional[list[str]]:
    """The class names recorded beside any method's adapter (``experiment.json``), if one was saved."""
    from pyro_blora.experiments.record import RECORD_NAME

    for record in sorted(root.glob(f"*/{RECORD_NAME}")):
        try:
            names = json.loads(record.read_text()).get("class_names")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if names:
            return [str(n).strip() for n in names]
    return None


def write_plots(folder: str | Path, class_names: Optional[Sequence[str]] = None) -> list[Path]:
    """Write every plot of the run in ``folder``; returns the PNG paths."""
    root = Path(folder)
    runs = load_run(root)
    class_names = list(class_names) if class_names is not None else _class_names(root)
    written: list[Path] = []

    def out(name: str) -> Path:
        path = root / name
        written.append(path)
        return path

    results = {m: (r["tensors"]["test_sample_probs"].mean(0), r["tensors"]["test_labels"]) for m, r in runs.items()}
    plots.reliability_diagram(results, path=out("reliability.png"))
    plots.risk_coverage_curve(results, path=out("risk_coverage.png"))
    for method, run in runs.items():
        # an ensemble logs one history per member: plot the first member's
        logged = run["history"][0] if isinstance(run["history"], list) and run["history"] else run["history"]
        history = {k: v for k, v in logged.items() if k in ("step", "loss", "nll", "kl", "beta")} if isinstance(logged, dict) else {}
        if history.get("step"):
            # MAP (delta) has no q, so no KL panel; other methods let the logged KL decide
            plots.training_curves(history, path=out(f"training_curves_{method}.png"),
                                  has_posterior=False if method == "delta" else None)
    bayesian = [m for m, r in runs.items() if r["tensors"]["test_sample_probs"].shape[0] > 1]
    for method in bayesian[:1] or list(runs)[:1]:
        tensors = runs[method]["tensors"]
        samples, labels = tensors["test_sample_probs"], tensors["test_labels"]
        plots.posterior_predictive(
            samples, labels, plots.choose_examples(samples, labels),
            class_names=class_names if class_names and len(class_names) == samples.shape[-1] else None,
            path=out(f"posterior_predictive_{method}.png"),
        )
        if "shifted_sample_probs" in tensors:
            in_dist = {k: v for k, v in uncertainty_decomposition(samples).items() if k != "expected_entropy"}
            shifted = {
                k: v for k, v in uncertainty_decomposition(tensors["shifted_sample_probs"]).items() if k != "expected_entropy"
            }
            plots.uncertainty_histograms(in_dist, shifted, path=out(f"uncertainty_shift_{method}.png"))
    marginals, layer = {}, None
    for m, r in runs.items():
        key = next((k for k in r["tensors"] if k.startswith("q_u.")), None)
        if key is not None and m != "delta":
            samples = r["tensors"][key]
            marginals[m], layer = samples.reshape(samples.shape[0], -1), key[len("q_u."):]
    if marginals:
        plots.posterior_marginals(marginals, layer=layer, path=out("q_u_marginals.png"))
    return written
