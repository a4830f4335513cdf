"""The options of each guide family, as the typed records ``pyro_blora.fit(guide=..., guide_options=...)`` takes.

Each is a frozen dataclass whose fields are the family's keyword arguments
(plus ``zero_init_b`` of :class:`~pyro_blora.guides.BayesianLoRAGuide`); the
help text of a field is in its metadata, which the command line lists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .base import init_scale_check

__all__ = ["DeltaOptions", "FlowOptions", "MultivariateNormalOptions", "NormalOptions", "changed_options"]


@dataclass(frozen=True)
class DeltaOptions:
    """MAP (plain LoRA): a point mass q(U)."""

    zero_init_b: bool = field(default=True, metadata={"help": "Start every B factor at zero, as LoRA does."})


@dataclass(frozen=True)
class NormalOptions(DeltaOptions):
    """Mean-field Gaussian q(U_w) with sd ``scale_max * sigmoid(rho)``."""

    scale_init: float = field(default=1e-3, metadata={"help": "Initial sd of q(U_w)."})
    scale_max: float = field(default=0.1, metadata={"help": "Cap of the sd of q(U_w) (paper: 0.1)."})

    def __post_init__(self) -> None:
        init_scale_check(self.scale_init, self.scale_max)


@dataclass(frozen=True)
class MultivariateNormalOptions(NormalOptions):
    """Full-covariance (or low-rank plus diagonal) Gaussian q(U_w)."""

    rank: Optional[int] = field(default=None, metadata={"help": "Rank of the covariance factor (None: full)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")


@dataclass(frozen=True)
class FlowOptions(NormalOptions):
    """A normalizing flow of Pyro transforms over a Gaussian base."""

    transforms: Sequence[Any] = field(
        default=("affine_autoregressive",),
        metadata={"help": "Chain of transforms: names (affine_autoregressive, affine_coupling, spline_coupling, "
                          "spline_autoregressive, neural_autoregressive, planar, radial) or factories."},
    )
    hidden_dims: Optional[Sequence[int]] = field(default=None, metadata={"help": "Hidden widths of each transform's network."})
    rowwise: bool = field(default=True, metadata={"help": "Apply the flow to each row of U_w (the paper's MAF)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        transforms = [self.transforms] if isinstance(self.transforms, str) else list(self.transforms)
        if not transforms:
            raise ValueError("transforms is empty: name at least one flow transform")


def changed_options(options: Any) -> dict[str, Any]:
    """The fields of an options record that differ from their defaults: what a saved guide spec records."""
    out = {}
    for spec in dataclasses.fields(options):
        value = getattr(options, spec.name)
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
        same = value == default or (
            isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)) and list(value) == list(default)
        )
        if not same:
            out[spec.name] = value
    return out
