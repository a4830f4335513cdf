"""Variational families for the inducing matrices of Bayesian-LoRA (``pyro_blora.guides``).

``GUIDES`` maps names to families: ``"flow"`` (default), ``"normal"``, ``"mvn"``,
``"delta"`` (MAP, plain LoRA). Pass a name, a subclass of :class:`InducingGuide`,
or a ``factory(site) -> InducingGuide`` to :func:`pyro_blora.fit`.
"""

from .base import InducingGuide, InducingSite
from .delta import DeltaGuide
from .flow import FLOW_TRANSFORMS, FlowGuide
from .mvn import MultivariateNormalGuide
from .network import GUIDES, BayesianLoRAGuide, guide_factory
from .normal import NormalGuide

__all__ = [
    "GUIDES",
    "FLOW_TRANSFORMS",
    "BayesianLoRAGuide",
    "DeltaGuide",
    "FlowGuide",
    "InducingGuide",
    "InducingSite",
    "MultivariateNormalGuide",
    "NormalGuide",
    "guide_factory",
]
