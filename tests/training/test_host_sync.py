"""The steady-state training step never reads a tensor on the host; the deferred reads still catch failures.

On a GPU every ``.item()``, ``float(t)``, ``bool(t)`` or ``.tolist()`` waits for the device. A CPU
cannot count synchronisations, so these tests patch those methods during steps after the first and
record every call made from this library's code (``pyro_blora``, ``models``, ``guides``) and Pyro's.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Iterator

import pytest
import torch

import pyro_blora
from toy import make_config, make_data, make_net

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pyro_blora.__file__))))
WATCHED = tuple(os.path.join(ROOT, part) + os.sep for part in ("pyro_blora", "models", "guides"))
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _caller_is_watched() -> str | None:
    """The first frame outside torch that asked for the value, if it is ours or Pyro's."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return None
    name = frame.f_code.co_filename
    if name.startswith(WATCHED) or f"{os.sep}pyro{os.sep}" in name:
        return f"{name}:{frame.f_lineno}"
    return None


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def watch(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            where = _caller_is_watched()
            if where is not None:
                calls.append(f"Tensor.{name} at {where}")
            return original(self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, watch(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class WatchSteps:
    """Patch the host reads from the end of step ``start`` to the end of step ``stop``."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.calls, self._context = start, stop, [], None

    def __call__(self, state) -> bool:
        if state.step == self.start:
            self._context = host_reads()
            self.calls = self._context.__enter__()
        elif state.step == self.stop and self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        return False


@pytest.mark.parametrize("guide", ["delta", "normal", "flow"])
def test_steps_after_the_first_read_nothing_on_the_host(guide: str) -> None:
    watch = WatchSteps(start=2, stop=6)  # steps 3..6 run under the patch; the first flush is at step 8
    result = pyro_blora.fit(make_net(), make_data(), guide, config=make_config(), num_steps=10, batch_size=16,
                            lr=1e-2, progress=False, host_sync_every=8, callbacks=[watch])
    assert watch.calls == []
    assert len(result.history["loss"]) == 10 and all(math.isfinite(v) for v in result.history["loss"])


def test_a_non_finite_loss_is_reported_with_its_step_at_the_next_read() -> None:
    data = make_data()
    poisoned = [dict(e) for e in data]
    for example in poisoned:  # every batch NaN from the first: the first step's own checks catch it
        example["inputs"] = torch.full_like(example["inputs"], math.nan)
    with pytest.raises(FloatingPointError, match="non-finite class logits"):
        pyro_blora.fit(make_net(), poisoned, "normal", config=make_config(), num_steps=4, batch_size=16,
                       progress=False, host_sync_every=8)

    class PoisonLater:
        def __init__(self, part: str):
            self.part = part

        def __call__(self, state) -> bool:
            if state.step == 3:  # from step 4 on these weights are NaN: seen only when the steps are read
                with torch.no_grad():
                    for name, param in state.result.net.named_parameters():
                        if self.part in name:
                            param.fill_(math.nan)
            return False

    with pytest.raises(FloatingPointError, match=r"the loss became nan at step 3;"):
        pyro_blora.fit(make_net(), data, "normal", config=make_config(), num_steps=10, batch_size=16,
                       progress=False, host_sync_every=8, callbacks=[PoisonLater("base.weight")])
    # NaN inducing inputs: the kernel's Cholesky fails, flagged on the device and named at the read
    with pytest.raises(FloatingPointError, match=r"the Cholesky factorisation of 0\.lora_A \(rows\).* failed at step 3;"):
        pyro_blora.fit(make_net(), data, "normal", config=make_config(), num_steps=10, batch_size=16,
                       progress=False, host_sync_every=8, callbacks=[PoisonLater("lora_A")])


def test_history_and_sync_every_one_match() -> None:
    def run(every: int):
        return pyro_blora.fit(make_net(), make_data(), "flow", config=make_config(), num_steps=7, batch_size=16,
                              lr=1e-2, progress=False, seed=3, host_sync_every=every).history

    lazy, eager = run(4), run(1)
    assert lazy["step"] == eager["step"] == list(range(1, 8))
    for key in ("loss", "nll", "kl", "elbo"):
        assert lazy[key] == pytest.approx(eager[key], rel=1e-6, abs=1e-9)


def test_host_sync_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="host_sync_every must be an integer >= 1, got 0"):
        pyro_blora.fit(make_net(), make_data(), "delta", config=make_config(), num_steps=2, host_sync_every=0)
