"""``"blob"``: BLoB's mean-field Gaussian over every Bayesian LoRA ``A``.

.. math::

    q(A) = \\mathcal N\\big(M, \\operatorname{diag}(G \\circ G)^2\\big), \\qquad
    \\mathrm{KL}\\big(q \\,\\|\\, \\mathcal N(0, \\sigma_p^2)\\big)
      = \\sum_{ij} \\log\\frac{\\sigma_p}{G_{ij}^2} + \\frac{G_{ij}^4 + M_{ij}^2}{2\\sigma_p^2} - \\frac12,

the parameterisation of BLoB (Wang et al., NeurIPS 2024: posterior sd ``Omega = G o G``,
``--bayes-eps > 0`` in its code, github.com/Wang-ML-Lab/bayesian-peft,
``modelwrappers/blob.py``), with ``G`` initialised uniformly in
``[eps / sqrt(2), eps]`` (its ``_wrap_lora_layer``; ``eps = 0.05``). Both
distributions are Gaussian, so ``TraceMeanField_ELBO`` uses the closed-form KL.

The mean ``M`` is the layer's ``lora_A_weight`` (:class:`~pyro_blora.models.BLoBLinear`),
read here as :class:`~pyro_blora.guides.BayesianLoRAGuide`'s ``q(W | U)`` reads the
model's inducing inputs: the guide owns only ``G``. ``G`` is an unconstrained scale
parameter, named ``lora_A_rho`` as in BLoB's code; the ``*_rho`` suffix puts it in
``fit``'s group of posterior scales (learning rate times ``variance_lr_multiplier``,
no weight decay, which would pull the posterior width to zero).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

__all__ = ["BLoBGuide", "BLoBSite"]


def _key(site_name: str) -> str:
    # nn.ModuleDict keys cannot contain dots.
    return site_name.replace(".", "__")


class BLoBSite(nn.Module):
    """``G`` of one layer's ``q(A)``: ``sd = G o G``, ``G ~ U(eps / sqrt(2), eps)`` at the start."""

    def __init__(self, shape: tuple[int, int], init_eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        rho = torch.empty(shape, dtype=dtype, device=device).uniform_(init_eps / math.sqrt(2), init_eps)
        self.lora_A_rho = nn.Parameter(rho)

    def scale(self) -> Tensor:
        """The posterior sd ``G o G`` of every entry of ``A``."""
        return self.lora_A_rho * self.lora_A_rho


class BLoBGuide(nn.Module):
    """``q(A) = prod_layers N(M, (G o G)^2)`` over the ``A`` site of every BLoB layer.

    Args:
        layers: the :class:`~pyro_blora.models.BLoBLinear` layers, in the model's sampling order.
        init_eps: BLoB's ``eps``: ``G`` starts uniform in ``[eps / sqrt(2), eps]``,
            so the posterior sd starts in ``[eps^2 / 2, eps^2]``.
    """

    family_name = "blob"

    def __init__(self, layers: Iterable[Any], init_eps: float = 0.05):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("BLoBGuide needs at least one BLoB layer; check target_modules / bayesian_modules")
        if not (isinstance(init_eps, (int, float)) and not isinstance(init_eps, bool) and init_eps > 0):
            raise ValueError(f"BLoB's init_eps must be a positive number (G starts in [eps/sqrt(2), eps]), got {init_eps!r}")
        self.init_eps = float(init_eps)
        self.sites = nn.ModuleDict()
        for layer in layers:
            loc = layer.lora_A_weight
            self.sites[_key(layer.site_w)] = BLoBSite(tuple(loc.shape), self.init_eps, loc.dtype, loc.device)
        # A plain list: M and B belong to the model's layers, not to the guide.
        self._layers = layers

    def site(self, layer: Any) -> BLoBSite:
        return self.sites[_key(layer.site_w)]

    def distribution(self, layer: Any) -> dist.Distribution:
        """``q(A)`` of ``layer``, event shape ``(r, d_in)``."""
        return dist.Normal(layer.lora_A_weight, self.site(layer).scale()).to_event(2)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every ``A`` site; return the draws by site name."""
        return {layer.site_w: pyro.sample(layer.site_w, self.distribution(layer)) for layer in self._layers}

    @torch.no_grad()
    def mean_weights(self, num_samples: int = 256) -> dict[str, Tensor]:
        """``E_q[A] = M`` per site (exact; ``num_samples`` is accepted for the common guide surface)."""
        return {layer.site_w: layer.lora_A_weight.detach() for layer in self._layers}

    @torch.no_grad()
    def sample_inducing(self, num_samples: int) -> dict[str, Tensor]:
        """BLoB has no inducing matrices: an empty dict (for code that plots ``q(U)`` of any guide)."""
        return {}

    def spec(self) -> Mapping[str, Any]:
        """JSON description used to rebuild the layers and the guide on load."""
        first = self._layers[0]
        return {
            "family": self.family_name,
            "options": {"prior_std": first.prior_std, "init_eps": self.init_eps, "flipout": first.flipout},
        }
