"""pyro_blora.metrics against torchmetrics, direct formulas and hand-worked cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from pyro_blora import metrics as M


def _tm(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, float]:
    c = probs.shape[1]
    return {
        "acc": MulticlassAccuracy(num_classes=c, average="micro")(probs, labels).item(),
        "ece": MulticlassCalibrationError(num_classes=c, n_bins=n_bins, norm="l1")(probs, labels).item(),
        "mce": MulticlassCalibrationError(num_classes=c, n_bins=n_bins, norm="max")(probs, labels).item(),
    }


def _assert_matches_torchmetrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> None:
    ref = _tm(probs, labels, n_bins)
    assert M.accuracy(probs, labels) == pytest.approx(ref["acc"], abs=1e-6)
    assert M.expected_calibration_error(probs, labels, n_bins) == pytest.approx(ref["ece"], abs=1e-6)
    assert M.maximum_calibration_error(probs, labels, n_bins) == pytest.approx(ref["mce"], abs=1e-6)


def _random_case(seed: int, n: int, c: int, temperature: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(temperature * torch.randn(n, c, generator=g), dim=-1)
    return probs, torch.randint(0, c, (n,), generator=g)


# --------------------------------------------------------------------------- torchmetrics parity


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_random_inputs_match_torchmetrics(seed: int, n_bins: int) -> None:
    probs, labels = _random_case(seed, n=257, c=2 + seed)
    _assert_matches_torchmetrics(probs, labels, n_bins)


def test_float64_and_numpy_inputs_match_torchmetrics() -> None:
    probs, labels = _random_case(11, n=100, c=4)
    _assert_matches_torchmetrics(probs.double(), labels)
    ref = _tm(probs, labels, 15)
    assert M.expected_calibration_error(probs.numpy(), labels.numpy()) == pytest.approx(ref["ece"], abs=1e-6)
    assert M.accuracy(probs.numpy().tolist(), labels.tolist()) == pytest.approx(ref["acc"], abs=1e-6)


def test_all_predictions_right() -> None:
    probs, _ = _random_case(3, n=60, c=3)
    labels = probs.argmax(1)
    _assert_matches_torchmetrics(probs, labels)
    assert M.accuracy(probs, labels) == 1.0
    # One-hot predictions that are all right are perfectly calibrated.
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    _assert_matches_torchmetrics(onehot, labels)
    assert M.expected_calibration_error(onehot, labels) == 0.0


def test_everything_in_one_bin() -> None:
    conf = torch.linspace(0.70, 0.72, 40)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = (torch.arange(40) % 4 == 0).long()  # 75% predicted right
    _assert_matches_torchmetrics(probs, labels)
    expected = abs(0.75 - conf.double().mean().item())
    assert M.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    assert M.maximum_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)


def test_ties_in_confidence_and_argmax() -> None:
    # Equal class probabilities (argmax ties) and repeated confidences.
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.3, 0.7], [0.7, 0.3], [0.7, 0.3], [1 / 3, 2 / 3]])
    labels = torch.tensor([0, 1, 1, 1, 0, 0])
    _assert_matches_torchmetrics(probs, labels)
    _assert_matches_torchmetrics(torch.full((5, 4), 0.25), torch.tensor([0, 1, 2, 3, 0]))


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_confidences_on_bin_edges_and_exactly_one(n_bins: int) -> None:
    conf = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0, 1.0, 1.0, 0.6, 0.8])
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.tensor([0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    _assert_matches_torchmetrics(probs, labels, n_bins)


@pytest.mark.parametrize("label", [0, 1, 2])
def test_single_example(label: int) -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    labels = torch.tensor([label])
    _assert_matches_torchmetrics(probs, labels)
    right = float(label == 1)
    assert M.expected_calibration_error(probs, labels) == pytest.approx(abs(right - 0.5))


def test_two_classes() -> None:
    probs, labels = _random_case(7, n=500, c=2, temperature=1.0)
    _assert_matches_torchmetrics(probs, labels)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    c=st.integers(2, 5),
    n_bins=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.0, 0.5, 5.0, 60.0]),
)
def test_property_matches_torchmetrics(n: int, c: int, n_bins: int, seed: int, temperature: float) -> None:
    probs, labels = _random_case(seed, n, c, temperature)
    _assert_matches_torchmetrics(probs, labels, n_bins)


# --------------------------------------------------------------------------- NLL / Brier


def test_nll_and_brier_match_direct_formulas() -> None:
    probs, labels = _random_case(5, n=50, c=4)
    p, y = probs.double().tolist(), labels.tolist()
    nll = -sum(math.log(row[t]) for row, t in zip(p, y)) / len(y)
    brier = sum(sum((pc - (c == t)) ** 2 for c, pc in enumerate(row)) for row, t in zip(p, y)) / len(y)
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(nll, rel=1e-6)
    assert M.brier_score(probs, labels) == pytest.approx(brier, rel=1e-6)


def test_nll_clamps_zero_probability_and_brier_extremes() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 1])
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(-math.log(M.NLL_EPS) / 2)
    assert math.isfinite(M.negative_log_likelihood(probs, labels))
    assert M.brier_score(probs, labels) == pytest.approx(1.0)  # one perfectly wrong (2), one right (0)
    assert M.brier_score(probs, torch.tensor([0, 1])) == 0.0


# --------------------------------------------------------------------------- uncertainty


def test_mutual_information_zero_when_samples_agree() -> None:
    probs, _ = _random_case(2, n=30, c=5)
    out = M.uncertainty_decomposition(probs.expand(8, -1, -1))
    assert out["mutual_information"].shape == (30,)
    # Exactly 0 up to float64 round-off in the mean of identical rows.
    assert torch.all(out["mutual_information"] >= 0)
    assert torch.allclose(out["mutual_information"], torch.zeros(30, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out["predictive_entropy"], out["expected_entropy"])
    assert torch.allclose(out["predictive_entropy"], M.entropy(probs))


def test_mutual_information_positive_when_samples_disagree() -> None:
    # Two confident samples that disagree: total = log 2, aleatoric = 0, so MI = log 2.
    sample_probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = M.uncertainty_decomposition(sample_probs)
    assert out["mutual_information"].item() == pytest.approx(math.log(2))
    assert out["expected_entropy"].item() == 0.0

    s = torch.softmax(4 * torch.randn(16, 20, 3, generator=torch.Generator().manual_seed(0)), -1)
    out = M.uncertainty_decomposition(s)
    assert torch.all(out["mutual_information"] > 0)
    assert torch.allclose(out["predictive_entropy"], out["expected_entropy"] + out["mutual_information"])
    assert torch.all(out["predictive_entropy"] <= math.log(3) + 1e-12)


# --------------------------------------------------------------------------- AUROC


def _auroc_bruteforce(s_in: list[float], s_out: list[float]) -> float:
    wins = sum((o > i) + 0.5 * (o == i) for i in s_in for o in s_out)
    return wins / (len(s_in) * len(s_out))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pairwise_count_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randint(0, 6, (37,), generator=g).float()  # few distinct values: many ties
    s_out = torch.randint(2, 9, (23,), generator=g).float()
    assert M.ood_auroc(s_in, s_out) == pytest.approx(_auroc_bruteforce(s_in.tolist(), s_out.tolist()), abs=1e-12)
    s_in, s_out = torch.randn(50, generator=g), torch.randn(41, generator=g) + 0.7
    assert M.ood_auroc(s_in, s_out) == pytest.approx(_auroc_bruteforce(s_in.tolist(), s_out.tolist()), abs=1e-12)


def test_auroc_edge_cases() -> None:
    assert M.ood_auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert M.ood_auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert M.ood_auroc([0.4, 0.4, 0.4], [0.4, 0.4]) == 0.5
    assert M.ood_auroc(np.array([1]), np.array([2])) == 1.0


# --------------------------------------------------------------------------- bins / risk-coverage


def test_calibration_bins_reconstruct_ece() -> None:
    probs, labels = _random_case(9, n=300, c=3)
    bins = M.calibration_bins(probs, labels, n_bins=10)
    assert bins["bin_edges"].shape == (11,) and bins["count"].shape == (10,)
    assert int(bins["count"].sum()) == 300 and bins["count"].dtype == torch.int64
    gap = ((bins["accuracy"] - bins["confidence"]).abs() * bins["count"]).sum() / 300
    assert gap.item() == pytest.approx(M.expected_calibration_error(probs, labels, 10), abs=1e-9)


def test_calibration_bins_puts_confidence_one_in_last_bin() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0]])
    bins = M.calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=5)
    assert bins["count"].tolist() == [0, 0, 0, 0, 3]
    assert bins["accuracy"][-1].item() == pytest.approx(2 / 3)
    assert bins["confidence"][-1].item() == pytest.approx((1 + 0.95 + 1) / 3)


def test_risk_coverage_hand_example() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 0, 0])  # sorted by confidence: right, wrong, right, wrong
    rc = M.risk_coverage(probs, labels)
    assert rc["coverage"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert rc["accuracy"].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert M.area_under_risk_coverage(probs, labels) == pytest.approx(np.mean([0, 0.5, 1 / 3, 0.5]))


def test_risk_coverage_ties_do_not_depend_on_order() -> None:
    probs = torch.tensor([[0.9, 0.1]] + [[0.7, 0.3]] * 4)
    a = M.risk_coverage(probs, torch.tensor([0, 0, 0, 1, 1]))["accuracy"]
    b = M.risk_coverage(probs, torch.tensor([0, 1, 1, 0, 0]))["accuracy"]
    assert torch.allclose(a, b)
    assert a.tolist() == pytest.approx([1.0, 0.75, 2 / 3, 0.625, 0.6])
    allright = M.risk_coverage(probs, torch.zeros(5, dtype=torch.long))
    assert torch.all(allright["accuracy"] == 1)


# --------------------------------------------------------------------------- summary


def test_classification_metrics_is_json_ready() -> None:
    s = torch.softmax(2 * torch.randn(10, 40, 3, generator=torch.Generator().manual_seed(1)), -1)
    probs, labels = s.mean(0), torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
    out = M.classification_metrics(probs, labels, sample_probs=s)
    assert set(out) == {"acc", "ece", "mce", "nll", "brier", "predictive_entropy", "expected_entropy",
                        "mutual_information"}
    assert all(type(v) is float for v in out.values())
    json.dumps(out)
    assert out["ece"] == pytest.approx(_tm(probs, labels, 15)["ece"], abs=1e-6)
    assert set(M.classification_metrics(probs, labels)) == {"acc", "ece", "mce", "nll", "brier"}
    with pytest.raises(ValueError, match="mismatched shapes"):
        M.classification_metrics(probs, labels, sample_probs=s[:, :10])


# --------------------------------------------------------------------------- validation

_GOOD = torch.tensor([[0.7, 0.3], [0.4, 0.6]])


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (_GOOD, torch.tensor([0, 1, 1]), "mismatched lengths"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
        (_GOOD, torch.tensor([0, 2]), r"labels out of range.*\[0, 1\]"),
        (_GOOD, torch.tensor([0, -1]), "labels out of range"),
        (_GOOD, torch.tensor([0.0, 0.5]), "integer class indices"),
        (torch.tensor([[0.7, 0.4], [0.4, 0.6]]), torch.tensor([0, 1]), "must sum to 1"),
        (torch.tensor([[2.0, -1.0], [0.4, 0.6]]), torch.tensor([0, 1]), "non-negative"),
        (torch.tensor([[float("nan"), 1.0], [0.4, 0.6]]), torch.tensor([0, 1]), "NaN"),
        (torch.tensor([0.7, 0.3]), torch.tensor([0]), r"2-D \(N, C\)"),
        (_GOOD, torch.tensor([[0, 1]]), "1-D"),
    ],
)
def test_validation_errors(probs, labels, match: str) -> None:
    for fn in (M.accuracy, M.expected_calibration_error, M.maximum_calibration_error,
               M.negative_log_likelihood, M.brier_score, M.calibration_bins, M.risk_coverage,
               M.classification_metrics):
        with pytest.raises(ValueError, match=match):
            fn(probs, labels)


def test_validation_accepts_integral_float_labels_and_rejects_bad_bins() -> None:
    assert M.accuracy(_GOOD, torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.expected_calibration_error(_GOOD, torch.tensor([0, 1]), n_bins=0)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.calibration_bins(_GOOD, torch.tensor([0, 1]), n_bins=2.5)  # type: ignore[arg-type]


def test_validation_errors_for_samples_and_scores() -> None:
    with pytest.raises(ValueError, match=r"3-D \(S, N, C\)"):
        M.uncertainty_decomposition(_GOOD)
    with pytest.raises(ValueError, match="must sum to 1"):
        M.uncertainty_decomposition(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="sample_probs is empty"):
        M.uncertainty_decomposition(torch.zeros(2, 0, 3))
    with pytest.raises(ValueError, match="scores_in is empty"):
        M.ood_auroc([], [0.1])
    with pytest.raises(ValueError, match="scores_out is empty"):
        M.ood_auroc([0.1], [])
    with pytest.raises(ValueError, match="scores_out must be 1-D"):
        M.ood_auroc([0.1], [[0.2]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.ood_auroc([0.1, float("inf")], [0.2])
