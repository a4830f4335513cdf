"""The BLoB layer: a frozen linear layer plus ``(alpha / r) B A x`` with a Gaussian ``A`` and a point ``B``.

BLoB (Wang, Shi, Han, Metaxas, Wang, "BLoB: Bayesian Low-Rank Adaptation by
Backpropagation for Large Language Models", NeurIPS 2024, arXiv 2406.11675;
code: github.com/Wang-ML-Lab/bayesian-peft, ``modelwrappers/blob.py``) makes only
LoRA's ``A`` Bayesian ("asymmetric Bayesianization"). As a Pyro model::

    {layer}.lora_A.W = A ~ N(0, sigma_p^2 I)        (r x d_in, one site per layer)
    B                     a parameter, no prior      (d_out x r, zero at the start)
    y = W0 x + (alpha / r) B A dropout(x)

with ``sigma_p`` BLoB's ``--bayes-beta`` (0.2 in its scripts). The variational
posterior ``q(A) = N(M, diag(G o G)^2)`` is :class:`pyro_blora.guides.BLoBGuide`;
its mean ``M`` is this layer's ``lora_A_weight`` (BLoB's code keeps ``M`` in peft's
``lora_A.weight``), so ``M`` and ``B`` start as peft's LoRA (Kaiming-uniform ``M``,
zero ``B``) and a posterior-mean export is a plain LoRA adapter.

Flipout (Wen et al., ICLR 2018), in training only: with the guide's draw
``A = M + Delta`` shared by the batch, example ``n`` uses
``A_n = M + Delta o (s_n r_n^T)`` with independent random signs ``r_n`` (``d_in``)
and ``s_n`` (``r``)::

    x_n A_n^T = x_n M^T + ((x_n o r_n) Delta^T) o s_n.

Each ``A_n`` has the marginal ``q(A)`` (a sign flip leaves a zero-mean Gaussian
unchanged) but the examples' perturbations are nearly uncorrelated, which lowers
the variance of the gradient at the cost of two extra products. BLoB flips per
token (every row of a ``(batch, seq, d)`` input); we flip per example (one weight
draw per sequence, broadcast over the middle dims), which is the model the ELBO
describes. At prediction (``eval`` mode) every example of posterior sample ``s``
uses the same draw ``A_s``, as the other methods of this package do; BLoB's
evaluation keeps flipping, which changes the correlation between examples but not
any example's predictive distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_blora.models.layer import BayesianLoRALinear

if TYPE_CHECKING:
    from pyro_blora.config import BLoRAConfig

__all__ = ["BLoBLinear", "flipout_project", "random_signs"]


def random_signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Independent uniform ``{-1, +1}`` entries of ``shape`` (dtype and device of ``like``)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(0.5).mul_(2).sub_(1)


def flipout_project(h: Tensor, loc: Tensor, sample: Tensor) -> Tensor:
    """``h_n A_n^T`` for every example ``n``, with Flipout's per-example weights around ``loc``.

    .. math::

        h_n A_n^T = h_n M^T + \\big((h_n \\circ r_n) (A - M)^T\\big) \\circ s_n,
        \\qquad r_n \\in \\{\\pm 1\\}^{d_{in}},\\; s_n \\in \\{\\pm 1\\}^{r},

    i.e. ``A_n = M + (A - M) o (s_n r_n^T)`` (Wen et al., "Flipout: Efficient
    pseudo-independent weight perturbations on mini-batches", ICLR 2018, eq. 3).

    Args:
        h: inputs ``(n, ..., d_in)``; the signs are drawn per leading index ``n``
            and shared over the middle dims (the tokens of one sequence).
        loc: the centre ``M`` (``r x d_in``).
        sample: one draw ``A`` (``r x d_in``) of the weight around ``loc``.

    Returns:
        ``(n, ..., r)``.
    """
    if loc.shape != sample.shape or loc.dim() != 2:
        raise ValueError(f"flipout needs a 2-d centre and draw of one shape, got {tuple(loc.shape)} and {tuple(sample.shape)}")
    middle = (1,) * (h.dim() - 2)
    sign_in = random_signs((h.shape[0], *middle, h.shape[-1]), h)
    sign_out = random_signs((h.shape[0], *middle, loc.shape[0]), h)
    return h @ loc.T + ((h * sign_in) @ (sample - loc).T) * sign_out


class BLoBLinear(BayesianLoRALinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus a BLoB update: Gaussian ``A``, point ``B``.

    The layer's own parameters are those of plain LoRA: ``lora_A_weight`` is the
    posterior mean ``M`` of ``A`` and ``lora_B_weight`` the deterministic ``B``, so
    :attr:`bayesian` is False (it has no inducing factors); the randomness is the
    Pyro site :attr:`site_w`, sampled by :meth:`model` and supplied by the guide.

    Args:
        base: the layer to adapt; its parameters are frozen, not copied.
        name: the layer's module path, used to name the sample site.
        config: rank, scaling and dropout (the inducing and prior settings of
            Bayesian-LoRA are not used).
        prior_std: ``sigma_p`` of the prior ``A ~ N(0, sigma_p^2 I)`` (BLoB: 0.2).
        flipout: use Flipout in training (see :func:`flipout_project`).
    """

    def __init__(self, base: nn.Module, name: str, config: "BLoRAConfig", prior_std: float = 0.2, flipout: bool = True):
        if not (isinstance(prior_std, (int, float)) and not isinstance(prior_std, bool) and prior_std > 0):
            raise ValueError(f"{name}: BLoB's prior_std (sigma_p) must be a positive number, got {prior_std!r}")
        super().__init__(base, name, config, bayesian=False)
        self.prior_std = float(prior_std)
        self.flipout = bool(flipout)
        self._a: Optional[Tensor] = None

    @property
    def site_w(self) -> str:
        """The Pyro site of ``A``: ``{layer}.lora_A.W``."""
        return f"{self.layer_name}.lora_A.W"

    def prior(self) -> dist.Distribution:
        """``p(A) = N(0, sigma_p^2 I)`` with event shape ``(r, d_in)``."""
        zero = torch.zeros((), dtype=self.lora_A_weight.dtype, device=self.lora_A_weight.device)
        return dist.Normal(zero, self.prior_std).expand((self.r, self.in_features)).to_event(2)

    def model(self) -> tuple[Tensor, Tensor]:
        """Sample ``A`` (Pyro site :attr:`site_w`) for the following forwards; return ``(A, B)``."""
        self.set_adapter_weights(pyro.sample(self.site_w, self.prior()))
        return self.adapter_weights()

    def set_draws(self, weights: Mapping[str, Tensor]) -> None:
        """Fix the draw of A from joint draws keyed by site name; B is the layer's parameter."""
        self.set_adapter_weights(weights[self.site_w])

    def set_adapter_weights(self, a: Tensor, b: Optional[Tensor] = None) -> None:
        """Fix the draw ``A`` (``[S,] r x d_in``) for the next forwards.

        ``B`` is a deterministic parameter of the layer; ``b`` may only be that parameter.
        """
        if b is not None and b is not self.lora_B_weight:
            raise ValueError(f"{self.layer_name}: B is a deterministic parameter of a BLoB layer; pass only A")
        if a.dim() not in (2, 3) or a.shape[-2:] != (self.r, self.in_features):
            raise ValueError(
                f"{self.layer_name}: a draw of A must have shape ([S,] {self.r}, {self.in_features}), got {tuple(a.shape)}"
            )
        self._a = a

    def clear_adapter_weights(self) -> None:
        self._a = None

    def adapter_weights(self) -> tuple[Tensor, Tensor]:
        if self._a is None:
            raise RuntimeError(
                f"{self.layer_name} has no sampled adapter weights: run the network through "
                "pyro_blora (FitResult.predict, BayesianLoRAModel), or call FitResult.use_posterior_mean()"
            )
        return self._a, self.lora_B_weight

    def _project(self, h: Tensor, a: Tensor) -> Tensor:
        # training draws one A per step; Flipout gives each example its own pseudo-independent perturbation
        return flipout_project(h, self.lora_A_weight, a) if self.training and self.flipout else h @ a.T

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
            f"blob(prior_std={self.prior_std:g}, flipout={self.flipout})"
        )
