"""Packed parameters (models/packing.py): the stacks batched code reads, the gradients every member gets,
and a ``fit`` that trains exactly as it does with every parameter on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_blora
import pyro_blora.training.svi as svi
from pyro_blora.models.packing import pack_parameters, stack_parameters
from toy import make_config, make_data, make_net

pytestmark = pytest.mark.usefixtures("one_thread")


class Member(nn.Module):
    def __init__(self, width: int, shift: float):
        super().__init__()
        self.loc = nn.Parameter(torch.arange(width, dtype=torch.float32) + shift)
        self.scale_rho = nn.Parameter(torch.full((width,), shift))


def _members(count: int = 3, width: int = 4) -> nn.ModuleList:
    return nn.ModuleList(Member(width, float(i)) for i in range(count))


def test_members_become_rows_of_one_leaf_and_batched_code_gets_it_whole() -> None:
    members = _members()
    before = [m.loc.detach().clone() for m in members]
    params = list(members.parameters())
    packing = pack_parameters([members], (Member,), [params])
    assert len(packing) == 2  # loc and scale_rho
    locs = [m.loc for m in members]
    stacked = stack_parameters(locs)
    leaf = packing.replace([members[0].loc])[0]
    assert stacked is leaf and stacked.shape == (3, 4)
    assert all(torch.equal(m.loc, b) for m, b in zip(members, before))
    some = stack_parameters([locs[2], locs[0]])  # some rows, another order: one index_select
    assert torch.equal(some, torch.stack([before[2], before[0]]))
    assert torch.equal(stack_parameters([nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(2))]),
                       torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_gradients_of_the_stack_and_of_a_member_land_in_the_same_rows() -> None:
    members = _members()
    packing = pack_parameters([members], (Member,), [list(members.parameters())])
    packing.zero_grad()
    (stack_parameters([m.loc for m in members]) * torch.tensor([[1.0], [2.0], [3.0]])).sum().backward()
    (members[1].loc * 10).sum().backward()  # a per-member path, as a family drawn on its own
    expected = torch.tensor([1.0, 12.0, 3.0])
    assert all(torch.allclose(m.loc.grad, torch.full((4,), e)) for m, e in zip(members, expected))
    leaf = packing.replace([members[0].loc])[0]
    assert torch.equal(leaf.grad[:, 0], expected)
    with torch.no_grad():
        leaf.add_(1.0)  # an optimiser step on the leaf moves every member
    assert torch.equal(members[2].loc, torch.arange(4.0) + 3.0)
    packing.zero_grad()
    assert all(float(m.loc.grad.abs().sum()) == 0.0 for m in members)


def test_unpack_gives_each_member_its_own_storage_and_no_gradient() -> None:
    members = _members()
    packing = pack_parameters([members], (Member,), [list(members.parameters())])
    packing.unpack()
    with torch.no_grad():
        members[0].loc.add_(100.0)
    assert torch.equal(members[1].loc, torch.arange(4.0) + 1.0)
    assert all(m.loc.grad is None for m in members)
    assert stack_parameters([m.loc for m in members]).shape == (3, 4)


def test_roles_never_span_optimiser_groups_and_lone_or_shared_parameters_stay() -> None:
    members = _members(count=2)
    lone = Member(5, 0.0)  # another shape: alone in its role
    root = nn.ModuleList([*members, lone])
    groups = [[m.loc for m in root], [m.scale_rho for m in root]]
    packing = pack_parameters([root], (Member,), groups)
    assert len(packing) == 2
    assert packing.replace(groups[0])[1] is lone.loc
    shared = _members(count=2)
    shared[1].loc = shared[0].loc  # one tensor in two members: left alone
    packing = pack_parameters([shared], (Member,), [list(shared.parameters())])
    assert len(packing) == 1  # scale_rho only


@pytest.mark.parametrize("guide", ["flow", "delta", "normal"])
def test_fit_trains_as_it_does_without_packing(guide: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> tuple[list[float], dict[str, torch.Tensor]]:
        result = pyro_blora.fit(make_net(), make_data(), guide=guide, config=make_config(), num_steps=6,
                                batch_size=16, lr=1e-2, progress=False, seed=3, host_sync_every=1)
        return result.history["loss"], result.state_dict_copy()

    packed_loss, packed_state = run()
    monkeypatch.setattr(svi, "PACKED_MODULES", ())
    plain_loss, plain_state = run()
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-6)
    assert packed_state.keys() == plain_state.keys()
    for key in plain_state:
        assert torch.allclose(packed_state[key], plain_state[key], rtol=1e-4, atol=1e-6), key


def test_after_fit_every_parameter_owns_its_storage() -> None:
    result = pyro_blora.fit(make_net(), make_data(), guide="flow", config=make_config(), num_steps=2,
                            batch_size=16, progress=False, seed=0)
    pointers = [p.untyped_storage().data_ptr() for m in (result.net, result.guide) for p in m.parameters()]
    assert len(pointers) == len(set(pointers))
    assert all(p.grad is None for p in result.guide.parameters())
