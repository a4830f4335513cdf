"""Deep ensembles of LoRA adapters on one frozen base model.

Lakshminarayanan et al. (2017, "Simple and scalable predictive uncertainty
estimation using deep ensembles", NeurIPS) train ``k`` networks from different
random starts and average their predictives,

.. math::

    p(y \\mid x, D) = \\frac{1}{k} \\sum_{m=1}^{k} p(y \\mid x, \\theta_m),

where each member's ``p(y | x, theta_m)`` is its own posterior predictive (one
point for a MAP member, the mean over its ``S`` draws for a Bayesian one). Here
the members are LoRA adapters of one base model: there is one set of adapter
modules, and a member is only its trainable tensors (adapter and guide state,
:meth:`FitResult.trainable_state`), copied in before it predicts. When every
adapted layer is Bayesian, the members' factor draws are stacked as samples and
share one forward per batch.

:func:`combine_predictions` builds the same mixture from saved per-run
predictions (e.g. MAP runs of different seeds), without retraining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from pyro_blora.config import BLoRAConfig, config_from_dict
from pyro_blora.inject import adapted_layers, inject_adapters
from pyro_blora.io import METHOD_FILE, WEIGHTS_NAME, fingerprint, read_config, read_method_file, write_method_file
from pyro_blora.methods import METHODS, FitRequest, Method, get_method, load_saved, register_method
from pyro_blora.training.checkpoint import LATEST_NAME
from pyro_blora.result import DEFAULT_PREDICT_SEED, FitResult, Prediction, WrappedPosterior, combine_predictions
from pyro_blora.tasks.base import Task

__all__ = ["EnsembleMember", "EnsembleResult", "combine_predictions", "EnsembleOptions", "fit_ensemble", "load_ensemble", "DEFAULT_SIZE"]

DEFAULT_SIZE = 3
Data = Union[Dataset, DataLoader, Sequence[Any]]


@dataclass
class EnsembleMember:
    """One member: its seed, its trainable tensors and its training log."""

    seed: Optional[int]
    state: dict[str, Tensor]
    history: dict[str, list[float]] = field(default_factory=dict)
    validation: list[dict[str, float]] = field(default_factory=list)


class _MemberStack(FitResult):
    """The template's modules fed with precomputed member draws stacked as posterior samples."""

    def __init__(self, template: FitResult, draws: dict[str, Tensor]):
        super().__init__(template.model, template.guide, template.config, template.train_config, template.task)
        self.draws = draws

    @property
    def is_deterministic(self) -> bool:
        return False

    def sample_weights(self, num_samples: int) -> dict[str, Tensor]:
        held = next(iter(self.draws.values())).shape[0]
        if num_samples != held:
            raise RuntimeError(f"FitResult.predict asked for {num_samples} draws; the ensemble stacked {held}")
        return self.draws


class EnsembleResult(WrappedPosterior):
    """``k`` LoRA adapters of one base model, predicting as an equally weighted mixture.

    Args:
        template: a fitted result whose modules (base, adapters, guide) every member shares.
        members: each member's trainable tensors, keyed as ``template.trainable_state()``.

    Between calls the shared modules hold member 0 (for :meth:`from_results`
    that is the first result's own state, so the caller's result is unchanged).
    """

    method = "ensemble"

    def __init__(self, template: FitResult, members: Sequence[EnsembleMember]):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        current = template.trainable_state()
        for i, member in enumerate(members):
            missing, unexpected = sorted(set(current) - set(member.state)), sorted(set(member.state) - set(current))
            if missing or unexpected:
                raise ValueError(f"member {i} does not fit the shared adapters: missing {missing[:3]}, unexpected {unexpected[:3]}")
            bad = [k for k, v in member.state.items() if v.shape != current[k].shape]
            if bad:
                raise ValueError(f"member {i} has tensors of other shapes than the shared adapters: {bad[:3]}")
        self.template = template
        self.members = members
        self._activate(0)

    # ------------------------------------------------------------ building

    @classmethod
    def from_results(cls, results: Sequence[FitResult]) -> "EnsembleResult":
        """An ensemble of fitted results of the same base model, adapters and guide (e.g. MAP runs of several seeds).

        Each result's trainable tensors are copied; the first result's modules
        serve every member, so the others (and their base-model copies) may be
        dropped afterwards.
        """
        results = list(results)
        if len(results) < 2:
            raise ValueError(f"an ensemble needs at least 2 results, got {len(results)}")
        first = results[0]
        for i, other in enumerate(results[1:], start=1):
            if type(other) is not type(first):
                raise ValueError(f"result {i} is a {type(other).__name__}, result 0 a {type(first).__name__}: mix no methods")
            if dict(other.guide.spec()) != dict(first.guide.spec()) or other.config != first.config:
                raise ValueError(f"result {i} was fitted with another guide or BLoRAConfig than result 0")
            if other.net is not first.net and fingerprint(other.net) != fingerprint(first.net):
                raise ValueError(f"result {i} adapts another base model than result 0 (fingerprint mismatch)")
        members = [
            EnsembleMember(r.train_config.seed, r.state_dict_copy(), dict(r.history), list(r.validation)) for r in results
        ]
        return cls(first, members)

    # ------------------------------------------------------------ the FitResult surface

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def inner(self) -> FitResult:
        """The shared modules (:class:`WrappedPosterior`'s delegate)."""
        return self.template

    @property
    def is_deterministic(self) -> bool:
        return False

    @property
    def history(self) -> list[dict[str, list[float]]]:
        """The training log of each member (:attr:`FitResult.history`), in member order."""
        return [m.history for m in self.members]

    @property
    def validation(self) -> list[list[dict[str, float]]]:
        return [m.validation for m in self.members]

    def _activate(self, index: int) -> None:
        self.template.load_state_dict_copy(self.members[index].state)

    @contextlib.contextmanager
    def member(self, index: int) -> Iterator[FitResult]:
        """The shared modules holding member ``index``, as a :class:`FitResult`; member 0 is put back on exit."""
        if not 0 <= index < self.size:
            raise IndexError(f"member {index} out of range for an ensemble of {self.size}")
        self._activate(index)
        try:
            yield self.template
        finally:
            self._activate(0)

    def can_stack(self) -> bool:
        """Whether the members can share one forward: every adapted layer Bayesian, a plain guide-sampling result.

        A plain LoRA layer reads its own parameters, not stacked draws, and so does the
        prior's empirical-Bayes gain; a result type with its own ``predict`` (e.g. MC dropout) is swapped member by member.
        """
        # a learned prior gain (BLoRAConfig.prior_scale) is a layer parameter, one per member: not stackable
        return type(self.template) is FitResult and all(
            layer.bayesian and getattr(layer, "lora_prior_log_gain", None) is None for layer in self.model.layers
        )

    @torch.no_grad()
    def predict(
        self,
        data: Data,
        num_samples: int = 4,
        batch_size: int = 8,
        stack_samples: Optional[bool] = None,
        seed: Optional[int] = DEFAULT_PREDICT_SEED,
    ) -> Prediction:
        """The mixture predictive; ``sample_probs`` has one slice per member (times its own samples).

        ``stack_samples`` None: stacked on an accelerator, member by member on a CPU (as :meth:`FitResult.predict`).

        Member ``m`` draws its samples with ``seed + m`` when ``seed`` is given.
        With ``stack_samples`` and :meth:`can_stack` all members run in one
        forward per batch; otherwise each member's tensors are swapped in and it
        predicts on its own (``stack_samples`` is then passed on to it).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        stack_samples = self.template.stacks_samples(stack_samples)
        try:
            if stack_samples and self.can_stack():
                return self._predict_stacked(data, num_samples, batch_size, seed)
            predictions = []
            for m in range(self.size):
                self._activate(m)
                predictions.append(self.template.predict(
                    data, num_samples=num_samples, batch_size=batch_size, stack_samples=stack_samples,
                    seed=None if seed is None else seed + m,
                ))
            return combine_predictions(predictions)
        finally:
            self._activate(0)

    def _predict_stacked(self, data: Data, num_samples: int, batch_size: int, seed: Optional[int]) -> Prediction:
        per_member = 1 if self.template.is_deterministic else num_samples
        draws: list[dict[str, Tensor]] = []
        for m in range(self.size):
            self._activate(m)
            if seed is None:
                draws.append(self.template.sample_weights(per_member))
            else:  # as FitResult.predict(seed=seed + m) draws them, so both paths agree
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + m)
                    draws.append(self.template.sample_weights(per_member))
        stacked = {key: torch.cat([d[key] for d in draws]) for key in draws[0]}
        total = per_member * self.size
        # every member has per_member slices, so the mean over all of them is the mean of the member means
        return _MemberStack(self.template, stacked).predict(data, num_samples=total, batch_size=batch_size)

    # ------------------------------------------------------------ saving

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """One adapter folder per member (``member_<m>/``, see :mod:`pyro_blora.io`) plus ``method.json``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"member_{m}" for m in range(self.size)]
        try:
            for m, name in enumerate(names):
                self._activate(m)
                self.template.save(folder / name)
        finally:
            self._activate(0)
        meta = {"method": self.method, "members": names, "seeds": [m.seed for m in self.members]}
        write_method_file(folder, meta)
        return folder


def load_ensemble(
    path: Union[str, "os.PathLike[str]"],
    model: nn.Module,
    task: Optional[Task] = None,
    guide: Any = None,
    check_base: bool = True,
) -> EnsembleResult:
    """Rebuild an :class:`EnsembleResult` saved by :meth:`EnsembleResult.save` onto a fresh base ``model``.

    Member 0 is loaded with :func:`pyro_blora.load` (its own method restored);
    the others only contribute their tensors, after checking that they were
    saved with the same adapters, guide and base model.
    """
    folder = Path(path)
    meta = read_method_file(folder, "ensemble")
    names = meta.get("members")
    if not isinstance(names, list) or len(names) < 2:
        raise ValueError(f"{folder / METHOD_FILE} lists no ensemble members (expected 'members': [>= 2 folders])")
    seeds = meta.get("seeds") or [None] * len(names)
    template = load_saved(folder / names[0], model, task=task, guide=guide, check_base=check_base)
    reference = read_config(folder / names[0])
    members = [EnsembleMember(seeds[0], template.state_dict_copy())]
    for name, seed in zip(names[1:], seeds[1:]):
        config = read_config(folder / name)
        for key in ("blora_config", "guide", "method", "layers"):
            if config.get(key) != reference.get(key):
                raise ValueError(f"{folder / name} was saved with another {key} than {folder / names[0]}")
        if check_base and config["base_fingerprint"] != reference["base_fingerprint"]:
            raise ValueError(f"{folder / name} was trained on another base model than {folder / names[0]}")
        members.append(EnsembleMember(seed, load_file(str(folder / name / WEIGHTS_NAME))))
    return EnsembleResult(template, members)


# ------------------------------------------------------------ training


@dataclass(frozen=True)
class EnsembleOptions:
    """Options of ``fit(guide="ensemble")``."""

    size: int = field(default=DEFAULT_SIZE, metadata={"help": "Number of members k (>= 2)."})
    member: str = field(default="delta", metadata={"help": "Method of each member: a guide family or mc_dropout."})
    member_options: Mapping[str, Any] = field(default_factory=dict, metadata={"help": "Options of the members' method."})

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"ensemble size must be an integer >= 2 (guide_options['size']), got {self.size!r}")
        if not isinstance(self.member_options, Mapping):
            raise ValueError(f"guide_options['member_options'] must be a dict, got {type(self.member_options).__name__}")


def _member_method(name: str) -> Method:
    """The registry record the members are trained with: a Bayesian-LoRA family or MC dropout, never another ensemble."""
    if name in METHODS and not (METHODS[name].bayesian_lora or METHODS[name].ensemble_member):
        raise ValueError(f"ensemble members cannot be {name!r}; use a guide family (delta, normal, mvn, flow) or 'mc_dropout'")
    return get_method(name)


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Draw every adapter's parameters afresh with ``seed``, as injection would (the base is untouched)."""
    from pyro_blora.models import BayesianLoRALinear

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for layer in adapted_layers(model):
            fresh = BayesianLoRALinear(layer.base, layer.layer_name, layer.config, bayesian=layer.bayesian)
            current = layer.state_dict(keep_vars=True)
            for key, value in fresh.state_dict().items():
                if not key.startswith("base."):
                    current[key].copy_(value)


def fit_ensemble(model: nn.Module, data: Data, request: FitRequest, options: EnsembleOptions) -> EnsembleResult:
    """Train ``k`` LoRA adapters of ``model`` from different random starts, one after the other.

    What ``pyro_blora.fit(model, data, guide="ensemble", ...)`` runs, with
    ``options`` = ``{"size": k (default 3), "member": method of each member
    (default "delta", MAP), "member_options": that method's options}``. Member ``m``
    is trained with seed ``seed + m``: its adapters are drawn afresh and its data
    order differs. With ``checkpoint_dir`` each member checkpoints into
    ``<checkpoint_dir>/member_<m>``; ``resume_from`` resumes every member that
    has a checkpoint there and trains the others from the start.
    """
    member_method = _member_method(options.member)
    member_options = member_method.parse_options(dict(options.member_options)) if member_method.fit else None
    config = request.config
    if isinstance(config, dict):
        config = config_from_dict(BLoRAConfig, config)
    existing = adapted_layers(model)
    if existing and config is not None and config != existing[0].config:
        raise ValueError(
            "the model already carries adapters built with another BLoRAConfig; "
            "pass config=None to keep them, or call remove_adapters first"
        )
    if not existing:
        inject_adapters(model, config or BLoRAConfig())
    train = dict(request.train)
    seed = int(train.pop("seed", 0))
    checkpoint_dir = train.pop("checkpoint_dir", None)
    members, template = [], None
    for m in range(options.size):
        _reinitialise(model, seed + m)
        member_train = dict(train, seed=seed + m)
        if checkpoint_dir is not None:
            member_train["checkpoint_dir"] = str(Path(checkpoint_dir) / f"member_{m}")
        resume = None
        if request.resume_from is not None and (Path(request.resume_from) / f"member_{m}" / LATEST_NAME).is_file():
            resume = Path(request.resume_from) / f"member_{m}"
        member_request = dataclasses.replace(request, config=None, resume_from=resume, train=member_train)
        result = member_method.fit(model, data, member_request, member_options)  # type: ignore[misc]
        members.append(EnsembleMember(seed + m, result.state_dict_copy(), result.history, result.validation))
        template = result  # the guides are alike; the last one serves every member
    return EnsembleResult(template, members)


register_method(Method(
    "ensemble", fit_ensemble, EnsembleOptions, load=load_ensemble, display_name="deep ensemble",
    benchmark_defaults={"size": DEFAULT_SIZE}, point_estimate=True,
))
