"""Calibration and uncertainty metrics on Monte-Carlo-averaged class probabilities.

Every function takes the *predictive* class probabilities of a Bayesian model,
i.e. the Monte-Carlo average over posterior samples
``p(y | x) ~= (1/S) sum_s p(y | x, theta_s)``, as an ``(N, C)`` array, together
with integer gold labels ``(N,)``. Inputs may be torch tensors, numpy arrays or
nested lists; they are validated and converted to ``float64`` tensors.

The binned calibration errors follow ``torchmetrics``'
``MulticlassCalibrationError`` to the bit, because that is what the
Laplace-LoRA, BLoB and Bayesian-LoRA papers report; see
:func:`expected_calibration_error` for the exact binning convention.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ArrayLike",
    "accuracy",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "brier_score",
    "entropy",
    "uncertainty_decomposition",
    "ood_auroc",
    "calibration_bins",
    "risk_coverage",
    "area_under_risk_coverage",
    "classification_metrics",
]

ArrayLike = Union[Tensor, np.ndarray, Sequence]

#: Tolerance on ``|sum_c p_c - 1|`` per row; loose enough for float16/bfloat16 softmax.
SUM_TOLERANCE = 1e-3
#: Floor on the gold-class probability in the NLL, so a confidently wrong
#: prediction costs ``-log(1e-12) ~= 27.6`` nats instead of ``inf``.
NLL_EPS = 1e-12


# --------------------------------------------------------------------------- validation


def _to_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} could not be converted to an array: {err}") from err


def _check_prob_rows(p: Tensor, name: str) -> Tensor:
    """Validate that the last axis of ``p`` holds probability vectors; return float64."""
    if p.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {p.dtype}")
    p = p.to(torch.float64)
    if p.numel() == 0:
        raise ValueError(f"{name} is empty; need at least one example and one class")
    if not torch.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lowest = p.min().item()
    if lowest < 0:
        raise ValueError(f"{name} must be non-negative probabilities; found {lowest:.3g}")
    dev = (p.sum(-1) - 1.0).abs()
    worst = dev.max().item()
    if worst > SUM_TOLERANCE:
        where = np.unravel_index(int(dev.argmax()), tuple(dev.shape))
        total = float(p.sum(-1)[where])
        raise ValueError(
            f"rows of {name} must sum to 1 (tolerance {SUM_TOLERANCE:g}); row {tuple(map(int, where))} "
            f"sums to {total:.6g} -- pass softmax probabilities, not logits"
        )
    return p


def _check_labels(y: ArrayLike, n: int, num_classes: int) -> Tensor:
    t = _to_tensor(y, "labels")
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("labels is empty; need at least one example")
    if t.numel() != n:
        raise ValueError(f"mismatched lengths: probs has {n} rows but labels has {t.numel()} entries")
    if t.is_floating_point():
        # Integral floats (e.g. labels round-tripped through JSON/numpy) are fine.
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise ValueError("labels must be integer class indices, got non-integer values")
    elif t.is_complex():
        raise ValueError("labels must be integer class indices, got complex values")
    t = t.to(torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels out of range: must lie in [0, {num_classes - 1}], got min {lo} and max {hi}")
    return t


def _check(probs: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    p = _to_tensor(probs, "probs")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {tuple(p.shape)}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs is empty (shape {tuple(p.shape)}); need at least one example and one class")
    p = _check_prob_rows(p, "probs")
    return p, _check_labels(labels, p.shape[0], p.shape[1])


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _check_samples(sample_probs: ArrayLike) -> Tensor:
    p = _to_tensor(sample_probs, "sample_probs")
    if p.ndim != 3:
        raise ValueError(f"sample_probs must be 3-D (S, N, C), got shape {tuple(p.shape)}")
    return _check_prob_rows(p, "sample_probs")


# --------------------------------------------------------------------------- point metrics


def _top1(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    # torch.max picks the first maximal class on ties, as torchmetrics does.
    conf, pred = p.max(dim=1)
    return conf, (pred == y).to(torch.float64)


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Top-1 accuracy :math:`\frac1N\sum_i \mathbb 1[\arg\max_c p_{ic} = y_i]`.

    Ties in the arg-max go to the lowest class index (torch/torchmetrics convention).
    """
    p, y = _check(probs, labels)
    return float(_top1(p, y)[1].mean())


def _bin_slots(conf: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot (count, mean confidence, accuracy) with torchmetrics' slot assignment.

    Slot ``b < n_bins`` holds confidences in ``[b/n, (b+1)/n)``; slot ``n_bins``
    holds confidences exactly equal to 1. Membership is decided in float32 with a
    float32 ``linspace`` because that is what torchmetrics does: a float64
    decision would move values that sit on a bin edge and change published numbers.
    """
    edges32 = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    idx = torch.bucketize(conf.to(torch.float32), edges32, right=True) - 1
    count = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, correct)
    safe = count.clamp_min(1)  # empty slots report 0, not NaN, like torchmetrics
    return count, conf_sum / safe, acc_sum / safe


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    r"""Expected calibration error of the top-1 prediction (L1 norm).

    With confidence :math:`\hat p_i = \max_c p_{ic}` and correctness
    :math:`a_i = \mathbb 1[\arg\max_c p_{ic} = y_i]`, predictions are grouped in
    equal-width bins :math:`B_b` and

    .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{N}
              \Big| \frac{1}{|B_b|}\sum_{i\in B_b} a_i - \frac{1}{|B_b|}\sum_{i\in B_b}\hat p_i \Big|.

    Binning is identical to ``torchmetrics.classification.MulticlassCalibrationError``
    (v1.x): bin :math:`b` is the half-open interval :math:`[b/n, (b+1)/n)`, so 0
    falls in the first bin and a value on an inner edge goes to the bin above it,
    and confidences of exactly 1 form their own extra group (they are weighted
    separately rather than merged into the last bin).
    """
    p, y = _check(probs, labels)
    count, conf, acc = _bin_slots(*_top1(p, y), _check_n_bins(n_bins))
    return float(((acc - conf).abs() * count).sum() / count.sum())


def maximum_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    r"""Maximum calibration error :math:`\max_b |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`.

    Same bins as :func:`expected_calibration_error`; empty bins contribute 0, as in
    ``MulticlassCalibrationError(norm="max")``.
    """
    p, y = _check(probs, labels)
    _, conf, acc = _bin_slots(*_top1(p, y), _check_n_bins(n_bins))
    return float((acc - conf).abs().max())


def negative_log_likelihood(probs: ArrayLike, labels: ArrayLike, eps: float = NLL_EPS) -> float:
    r"""Mean negative log predictive likelihood :math:`-\frac1N\sum_i \log \max(p_{i,y_i}, \epsilon)`.

    ``eps`` (default ``1e-12``) keeps a single confidently wrong prediction from
    making the mean infinite; it only matters when :math:`p_{i,y_i} < 10^{-12}`.
    """
    p, y = _check(probs, labels)
    gold = p.gather(1, y[:, None]).squeeze(1)
    return float(-gold.clamp_min(eps).log().mean())


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Multi-class Brier score :math:`\frac1N\sum_i\sum_c (p_{ic} - \mathbb 1[c = y_i])^2` (range [0, 2])."""
    p, y = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return float(((p - onehot) ** 2).sum(1).mean())


# --------------------------------------------------------------------------- uncertainty


def entropy(probs: ArrayLike) -> Tensor:
    r"""Shannon entropy in nats along the last axis, :math:`-\sum_c p_c\log p_c` with :math:`0\log 0 = 0`."""
    p = _check_prob_rows(_to_tensor(probs, "probs"), "probs")
    return -torch.special.xlogy(p, p).sum(-1)


def uncertainty_decomposition(sample_probs: ArrayLike) -> dict[str, Tensor]:
    r"""Split predictive uncertainty into aleatoric and epistemic parts (in nats).

    For posterior samples :math:`p_s = p(y\mid x,\theta_s)`, :math:`s=1..S`:

    * ``predictive_entropy`` (total) :math:`\mathbb H[\bar p]` with :math:`\bar p = \frac1S\sum_s p_s`;
    * ``expected_entropy`` (aleatoric) :math:`\frac1S\sum_s \mathbb H[p_s]`;
    * ``mutual_information`` (epistemic) :math:`\mathbb I[y;\theta] = \mathbb H[\bar p] - \frac1S\sum_s\mathbb H[p_s]`.

    By concavity of entropy the mutual information is non-negative; it is clamped
    at 0 so that round-off never reports a tiny negative disagreement.

    Args:
        sample_probs: ``(S, N, C)`` class probabilities, one slice per posterior sample.

    Returns:
        dict of ``(N,)`` float64 tensors.
    """
    p = _check_samples(sample_probs)
    mean = p.mean(0)
    total = -torch.special.xlogy(mean, mean).sum(-1)
    aleatoric = (-torch.special.xlogy(p, p).sum(-1)).mean(0)
    return {
        "predictive_entropy": total,
        "expected_entropy": aleatoric,
        "mutual_information": (total - aleatoric).clamp_min(0.0),
    }


def ood_auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""AUROC of telling out-of-distribution inputs from in-distribution ones.

    A higher score (e.g. predictive entropy or mutual information) must mean
    "more likely OOD". Using the Mann-Whitney statistic,

    .. math:: \mathrm{AUROC} = \frac{1}{n_\mathrm{in} n_\mathrm{out}}\sum_{i,j}
              \big(\mathbb 1[s^\mathrm{out}_j > s^\mathrm{in}_i] + \tfrac12\mathbb 1[s^\mathrm{out}_j = s^\mathrm{in}_i]\big),

    computed in :math:`O(n\log n)` from mid-ranks (tied scores share their average rank).
    0.5 is chance, 1.0 perfect separation.
    """
    s_in = _to_tensor(scores_in, "scores_in")
    s_out = _to_tensor(scores_out, "scores_out")
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if s.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}")
        if s.numel() == 0:
            raise ValueError(f"{name} is empty; need at least one score")
        if s.dtype == torch.bool or s.is_complex():
            raise ValueError(f"{name} must be real-valued scores, got dtype {s.dtype}")
        if not torch.isfinite(s.to(torch.float64)).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    s_in, s_out = s_in.to(torch.float64), s_out.to(torch.float64)
    n_in, n_out = s_in.numel(), s_out.numel()
    _, inverse, counts = torch.unique(torch.cat([s_in, s_out]), sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    # Ranks are 1-based; a tie group occupying ranks start+1..start+k gets start + (k+1)/2.
    midrank = counts.cumsum(0) - counts + (counts + 1) / 2
    rank_sum_out = midrank[inverse[n_in:]].sum()
    u_out = rank_sum_out - n_out * (n_out + 1) / 2
    return float(u_out / (n_in * n_out))


# --------------------------------------------------------------------------- curves


def calibration_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, Tensor]:
    """Per-bin statistics for a reliability diagram.

    Uses the bins of :func:`expected_calibration_error` except that the
    "confidence exactly 1" group is folded into the last bin, which therefore
    covers the closed interval ``[(n-1)/n, 1]``. Hence
    ``sum(count * |accuracy - confidence|) / N`` equals the ECE whenever no
    prediction has confidence exactly 1.

    Returns:
        ``bin_edges`` ``(n_bins + 1,)``, and per bin ``confidence`` (mean top-1
        confidence), ``accuracy`` (fraction correct) and ``count`` (int64); empty
        bins report confidence and accuracy 0.
    """
    p, y = _check(probs, labels)
    n_bins = _check_n_bins(n_bins)
    count, conf, acc = _bin_slots(*_top1(p, y), n_bins)
    conf_sum, acc_sum = conf * count, acc * count
    count = torch.cat([count[:-2], count[-2:].sum(0, keepdim=True)])
    conf_sum = torch.cat([conf_sum[:-2], conf_sum[-2:].sum(0, keepdim=True)])
    acc_sum = torch.cat([acc_sum[:-2], acc_sum[-2:].sum(0, keepdim=True)])
    safe = count.clamp_min(1)
    return {
        "bin_edges": torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
        "confidence": conf_sum / safe,
        "accuracy": acc_sum / safe,
        "count": count.round().to(torch.int64),
    }


def risk_coverage(probs: ArrayLike, labels: ArrayLike) -> dict[str, Tensor]:
    r"""Selective-prediction curve: accuracy on the ``k`` most confident examples.

    Examples are sorted by top-1 confidence, highest first; for :math:`k = 1..N`,
    ``coverage[k-1] = k/N`` and ``accuracy[k-1]`` is the accuracy of the first
    :math:`k`. When a cut falls inside a group of equal confidences the group's
    members are interchangeable, so the curve uses the expected accuracy over
    orderings of the group (its correct count pro rata) instead of an arbitrary
    sort order.
    """
    p, y = _check(probs, labels)
    conf, correct = _top1(p, y)
    conf, order = torch.sort(conf, descending=True, stable=True)
    correct = correct[order]
    _, group, size = torch.unique_consecutive(conf, return_inverse=True, return_counts=True)
    group_correct = torch.zeros(size.numel(), dtype=torch.float64).index_add_(0, group, correct)
    size = size.to(torch.float64)
    start = size.cumsum(0) - size
    correct_before = group_correct.cumsum(0) - group_correct
    k = torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    cum_correct = correct_before[group] + (k - start[group]) * group_correct[group] / size[group]
    return {"coverage": k / conf.numel(), "accuracy": cum_correct / k}


def area_under_risk_coverage(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""AURC: mean selective risk :math:`\frac1N\sum_{k=1}^N (1 - \mathrm{acc}_k)` over coverages ``k/N``.

    Lower is better; it rewards models whose confidence ranks their correct
    predictions first (Geifman et al., 2019).
    """
    return float((1.0 - risk_coverage(probs, labels)["accuracy"]).mean())


def classification_metrics(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    sample_probs: ArrayLike | None = None,
) -> dict[str, float]:
    """The standard table row: ``acc``, ``ece``, ``mce``, ``nll`` and ``brier``.

    When ``sample_probs`` ``(S, N, C)`` is given, also the means over examples of
    ``predictive_entropy``, ``expected_entropy`` and ``mutual_information``
    (see :func:`uncertainty_decomposition`). All values are plain Python floats,
    so the dict can go straight into ``json.dump``.
    """
    p, y = _check(probs, labels)
    out = {
        "acc": accuracy(p, y),
        "ece": expected_calibration_error(p, y, n_bins),
        "mce": maximum_calibration_error(p, y, n_bins),
        "nll": negative_log_likelihood(p, y),
        "brier": brier_score(p, y),
    }
    if sample_probs is not None:
        s = _check_samples(sample_probs)
        if tuple(s.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"mismatched shapes: sample_probs is {tuple(s.shape)} but probs is {tuple(p.shape)}; "
                "expected (S, N, C) with the same N and C"
            )
        for key, value in uncertainty_decomposition(s).items():
            out[key] = float(value.mean())
    return out
