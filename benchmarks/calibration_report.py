"""The table and plots of ``calibration.py``: mean +- std over seeds, post-hoc methods, shift, reliability grid.

Reads every ``<output>/<task>/<method>/seed<k>.json`` (and its ``.safetensors``
of per-sample probabilities), adds the post-hoc rows (temperature scaling fitted
on each run's validation probabilities; deep ensembles of consecutive MAP seeds, and of
those seeds' validation-selected checkpoints where the runs kept them),
and writes ``summary.md``, ``summary.json`` and ``reliability_grid.png``.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file

from calibration_io import SELECTED, method_of

from pyro_blora import metrics
from pyro_blora.result import Prediction

METHOD_ORDER = ["delta", "delta+ts", "mc_dropout", "ensemble", "laplace_last_layer", "laplace_lora", "laplace_lora_val",
                "tfb", "blob", "normal", "flow", "flow+ts"]
LABELS = {
    "delta": "MAP LoRA", "delta+ts": "MAP + temperature", "mc_dropout": "MC dropout", "ensemble": "ensemble (3 MAP)",
    "laplace_last_layer": "last-layer Laplace", "laplace_lora": "Laplace-LoRA (marglik)",
    "laplace_lora_val": "Laplace-LoRA (val NLL)", "tfb": "TFB", "blob": "BLoB-style", "normal": "B-LoRA normal", "flow": "B-LoRA flow",
    "flow+ts": "B-LoRA flow + temperature",
}
COLUMNS = ["acc", "ece", "nll", "brier"]
TEMPERATURE_ON = ("delta", "flow")


def temperature_bases(methods: Iterable[str]) -> list[str]:
    """The runs that get a ``+ts`` row: ``delta`` and ``flow`` and their tagged variants (``flow-top6``), so a
    variant's MAP is tempered as the protocol's is and no method gets a post-hoc step its baseline lacks."""
    return [m for m in methods if method_of(m) in TEMPERATURE_ON]


@functools.lru_cache(maxsize=None)
def _stored_predictions(path: Path) -> dict[str, Prediction]:
    """Every prediction a run's safetensors holds, read once per report (temperature, ensembles and the grid share them)."""
    tensors = load_file(str(path.with_suffix(".safetensors")))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {
        name: Prediction(tensors[f"{name}.sample_probs"].mean(0), tensors[f"{name}.sample_probs"], tensors[f"{name}.labels"])
        for name in names
    }


def _predictions(path: Path, selected: bool = False) -> dict[str, Prediction]:
    """A run's per-split predictions of the finished fit, or (``selected``) of its validation-selected checkpoint
    (empty unless both its validation and test splits are stored: a run stored before those were kept, or a
    method without checkpoints)."""
    stored = _stored_predictions(path)
    if selected:
        chosen = {name[len(SELECTED):]: p for name, p in stored.items() if name.startswith(SELECTED)}
        return chosen if {"validation", "test"} <= set(chosen) else {}
    return {name: p for name, p in stored.items() if not name.startswith(SELECTED)}


def _ensemble(maps: Mapping[int, Mapping[str, Any]], members: list[int]) -> dict[str, Any]:
    """The ensemble record of MAP runs ``members``: their finished fits averaged and, when every member kept its
    validation-selected checkpoint, those averaged too (an ensemble of early-stopped members: ``ensemble@val``)."""
    from pyro_blora.baselines.ensemble import combine_predictions

    def combine(parts: list[dict[str, Prediction]]) -> dict[str, dict[str, float]]:
        return _metrics({name: combine_predictions([p[name] for p in parts]) for name in parts[0]})

    files = [Path(maps[m]["file"]) for m in members]
    record: dict[str, Any] = {"metrics": combine([_predictions(f) for f in files]), "members": members,
                              "train_seconds": sum(maps[m]["train_seconds"] for m in members)}
    chosen = [_predictions(f, selected=True) for f in files]
    if all(chosen):
        record["selected"] = {"step": [maps[m]["selected"]["step"] for m in members], "metrics": combine(chosen)}
    return record


def _metrics(predictions: Mapping[str, Prediction]) -> dict[str, dict[str, float]]:
    return {name: prediction.metrics() for name, prediction in predictions.items()}


def _tempered(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``+ts`` record of a run: its finished fit temperature-scaled and, where the run kept its
    validation-selected checkpoint, that checkpoint scaled by its own temperature (``delta+temperature@val``:
    early stopping plus temperature, the other post-hoc MAP a peft user would try). Validation only, never test."""
    from pyro_blora.baselines.temperature import apply_temperature, fit_temperature

    def scale(predictions: dict[str, Prediction]) -> tuple[dict[str, dict[str, float]], float]:
        temperature = fit_temperature(predictions["validation"])
        return _metrics({k: apply_temperature(v, temperature) for k, v in predictions.items()}), temperature

    path = Path(record["file"])
    metrics, temperature = scale(_predictions(path))
    tempered: dict[str, Any] = {"metrics": metrics, "temperature": temperature,
                                "train_seconds": record["train_seconds"], "settings": record.get("settings", {})}
    chosen = _predictions(path, selected=True)
    if chosen:
        metrics, temperature = scale(chosen)
        tempered["selected"] = {"step": record["selected"]["step"], "metrics": metrics, "temperature": temperature}
    return tempered


def collect(out: Path, seeds: Iterable[int], ensemble_size: int) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """``runs[task][method][seed] = {"metrics": {split: {...}}, "train_seconds": ...}``, post-hoc rows included."""
    seeds = list(seeds)
    _stored_predictions.cache_clear()  # a report reads the folder as it is now
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for file in sorted(out.glob("*/*/seed*.json")):
        record = json.loads(file.read_text())
        runs.setdefault(record["task"], {}).setdefault(record["method"], {})[record["seed"]] = record | {"file": str(file)}
    for task, methods in runs.items():
        for base in temperature_bases(list(methods)):
            for seed, record in methods[base].items():
                if seed not in seeds:
                    continue
                methods.setdefault(f"{base}+ts", {})[seed] = _tempered(record)
        maps = methods.get("delta", {})
        for seed in seeds:
            members = [seed + i for i in range(ensemble_size)]
            if all(m in maps for m in members):
                methods.setdefault("ensemble", {})[seed] = _ensemble(maps, members)
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int],
              split: str = "test") -> dict[str, dict[str, dict[str, Any]]]:
    """``table[task][method] = {metric: (mean, std), "n": seeds counted}`` over the given seeds."""
    seeds = set(seeds)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for task, methods in runs.items():
        for method, by_seed in methods.items():
            chosen = [r for s, r in by_seed.items() if s in seeds and split in r["metrics"]]
            if not chosen:
                continue
            row: dict[str, Any] = {"n": len(chosen)}
            for key in COLUMNS:
                row[key] = _mean_std([r["metrics"][split][key] for r in chosen])
            row["val_ece"] = _mean_std([r["metrics"]["validation"]["ece"] for r in chosen])
            row["mi"] = _mean_std([r["metrics"][split].get("mutual_information", math.nan) for r in chosen])
            row["seconds"] = _mean_std([r["train_seconds"] for r in chosen])
            table.setdefault(task, {})[method] = row
    return table


def _cell(pair: tuple[float, float], scale: float = 1.0) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{scale * mean:.1f} ± {scale * std:.1f}" if scale != 1 else f"{mean:.3f} ± {std:.3f}"


def _ordered(methods: Iterable[str]) -> list[str]:
    methods = list(methods)
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def markdown(table: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str) -> str:
    """One Markdown table per task: ACC and ECE in %, NLL and Brier, mean ± std over seeds."""
    lines = [f"## {title}", ""]
    for task, rows in table.items():
        lines += [f"### {task}", "", "| method | n | ACC % | ECE % | NLL | Brier | val ECE % | MI (nats) | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in _ordered(rows):
            row = rows[method]
            lines.append(
                f"| {LABELS.get(method, method)} | {row['n']} | {_cell(row['acc'], 100)} | {_cell(row['ece'], 100)} "
                f"| {_cell(row['nll'])} | {_cell(row['brier'])} | {_cell(row['val_ece'], 100)} | {row['mi'][0]:.4f} "
                f"| {row['seconds'][0]:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def flow_vs_map(table: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per task: mean test ECE and NLL of flow and MAP and the relative change (negative = flow better)."""
    out = []
    for task, rows in table.items():
        for variant in (m for m in _ordered(rows) if m.startswith("flow") and "+" not in m):
            if "delta" not in rows:
                continue
            entry: dict[str, Any] = {"task": task, "variant": variant}
            for key in ("ece", "nll"):
                flow, base = rows[variant][key][0], rows["delta"][key][0]
                entry[key] = {"map": base, "flow": flow, "relative_change": (flow - base) / base if base else math.nan}
            out.append(entry)
    return out


def sample_averaging(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int]) -> str:
    """Test ECE / NLL of one posterior sample against the average of all of them, per sampled method.

    If averaging S samples barely moves ECE and NLL away from a single sample's,
    the posterior is a point mass as far as the predictions can tell, and more
    samples cannot help: the calibration comes from the fit, not the averaging.
    """
    seeds = set(seeds)
    lines = ["| task | method | samples | ECE % one sample | ECE % averaged | NLL one sample | NLL averaged |",
             "|---|---|---|---|---|---|---|"]
    for task in sorted(runs):
        for method in _ordered(runs[task]):
            files = [r["file"] for s, r in runs[task][method].items() if s in seeds and "file" in r]
            parts = [_predictions(Path(f))["test"] for f in files]
            if not parts or parts[0].num_samples < 2:
                continue
            one = [Prediction(p.sample_probs[0], p.sample_probs[:1], p.labels).metrics() for p in parts]
            avg = [p.metrics() for p in parts]
            mean = lambda rows, key: statistics.fmean(r[key] for r in rows)  # noqa: E731
            lines.append(f"| {task} | {LABELS.get(method, method)} | {parts[0].num_samples} | {100 * mean(one, 'ece'):.1f} "
                         f"| {100 * mean(avg, 'ece'):.1f} | {mean(one, 'nll'):.3f} | {mean(avg, 'nll'):.3f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def peer_costs(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int]) -> str:
    """Seconds and peak memory of each post-hoc peer's own step, against the MAP run it sits on."""
    seeds = set(seeds)
    lines = ["| task | method | seconds | x MAP training | peak MiB | MAP peak MiB |", "|---|---|---|---|---|---|"]
    for task in sorted(runs):
        for method in _ordered(runs[task]):
            chosen = [r for s, r in runs[task][method].items() if s in seeds and "cost_over_map" in r]
            if not chosen:
                continue
            mean = lambda get: statistics.fmean(get(r) for r in chosen)  # noqa: E731
            lines.append(f"| {task} | {LABELS.get(method, method)} | {mean(lambda r: r['train_seconds']):.0f} "
                         f"| {mean(lambda r: r['train_seconds'] / r['cost_over_map']['map_seconds']):.2f} | {mean(lambda r: r['peak_memory_mb']):.0f} "
                         f"| {mean(lambda r: r['cost_over_map']['map_peak_memory_mb']):.0f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def reliability_grid(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int],
                     path: Path, n_bins: int = 10) -> Optional[Path]:
    """Tasks x methods reliability diagrams of the test split, seeds pooled (trained runs only)."""
    seeds = set(seeds)
    tasks = sorted(runs)
    methods = _ordered({m for t in tasks for m, r in runs[t].items() if any("file" in v for v in r.values())})
    if not tasks or not methods:
        return None
    fig = Figure(figsize=(2.2 * len(methods) + 0.6, 2.2 * len(tasks) + 0.4), layout="constrained")
    axes = fig.subplots(len(tasks), len(methods), squeeze=False, sharex=True, sharey=True)
    for i, task in enumerate(tasks):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            files = [r["file"] for s, r in runs[task].get(method, {}).items() if s in seeds and "file" in r]
            ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=0.8)
            if files:
                parts = [_predictions(Path(f))["test"] for f in files]
                probs = torch.cat([p.probs for p in parts])
                labels = torch.cat([p.labels for p in parts])
                bins = metrics.calibration_bins(probs, labels, n_bins)
                full = bins["count"] > 0
                left = bins["bin_edges"][:-1][full].numpy()
                ax.bar(left, bins["accuracy"][full].numpy(), 1 / n_bins, align="edge", color="C0", edgecolor="black", lw=0.4)
                ece = metrics.expected_calibration_error(probs, labels, n_bins)
                ax.text(0.04, 0.9, f"ECE {100 * ece:.1f}%", transform=ax.transAxes, fontsize=8)
            if i == 0:
                ax.set_title(LABELS.get(method, method), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{task}\naccuracy", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("confidence", fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def shift_markdown(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int],
                   shift: Mapping[str, list[str]]) -> str:
    """Trained on the source task, evaluated on its own test split and on the shifted tasks."""
    lines = []
    for source, targets in shift.items():
        if source not in runs:
            continue
        splits = ["test"] + [f"shift.{t}" for t in targets]
        header = " | ".join(f"{s.replace('shift.', '')} ACC % / ECE % / NLL" for s in splits)
        lines += [f"### trained on {source}", "", f"| method | {header} |", "|---|" + "---|" * len(splits)]
        for method in _ordered(runs[source]):
            cells = []
            for split in splits:
                row = summarise({source: {method: runs[source][method]}}, seeds, split).get(source, {}).get(method)
                cells.append("n/a" if row is None else f"{_cell(row['acc'], 100)} / {_cell(row['ece'], 100)} / {_cell(row['nll'])}")
            lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, seeds: Iterable[int], ensemble_size: int, shift: Mapping[str, list[str]],
                 protocol: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Write ``summary.md``, ``summary.json``, ``reliability_grid.png``, ``calibration.json`` (the committed
    shape, see ``calibration_results``) and ``trajectory.png`` (ECE and NLL against steps) into ``out``."""
    seeds = list(seeds)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} does not exist: run the benchmark first")
    runs = collect(out, seeds, ensemble_size)
    table = summarise(runs, seeds)
    comparison = flow_vs_map(table)
    text = [markdown(table, f"Test split, mean ± std over seeds {seeds}")]
    if comparison:
        text += ["## Bayesian-LoRA (flow) against MAP LoRA", "",
                 "| task | flow | ECE MAP % | ECE flow % | change | NLL MAP | NLL flow | change |",
                 "|---|---|---|---|---|---|---|---|"]
        for c in comparison:
            e, n = c["ece"], c["nll"]
            text.append(f"| {c['task']} | {c['variant']} | {100 * e['map']:.1f} | {100 * e['flow']:.1f} | {100 * e['relative_change']:+.0f}% "
                        f"| {n['map']:.3f} | {n['flow']:.3f} | {100 * n['relative_change']:+.0f}% |")
        text.append("")
    averaging = sample_averaging(runs, seeds)
    if averaging:
        text += ["## One posterior sample against the average (test, mean over seeds)", "", averaging]
    costs = peer_costs(runs, seeds)
    if costs:
        text += ["## Post-hoc peers: cost over their MAP run (mean over seeds)", "", costs]
    shifted = shift_markdown(runs, seeds, shift)
    if shifted:
        text += ["## Distribution shift", "", shifted]
    (out / "summary.md").write_text("\n".join(text))
    summary = {"seeds": seeds, "table": table, "flow_vs_map": comparison,
               "temperatures": {t: {f"{m}": {s: r.get("temperature") for s, r in by.items()}
                                    for m, by in ms.items() if m.endswith("+ts")} for t, ms in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list))
    reliability_grid(runs, seeds, out / "reliability_grid.png")
    from calibration_results import results, trajectory_figure, write_results

    document = results(runs, seeds, protocol or {})
    write_results(document, out / "calibration.json")
    trajectory_figure(runs, seeds, out / "trajectory.png")
    summary["results"] = document
    print("\n".join(text))
    return summary
