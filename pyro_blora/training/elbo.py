"""A mean-field ELBO that scores a site only where its KL has no closed form.

:class:`~pyro.infer.TraceMeanField_ELBO` estimates

.. math::

    \\mathcal L = \\sum_{\\text{observed}} \\log p(y \\mid \\cdot)
        - \\sum_{\\text{latent } z} \\begin{cases}
            \\mathrm{KL}(q(z) \\,\\|\\, p(z)) & \\text{if registered (closed form)} \\\\
            \\log q(z) - \\log p(z) & \\text{else (one-sample Monte Carlo)}
          \\end{cases}

but, through :func:`pyro.infer.enum.get_importance_trace`, it first calls
``compute_log_prob`` on every model site and ``compute_score_parts`` on every
guide site, including the latent sites whose closed-form KL it then uses
instead. For Bayesian-LoRA those are the ``*.W`` sites of every factor: their
``log_prob`` needs an ``m_r m_c``-square Cholesky, a Woodbury solve and their
backward pass, per factor and per step, for a number that is thrown away.

:class:`MeanFieldELBO` evaluates the same estimator term by term and computes a
site's ``log_prob`` (memoised in the trace, as Pyro does) only when the term
needs it: observed sites, and latent sites without a registered KL. Loss and
gradients equal ``TraceMeanField_ELBO``'s (``tests/test_elbo.py`` checks both),
and the returned loss is the differentiable ELBO itself, with no host
synchronisation (Pyro's ``differentiable_loss`` calls ``.item()`` once per step).
While Pyro validation is on, the traces are built by Pyro's own
``get_importance_trace`` so that every site's shape check still runs.

Reference: Pyro's ``pyro/infer/trace_mean_field_elbo.py`` (Bingham et al., 2019).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan
from torch import Tensor
from torch.distributions import kl_divergence

from pyro_blora.models.batched import take_rows

__all__ = ["MeanFieldELBO"]


def _unscaled_log_prob(site: dict) -> Tensor:
    """The site's ``log_prob`` before scale and mask, memoised in the site as ``compute_log_prob`` does."""
    if "unscaled_log_prob" not in site:
        site["unscaled_log_prob"] = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return site["unscaled_log_prob"]


def _unscaled_entropy_term(site: dict) -> Tensor | float:
    """The guide site's ``score_parts().entropy_term`` before scale and mask (``log q`` when reparameterised)."""
    if "score_parts" in site:  # memoised, already scaled: undo nothing, use Pyro's own value
        return site["score_parts"].entropy_term
    if site["fn"].has_rsample:
        return _unscaled_log_prob(site)
    parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
    return parts.entropy_term


class _Terms:
    """The ELBO as a sum of scaled terms, added with a few stacks instead of one autograd node per site.

    Terms of sites that share a python-number scale and have no mask are summed
    per (scale, dtype) group; rows of a stacked tensor (:meth:`add_rows`) are
    gathered and summed per tensor; log-densities of one model distribution
    at rows of one stacked value (:meth:`add_model_rows`) are evaluated in one
    ``log_prob`` call.
    """

    def __init__(self) -> None:
        self.groups: dict[tuple, list[Tensor]] = {}
        self.rows: dict[tuple, tuple[Tensor, list[int]]] = {}
        self.model_rows: dict[tuple, tuple[Any, Tensor, list[int]]] = {}
        self.loose: list[Any] = []

    def add(self, value: Any, site: dict, sign: float = 1.0, scaled: bool = False) -> None:
        scale, mask = site["scale"], site["mask"]
        if not torch.is_tensor(value):
            self.loose.append(sign * value * (1.0 if scaled else scale) * (1.0 if mask is None else mask))
            return
        if scaled or mask is not None or torch.is_tensor(scale):
            term = value if scaled else scale_and_mask(value, scale, mask)
            self.loose.append(sign * term.sum())
            return
        term = value if value.dim() == 0 else value.sum()
        self.groups.setdefault((float(scale) * sign, term.dtype, term.device), []).append(term)

    def add_rows(self, found: tuple[Tensor, int], scale: float) -> None:
        tensor, index = found
        self.rows.setdefault((id(tensor), scale), (tensor, []))[1].append(index)

    def add_model_rows(self, fn: Any, found: tuple[Tensor, int], scale: float) -> None:
        tensor, index = found
        self.model_rows.setdefault((id(fn), id(tensor), scale), (fn, tensor, []))[2].append(index)

    def total(self) -> Tensor:
        parts: list[tuple[float, Tensor]] = []
        for (scale, _, _), terms in self.groups.items():
            parts.append((scale, terms[0] if len(terms) == 1 else torch.stack(terms).sum()))
        for (_, scale), (tensor, indices) in self.rows.items():
            parts.append((scale, take_rows(tensor, indices).sum()))
        for (_, _, scale), (fn, tensor, indices) in self.model_rows.items():
            parts.append((scale, fn.log_prob(take_rows(tensor, indices)).sum()))
        total: Any = 0.0
        for scale, part in parts:
            total = total + (part if scale == 1.0 else scale * part)
        for term in self.loose:
            total = total + term
        return total if torch.is_tensor(total) else torch.as_tensor(total)


def _plain_scale(site: dict) -> float | None:
    """The site's scale as a number when it is one and the site has no mask, else None."""
    scale = site["scale"]
    return None if site["mask"] is not None or torch.is_tensor(scale) else float(scale)


def _batched_kl(guide_fn: Any, model_fn: Any) -> Any:
    """``guide_fn.batched_kl(model_fn)``: ``(kls, index)``, None if unknown, ``"none"`` if there is no KL."""
    method = getattr(guide_fn, "batched_kl", None)
    if method is None:
        return None
    try:
        return method(model_fn)
    except NotImplementedError:
        return "none"


class MeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` without the ``log_prob`` of sites whose KL is closed form.

    A drop-in replacement (same constructor, same ``loss`` and
    ``differentiable_loss``): see the module docstring for what it skips and why.
    """

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
        if is_validation_enabled():
            # Pyro's path: scores every site, checks shapes, enumeration and the mean-field order.
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace) -> tuple[Tensor, Tensor]:
        elbo = _Terms()
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo.add(_unscaled_log_prob(model_site), model_site)
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            q, p = guide_site["fn"], model_site["fn"]
            scale = _plain_scale(guide_site)
            found = _batched_kl(q, p) if scale is not None else None
            if isinstance(found, tuple):  # a row of a KL computed for many sites at once
                elbo.add_rows(found, -scale)
                continue
            if found is None:
                try:
                    kl = kl_divergence(q, p)
                except NotImplementedError:
                    pass
                else:
                    if not torch.is_tensor(kl):
                        kl = kl * torch.Size(q.batch_shape).numel()
                    elbo.add(kl, guide_site, -1.0)
                    continue
            # no closed form: log p(z) - log q(z) at the guide's draw
            if self._add_batched_draw(elbo, model_site, guide_site, scale):
                continue
            elbo.add(_unscaled_log_prob(model_site), model_site)
            elbo.add(_unscaled_entropy_term(guide_site), guide_site, -1.0, scaled="score_parts" in guide_site)
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                if not guide_site["infer"].get("is_auxiliary"):
                    raise ValueError(f"guide site {name!r} is not in the model and not marked is_auxiliary")
                elbo.add(_unscaled_entropy_term(guide_site), guide_site, -1.0, scaled="score_parts" in guide_site)
        loss = -elbo.total()
        return loss, loss

    @staticmethod
    def _add_batched_draw(elbo: _Terms, model_site: dict, guide_site: dict, scale: float | None) -> bool:
        """Score a draw that is a row of a stacked draw with one ``log_prob`` per stack; False if it is not."""
        q, p, value = guide_site["fn"], model_site["fn"], guide_site["value"]
        model_scale = _plain_scale(model_site)
        if scale is None or model_scale is None or model_site["args"] or model_site["kwargs"]:
            return False
        if "unscaled_log_prob" in model_site or p.batch_shape != () or model_site["value"] is not value:
            return False
        stacked = getattr(q, "stacked_value", lambda v: None)(value)
        log_q = getattr(q, "batched_log_prob", lambda v: None)(value)
        if stacked is None or log_q is None:
            return False
        elbo.add_model_rows(p, stacked, model_scale)
        elbo.add_rows(log_q, -scale)
        return True

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """The negative ELBO as a differentiable tensor (``num_particles`` averaged), without ``.item()``."""
        loss: Any = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            _, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + surrogate / self.num_particles
        if is_validation_enabled():
            warn_if_nan(loss, "loss")
        return loss

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative ELBO as a number (no gradients)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative ELBO as a number, after back-propagating it (for :class:`pyro.infer.SVI`)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        return float(loss)
