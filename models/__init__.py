"""Bayesian-LoRA layers as Pyro models (``pyro_blora.models``).

* :mod:`.priors`: priors over the inducing matrix U (``"gp"``, ``"normal"``, yours);
* :mod:`.conditional`: the distribution of a LoRA factor given U, with its closed-form KL;
* :mod:`.geometry`: the kernel algebra shared by both;
* :mod:`.layer`: the adapted linear layer.
"""

from .conditional import InducingConditional
from .geometry import CholeskyError, InducingGeometry, robust_cholesky
from .layer import BayesianLoRALinear, InducingFactor, linear_shape
from .priors import PRIORS, GPPrior, InducingPrior, NormalPrior, build_prior, shared_geometry

__all__ = [
    "PRIORS",
    "BayesianLoRALinear",
    "CholeskyError",
    "GPPrior",
    "InducingConditional",
    "InducingFactor",
    "InducingGeometry",
    "InducingPrior",
    "NormalPrior",
    "build_prior",
    "linear_shape",
    "robust_cholesky",
    "shared_geometry",
]
