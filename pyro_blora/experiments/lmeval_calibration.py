"""Calibration of lm-eval multiple-choice runs of the ``pyro_blora`` harness model.

Reads the harness's ``--log_samples`` files (``samples_<task>_<date>.jsonl``) and
the model's side file (per-sample log-likelihoods keyed by ``(task, doc_id, idx)``).
For a doc with choices ``c = 1..C`` and draws ``s = 1..S`` with log-likelihoods
``ll[s, c]`` the class probabilities are the posterior predictive

.. math::

    p(c) = \\frac1S \\sum_s \\operatorname{softmax}_c(ll[s, \\cdot] / n)

with ``n = 1`` for ``acc`` and ``n = len(choice)`` in characters for ``acc_norm``
(harness's normalisation, so the argmax of ``p`` for one sample is harness's
prediction). ACC, ECE, MCE, NLL and Brier come from
:func:`pyro_blora.metrics.classification_metrics`; a MAP run (``num_samples=1``
on the posterior mean) can be given beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from pyro_blora.metrics import classification_metrics

__all__ = [
    "ChoiceDoc", "calibrate", "choice_docs", "class_probabilities", "find_sample_files", "main", "read_side_file",
]

_SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.jsonl$")
_VARIANTS = ("acc", "acc_norm")


@dataclass
class ChoiceDoc:
    """One multiple-choice doc: ``(S, C)`` per-sample choice log-likelihoods, choice lengths and the gold index."""

    doc_id: int
    loglik: Tensor
    lengths: Tensor
    label: int


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return rows


def read_side_file(path: str | Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The harness model's side file as ``{(task, doc_id, idx): record}`` (loglikelihood requests only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"side file {path} not found: pass the harness model's side_file=")
    return {
        (r["task"], int(r["doc_id"]), int(r["idx"])): r
        for r in _read_jsonl(path) if r.get("request_type", "loglikelihood") == "loglikelihood"
    }


def find_sample_files(paths: Iterable[str | Path]) -> dict[str, Path]:
    """``{task: samples file}`` from files or folders (searched recursively); the newest run of a task wins."""
    found: dict[str, tuple[str, Path]] = {}
    for given in map(Path, paths):
        if not given.exists():
            raise FileNotFoundError(f"{given} does not exist: pass lm-eval's --output_path folder or a samples_*.jsonl")
        for file in [given] if given.is_file() else sorted(given.rglob("samples_*.jsonl")):
            match = _SAMPLES_NAME.match(file.name)
            if match is None:
                raise ValueError(f"{file.name} is not named like lm-eval's samples_<task>_<date>.jsonl")
            task, date = match["task"], match["date"]
            if task not in found or date > found[task][0]:
                found[task] = (date, file)
    if not found:
        raise FileNotFoundError(f"no samples_<task>_<date>.jsonl under {[str(p) for p in paths]}: run lm-eval with --log_samples")
    return {task: file for task, (_, file) in sorted(found.items())}


def _arguments(sample: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(context, continuation)`` per request; lm-eval saves them as ``{"gen_args_i": {"arg_0", "arg_1"}}`` or lists."""
    args = sample["arguments"]
    if isinstance(args, Mapping):
        args = [args[f"gen_args_{i}"] for i in range(len(args))]
        return [(a["arg_0"], a["arg_1"]) for a in args]
    return [(a[0], a[1]) for a in args]


def _gold(target: Any, choices: Sequence[str]) -> int:
    if isinstance(target, list):
        if len(target) != 1:
            raise ValueError(f"target {target} has several gold answers; calibration needs exactly one")
        target = target[0]
    if isinstance(target, str) and not target.strip().isdigit():
        if target not in choices:
            raise ValueError(f"target {target!r} is neither a choice index nor one of the choices")
        return choices.index(target)
    label = int(target)
    if not 0 <= label < len(choices):
        raise ValueError(f"target index {label} is out of range for {len(choices)} choices")
    return label


def choice_docs(
    samples: Sequence[Mapping[str, Any]], side: Mapping[tuple[str, int, int], Mapping[str, Any]], task: str,
    target_delimiter: str = " ",
) -> list[ChoiceDoc]:
    """Join a task's logged samples with the side file, request by request.

    A choice's text is its continuation without the leading ``target_delimiter``
    (harness's default " "), so its length is harness's ``len(choice)``. Each join
    checks the continuation and the context hash, so a side file of another run fails loudly.
    """
    docs, seen = [], set()
    for sample in samples:
        doc_id = int(sample["doc_id"])
        if doc_id in seen:  # one entry per filter; multiple-choice scores do not depend on it
            continue
        seen.add(doc_id)
        pairs = _arguments(sample)
        rows = []
        for idx, (context, continuation) in enumerate(pairs):
            record = side.get((task, doc_id, idx))
            if record is None:
                raise ValueError(f"the side file has no request ({task!r}, doc {doc_id}, choice {idx}): is it of this run?")
            if record.get("continuation") not in (None, continuation) or record.get("context_hash") not in (
                None, hashlib.sha256(context.encode("utf-8")).hexdigest()
            ):
                raise ValueError(f"side file and samples disagree on the text of ({task!r}, doc {doc_id}, choice {idx})")
            rows.append(record["sample_loglikelihoods"])
        choices = [c[len(target_delimiter):] if c.startswith(target_delimiter) else c for _, c in pairs]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"doc {doc_id} of {task!r} has choices with different numbers of samples")
        loglik = torch.tensor(rows, dtype=torch.float64).T
        lengths = torch.tensor([max(len(c), 1) for c in choices], dtype=torch.float64)
        docs.append(ChoiceDoc(doc_id, loglik, lengths, _gold(sample["target"], choices)))
    if not docs:
        raise ValueError(f"no logged samples for task {task!r}")
    return docs


def class_probabilities(docs: Sequence[ChoiceDoc], normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs (N, C), sample_probs (S, N, C), labels (N,))``: the mean over draws of each draw's softmax.

    ``normalize`` divides each log-likelihood by its choice's character length first
    (``acc_norm``). Docs with fewer than ``C`` (the widest doc's) choices get zero
    probability for the missing ones.
    """
    if not docs:
        raise ValueError("no docs to compute probabilities of")
    S = docs[0].loglik.shape[0]
    if any(d.loglik.shape[0] != S for d in docs):
        raise ValueError("docs have different numbers of posterior samples; were two runs mixed?")
    C = max(d.loglik.shape[1] for d in docs)
    sample_probs = torch.zeros(S, len(docs), C, dtype=torch.float64)
    for n, doc in enumerate(docs):
        scores = doc.loglik / doc.lengths if normalize else doc.loglik
        sample_probs[:, n, : scores.shape[1]] = torch.softmax(scores, dim=-1)
    labels = torch.tensor([d.label for d in docs])
    return sample_probs.mean(0), sample_probs, labels


def calibrate(
    samples: Sequence[str | Path], side_file: str | Path, map_samples: Optional[Sequence[str | Path]] = None,
    map_side_file: Optional[str | Path] = None, output: Optional[str | Path] = None, n_bins: int = 15,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {"posterior/acc": metrics, "posterior/acc_norm": ..., "map/acc": ...}}``; with ``output``, also
    ``calibration.json``, ``calibration.md`` and ``reliability_<task>.png`` there."""
    if (map_samples is None) != (map_side_file is None):
        raise ValueError("give both --map-samples and --map-side-file, or neither")
    runs = {"posterior": (find_sample_files(samples), read_side_file(side_file))}
    if map_samples is not None:
        runs["map"] = (find_sample_files(map_samples), read_side_file(map_side_file))
    table: dict[str, dict[str, dict[str, float]]] = {}
    curves: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for task in runs["posterior"][0]:
        table[task], curves[task] = {}, {}
        for run, (files, side) in runs.items():
            if task not in files:
                raise ValueError(f"the {run} run has no samples for task {task!r}")
            docs = choice_docs(_read_jsonl(files[task]), side, task)
            for variant in _VARIANTS:
                probs, sample_probs, labels = class_probabilities(docs, normalize=variant == "acc_norm")
                row = classification_metrics(probs, labels, n_bins=n_bins, sample_probs=sample_probs)
                row.update(num_samples=int(sample_probs.shape[0]), num_docs=len(docs))
                table[task][f"{run}/{variant}"] = row
                curves[task][f"{run} {variant}"] = (probs, labels)
    if output is not None:
        _write(Path(output), table, curves, n_bins)
    return table


def _write(folder: Path, table: Mapping[str, Any], curves: Mapping[str, Any], n_bins: int) -> None:
    from pyro_blora.experiments.plots import reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calibration.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    lines = ["| task | run | S | docs | ACC | ECE | MCE | NLL | Brier |", "|---|---|---|---|---|---|---|---|---|"]
    for task, rows in table.items():
        for name, m in rows.items():
            lines.append(
                f"| {task} | {name} | {m['num_samples']} | {m['num_docs']} | {100 * m['acc']:.2f} | "
                f"{100 * m['ece']:.2f} | {100 * m['mce']:.2f} | {m['nll']:.4f} | {m['brier']:.4f} |"
            )
        reliability_diagram(curves[task], n_bins=n_bins, path=folder / f"reliability_{task}.png")
    (folder / "calibration.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``pyro-blora-harness calibrate``: print the table and write it (and the diagrams) to ``--output``."""
    parser = argparse.ArgumentParser(prog="pyro-blora-harness calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", nargs="+", required=True, help="lm-eval --output_path folder(s) or samples_*.jsonl")
    parser.add_argument("--side-file", required=True, help="the harness model's side_file of the same run")
    parser.add_argument("--map-samples", nargs="+", help="samples of a posterior_mean=true,num_samples=1 run")
    parser.add_argument("--map-side-file", help="that run's side file")
    parser.add_argument("--output", help="folder for calibration.json, calibration.md and reliability_<task>.png")
    parser.add_argument("--n-bins", type=int, default=15, help="equal-width confidence bins of ECE/MCE")
    args = parser.parse_args(argv)
    try:
        table = calibrate(args.samples, args.side_file, args.map_samples, args.map_side_file, args.output, args.n_bins)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for task, rows in table.items():
        for name, m in rows.items():
            print(f"{task:<20} {name:<18} S={m['num_samples']:<3} acc={m['acc']:.4f} ece={m['ece']:.4f} "
                  f"mce={m['mce']:.4f} nll={m['nll']:.4f} brier={m['brier']:.4f}")
    return table
