"""The committed results of ``calibration.py``: ``docs/results/calibration.json`` and the ECE/NLL-vs-steps figure.

``calibration.json`` has the shape the docs promise::

    {"commit": ..., "protocol": {...}, "tasks": {TASK: {METHOD: {"acc": {"mean", "sd"}, "ece": ..., "nll": ...,
     "brier": ..., "mi": ..., "seeds": n}}}}

with METHOD the registry's names, post-hoc rows as ``delta+temperature`` / ``flow+temperature``, and the
validation-selected checkpoint of a trained method as ``METHOD@val`` (test metrics of the checkpoint with
the lowest validation NLL; ``delta+temperature@val`` is that checkpoint scaled by a temperature fitted on its
own validation split). Fractions, not percents; the last checkpoint of the long protocol otherwise.
The post-hoc peers (``laplace_last_layer``, ``laplace_lora``, ``laplace_lora_val``, ``tfb``) add ``cost``:
seconds and peak memory of their own step, and those of the MAP run they sit on. Every row keeps
``per_seed`` (each seed's values), so a later invocation's seeds can be pooled in (``--pool``).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from matplotlib.figure import Figure

from calibration_report import _mean_std


def posthoc_name(method: str) -> str:
    """The JSON name of a runner row: ``delta+ts`` -> ``delta+temperature``, ``flow-top6+ts`` ->
    ``flow-top6+temperature``; any other row keeps its name."""
    return method[: -len("+ts")] + "+temperature" if method.endswith("+ts") else method


METRICS = {"acc": "acc", "ece": "ece", "nll": "nll", "brier": "brier", "mi": "mutual_information"}


def _stat(values: list[float]) -> dict[str, float]:
    mean, sd = _mean_std([v for v in values if v is not None and not math.isnan(v)])
    return {"mean": mean, "sd": sd}


COSTS = ("seconds", "peak_memory_mb", "map_seconds", "map_peak_memory_mb")


def _seed_values(metrics: Mapping[str, Any], record: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """One seed's entry of a row's ``per_seed``: its metrics, the device it ran on (``cpu``, ``cuda``: rows may
    pool seeds from different machines) and, for a post-hoc peer's ``record``, its cost."""
    values: dict[str, Any] = {key: metrics.get(name, math.nan) for key, name in METRICS.items()}
    device = (record or {}).get("settings", {}).get("device")
    if device is not None:
        values["device"] = device
    if record is not None and "cost_over_map" in record:
        values["cost"] = {"seconds": record["train_seconds"], "peak_memory_mb": record["peak_memory_mb"],
                          "map_seconds": record["cost_over_map"]["map_seconds"],
                          "map_peak_memory_mb": record["cost_over_map"]["map_peak_memory_mb"]}
    return values


def row_from_seeds(per_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A row (mean and sd of every metric over its seeds, ``seeds``, a peer's ``cost``) with ``per_seed`` kept."""
    entries = [per_seed[k] for k in sorted(per_seed, key=int)]
    row: dict[str, Any] = {key: _stat([e.get(key, math.nan) for e in entries]) for key in METRICS}
    row["seeds"] = len(entries)
    devices = sorted({e["device"] for e in entries if "device" in e})
    if devices:
        row["devices"] = devices
    if entries and all("cost" in e for e in entries):  # a post-hoc peer: its own cost on top of the MAP run
        row["cost"] = {key: _stat([e["cost"][key] for e in entries]) for key in COSTS}
    row["per_seed"] = {k: dict(per_seed[k]) for k in sorted(per_seed, key=int)}
    return row


def results(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int],
            protocol: Mapping[str, Any], split: str = "test") -> dict[str, Any]:
    """The ``calibration.json`` document of collected ``runs`` (see ``calibration_report.collect``)."""
    seeds = set(seeds)
    tasks: dict[str, dict[str, Any]] = {}
    for task, methods in runs.items():
        rows: dict[str, Any] = {}
        for method, by_seed in methods.items():
            chosen = {str(s): _seed_values(r["metrics"][split], r) for s, r in by_seed.items()
                      if s in seeds and split in r["metrics"]}
            if chosen:
                rows[posthoc_name(method)] = row_from_seeds(chosen)
            selected = {str(s): _seed_values(r["selected"]["metrics"][split], r) for s, r in by_seed.items()
                        if s in seeds and r.get("selected", {}).get("metrics", {}).get(split)}
            if selected:
                rows[f"{posthoc_name(method)}@val"] = row_from_seeds(selected)
        tasks[task] = rows
    return {"commit": _commit(), "protocol": dict(protocol), "tasks": tasks}


def pool_rows(old: Optional[Mapping[str, Any]], new: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``new``'s seeds added to ``old``'s (a seed in both: ``new``'s values), mean and sd recomputed."""
    if old is None:
        return dict(new)
    for name, row in (("committed", old), ("new", new)):
        if "per_seed" not in row:
            raise ValueError(f"{where}: the {name} row has no per-seed values to pool; replace it instead (no --pool)")
    return row_from_seeds({**old["per_seed"], **new["per_seed"]})


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_results(document: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=float) + "\n")
    return path


def trajectory_figure(runs: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]], seeds: Iterable[int],
                      path: Path, split: str = "test") -> Optional[Path]:
    """Test ECE and NLL against training steps, one line per method (mean over seeds), one column per task."""
    seeds = set(seeds)
    tasks = [t for t, ms in runs.items() if any(r.get("trajectory") for by in ms.values() for r in by.values())]
    if not tasks:
        return None
    fig = Figure(figsize=(4.2 * len(tasks), 6.4))
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        for method, by_seed in sorted(runs[task].items()):
            curves = [r["trajectory"] for s, r in by_seed.items() if s in seeds and r.get("trajectory")]
            if not curves:
                continue
            steps = [point["step"] for point in curves[0]]
            for row, metric in enumerate(("ece", "nll")):
                mean = [statistics.fmean(c[i][split][metric] for c in curves if len(c) > i) for i in range(len(steps))]
                axes[row][column].plot(steps, mean, marker="o", ms=3, label=f"{method} ({len(curves)} seeds)")
        axes[0][column].set_title(task)
        axes[0][column].set_ylabel(f"{split} ECE (15 bins)")
        axes[1][column].set_ylabel(f"{split} NLL")
        axes[1][column].set_xlabel("training step")
        axes[0][column].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def merge_results(new: Mapping[str, Any], committed: Mapping[str, Any], tasks: Iterable[str],
                  note: Optional[str] = None, methods: Optional[Iterable[str]] = None,
                  pool: bool = False) -> dict[str, Any]:
    """``committed`` with the rows and protocol of ``tasks`` taken from ``new`` (another invocation's document).

    ``methods`` (row names, e.g. ``mc_dropout``, ``flow+temperature``, ``flow@val``) replaces only those rows
    of each task and keeps the others; None replaces a task's rows as a whole. The other tasks keep their
    rows; ``protocol.partial[task]`` records a task whose rows average fewer seeds than the protocol's
    (which rows, ``note``), and is dropped once a task is complete;
    ``protocol.commits[task]`` is the commit that produced a task's rows. With ``pool`` the new rows' seeds
    join the committed rows' (``per_seed``; an invocation that ran seeds 1-2 completes one that ran seed 0)
    instead of replacing them, and the commit is recorded per row.
    """
    out = json.loads(json.dumps(committed))
    protocol = out.setdefault("protocol", {})
    for task in tasks:
        if task not in new.get("tasks", {}):
            raise ValueError(f"{task!r} has no rows in the new results (tasks there: {sorted(new.get('tasks', {}))})")
        rows = dict(new["tasks"][task])
        if pool or methods is not None:  # row by row: the task's other rows and its protocol stay
            kept = out.get("tasks", {}).get(task, {})
            names = list(methods) if methods is not None else list(rows)
            missing = [m for m in names if m not in rows]
            if missing:
                raise ValueError(f"{task}: no rows {missing} in the new results (rows there: {sorted(rows)})")
            chosen = {m: pool_rows(kept.get(m), rows[m], f"{task} {m}") if pool else rows[m] for m in names}
            rows = {**kept, **chosen}
            protocol.setdefault("commits", {})[task] = {**_as_dict(protocol.get("commits", {}).get(task)),
                                                        **{m: new.get("commit") for m in names}}
        else:
            protocol.setdefault("tasks", {})[task] = new.get("protocol", {}).get("tasks", {}).get(task)
            protocol.setdefault("commits", {})[task] = new.get("commit")
        out.setdefault("tasks", {})[task] = rows
        wanted = len(protocol.get("seeds", [0, 1, 2]))
        short = {method: row["seeds"] for method, row in rows.items() if row["seeds"] < wanted}
        partial = protocol.setdefault("partial", {})
        if short:
            partial[task] = {"rows_with_fewer_seeds": short, "commit": new.get("commit"), "why": note}
        else:
            partial.pop(task, None)
    out["commit"] = new.get("commit", out.get("commit"))
    return out


def _as_dict(commit: Any) -> dict[str, Any]:
    """A task's commits as ``{row: commit}`` (a single commit for the whole task becomes ``{"*": commit}``)."""
    return dict(commit) if isinstance(commit, Mapping) else ({} if commit is None else {"*": commit})


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Merge one invocation's calibration.json into the committed one.")
    parser.add_argument("new", type=Path, help="<output>/calibration.json of the runner")
    parser.add_argument("--into", type=Path, default=Path(__file__).parents[1] / "docs" / "results" / "calibration.json")
    parser.add_argument("--tasks", nargs="+", required=True, help="tasks whose rows the new file replaces")
    parser.add_argument("--methods", nargs="+", default=None, help="replace only these rows (default: the whole task)")
    parser.add_argument("--note", default=None, help="why a task is partial (kept in protocol.partial)")
    parser.add_argument("--pool", action="store_true",
                        help="add the new seeds to the committed rows' (per_seed) instead of replacing the rows")
    args = parser.parse_args(argv)
    for path in (args.new, args.into):
        if not path.is_file():
            raise SystemExit(f"{path} not found")
    try:
        merged = merge_results(json.loads(args.new.read_text()), json.loads(args.into.read_text()), args.tasks, args.note,
                               args.methods, args.pool)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    write_results(merged, args.into)
    print(f"{args.into}: rows of {args.tasks} {'pooled with' if args.pool else 'from'} {args.new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
