"""Same-role parameters of many sibling modules kept as rows of one tensor while training.

A Bayesian-LoRA network has about ten small parameter tensors per LoRA factor
(the prior's ``Z_r``, ``Z_c``, ``log D_r``, ``log D_c``; the guide's location, scales
and the flow's weights), hundreds of factors, and the batched code stacks each
kind of them every step. Kept as separate tensors, every step then pays per
tensor: a ``select`` to split each stacked gradient again, the gradient
clipping's norm and scaling, and AdamW's bookkeeping: on SmolLM2 with every
block adapted about 8,000 of a flow step's 54,000 aten ops (peft LoRA: 24,000).

:func:`pack_parameters` lays each *role* (the same relative name and shape in
modules of one class with the same parameter layout, e.g. ``loc`` of every flow
family) out as the rows of one leaf tensor ``R`` of shape ``(n, *shape)``, with one
gradient buffer ``G``. Every original parameter keeps its identity and becomes a
view: ``p.data = R[i]``, ``p.grad = G[i]``. So

* batched code asks :func:`stack_parameters` for the stack of a role and gets
  ``R`` itself (no stack, and its gradient lands in ``G`` in one accumulation);
* per-module code (a family drawn on its own, plots, state dicts, hooks) still
  reads and trains ``p``, whose gradient accumulates into the same ``G[i]``;
* the optimiser, clipping and the multi-process average see a few tensors.

The packing holds for one ``fit``: :meth:`ParameterPacking.unpack` gives every
parameter its own storage back. While it holds, a parameter's ``.grad`` must be
zeroed in place (:meth:`ParameterPacking.zero_grad`), not set to None.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import functools

import torch
from torch import Tensor, nn


__all__ = ["ParameterPacking", "pack_parameters", "stack_parameters", "take_rows"]

_ROW = "_pyro_blora_packed_row"  # attribute on a packed parameter: (R, i)


def take_rows(tensor: Tensor, positions: Sequence[int]) -> Tensor:
    """``tensor[positions]``: the tensor itself when that is all of it in order, else one ``index_select``."""
    if len(positions) == tensor.shape[0] and all(i == p for i, p in enumerate(positions)):
        return tensor
    return tensor.index_select(0, _index(tuple(positions), tensor.device))


@functools.lru_cache(maxsize=256)
def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    # the same positions come back every step: copy them to the device once, not once per step
    # (a host-to-device copy from a Python list waits for the device)
    return torch.tensor(positions, dtype=torch.long, device=device)


@dataclass
class _Pack:
    leaf: nn.Parameter
    grad: Tensor
    members: list[nn.Parameter]


def stack_parameters(params: Sequence[Tensor]) -> Tensor:
    """``torch.stack(params)``; the packed role itself when ``params`` are all its rows in order (see the module
    docstring), or one ``index_select`` of it when they are some of its rows."""
    ref = getattr(params[0], _ROW, None)
    if ref is None:
        return torch.stack(list(params))
    leaf, rows = ref[0], []
    for param in params:
        ref = getattr(param, _ROW, None)
        if ref is None or ref[0] is not leaf:
            return torch.stack(list(params))
        rows.append(ref[1])
    return take_rows(leaf, rows)


class ParameterPacking:
    """The roles :func:`pack_parameters` packed; see the module docstring.

    Args:
        packs: the packed roles.
    """

    def __init__(self, packs: Sequence[_Pack]):
        self.packs = list(packs)
        self._leaf_of = {id(p): pack.leaf for pack in self.packs for p in pack.members}

    def __len__(self) -> int:
        return len(self.packs)

    def replace(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """``params`` with each packed parameter replaced by its role's leaf (each leaf once, where its first member was)."""
        out, seen = [], set()
        for param in params:
            target = self._leaf_of.get(id(param), param)
            if id(target) not in seen:
                seen.add(id(target))
                out.append(target)
        return out

    def zero_grad(self) -> None:
        """Zero every role's gradient buffer in place (the members' ``.grad`` are views of it)."""
        for pack in self.packs:
            pack.grad.zero_()
            pack.leaf.grad = pack.grad

    def unpack(self) -> None:
        """Give every member its own storage (the current values) and no gradient; the leaves are dropped."""
        for pack in self.packs:
            for param in pack.members:
                param.data = param.data.clone()
                param.grad = None
                delattr(param, _ROW)
        self.packs, self._leaf_of = [], {}


def _owned_parameters(module: nn.Module, member_types: tuple[type, ...]) -> Iterable[tuple[str, nn.Parameter]]:
    """``module``'s parameters, not descending into child modules that are members themselves."""
    yield from module.named_parameters(recurse=False)
    for child_name, child in module.named_children():
        if not isinstance(child, member_types):
            for name, param in _owned_parameters(child, member_types):
                yield f"{child_name}.{name}", param


def _roles(modules: Sequence[nn.Module], member_types: tuple[type, ...], trainable: dict[int, int]) -> dict:
    roles: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if not isinstance(module, member_types) or id(module) in seen:
                continue
            seen.add(id(module))
            owned = [(name, p) for name, p in _owned_parameters(module, member_types) if id(p) in trainable]
            layout = tuple((name, tuple(p.shape), p.dtype, p.device, trainable[id(p)]) for name, p in owned)
            for (_, param), entry in zip(owned, layout):
                roles[(type(module), layout, entry)].append(param)
    return roles


def pack_parameters(modules: Sequence[nn.Module], member_types: tuple[type, ...],
                    groups: Sequence[Sequence[nn.Parameter]]) -> ParameterPacking:
    """Pack the parameters of ``groups`` (e.g. the optimiser's groups) that play one role in the ``member_types``
    modules found in ``modules``; a role never spans two groups. Returns the packing; see the module docstring.

    Parameters outside those modules, shared between modules, or alone in their role stay as they are.
    """
    trainable = {id(p): index for index, group in enumerate(groups) for p in group if p.requires_grad}
    counts: dict[int, int] = defaultdict(int)
    roles = _roles(modules, member_types, trainable)
    for members in roles.values():
        for param in members:
            counts[id(param)] += 1
    packs = []
    for members in roles.values():
        if len(members) < 2 or any(counts[id(p)] > 1 for p in members):
            continue
        with torch.no_grad():
            leaf = nn.Parameter(torch.stack([p.detach() for p in members]))
        grad = torch.zeros_like(leaf)
        leaf.grad = grad
        for index, param in enumerate(members):
            param.data = leaf.data[index]
            param.grad = grad[index]
            setattr(param, _ROW, (leaf, index))
        packs.append(_Pack(leaf, grad, members))
    return ParameterPacking(packs)
