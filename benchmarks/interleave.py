"""Run several training loops side by side, one step each in turn, and time every step.

On a machine shared with other jobs, load drifts over minutes; timing method A
for a minute and then method B compares the load as much as the methods. Here
every loop runs in its own thread, and a baton lets exactly one thread run at a
time: A steps, then B, then C, then A again. A step's time is measured on its
own thread: wall time from taking the baton to the end of the step, and the
thread's CPU time (``time.thread_time``) over the same interval, which other
processes' load inflates much less. With ``torch.set_num_threads(1)`` every
tensor op runs on the calling thread, so the CPU time is the step's whole cost.

Pyro's handler stack is process-global, but a loop only hands the baton over
between steps (in a ``fit`` callback), when no handler is active.
"""

from __future__ import annotations

import threading
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]
from typing import Any, Callable, Sequence

__all__ = ["Baton", "StepClock", "run_interleaved"]


class Baton:
    """Lets ``count`` threads run one at a time, in a fixed rotation; finished threads drop out."""

    def __init__(self, count: int):
        self.turn = 0
        self.alive = [True] * count
        self.cond = threading.Condition()

    def wait(self, index: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == index)

    def _advance(self, index: int) -> None:
        count = len(self.alive)
        for step in range(1, count + 1):
            nxt = (index + step) % count
            if self.alive[nxt]:
                self.turn = nxt
                break
        self.cond.notify_all()

    def pass_on(self, index: int) -> None:
        with self.cond:
            self._advance(index)

    def finish(self, index: int) -> None:
        with self.cond:
            self.alive[index] = False
            self._advance(index)


class StepClock:
    """A step callback (``fit(callbacks=[clock])`` or ``train_loop(timer=clock)``) that takes turns.

    Records per step the wall time and the thread's CPU time since it last
    took the baton, then hands the baton on and waits for its next turn.
    """

    def __init__(self, baton: Baton, index: int, sync: Callable[[], None] = lambda: None):
        self.baton = baton
        self.index = index
        self.sync = sync
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.faults: list[int] = []
        self._start = (0.0, 0.0, 0)

    def start(self) -> None:
        self.baton.wait(self.index)
        self._start = (time.perf_counter(), time.thread_time(), _minor_faults())

    def __call__(self, state: Any = None) -> None:
        self.sync()
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.thread_time() - self._start[1])
        self.faults.append(_minor_faults() - self._start[2])
        self.baton.pass_on(self.index)
        self.start()
        return None

    def step_times(self, warmup: int) -> dict[str, list]:
        """Per step after ``warmup``: ``wall`` and ``cpu`` seconds, ``faults`` (minor page faults of the thread)."""
        return {"wall": self.wall[warmup:], "cpu": self.cpu[warmup:], "faults": self.faults[warmup:]}


def _minor_faults() -> int:
    """Minor page faults of the calling thread so far (Linux ``RUSAGE_THREAD``; 0 where unavailable)."""
    who = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None
    return resource.getrusage(who).ru_minflt if who is not None else 0


def run_interleaved(loops: Sequence[Callable[[StepClock], Any]], sync: Callable[[], None] = lambda: None
                    ) -> tuple[list[Any], list[StepClock]]:
    """Run ``loop(clock)`` of every loop in its own thread, step by step in turn.

    Each loop must call ``clock`` after every step (it blocks until the loop's
    next turn) and nothing else that takes the baton. Returns each loop's result
    and its clock. An exception in a loop is re-raised here after all threads end.
    """
    baton = Baton(len(loops))
    clocks = [StepClock(baton, i, sync) for i in range(len(loops))]
    results: list[Any] = [None] * len(loops)
    errors: list[BaseException | None] = [None] * len(loops)

    def target(i: int) -> None:
        try:
            clocks[i].start()
            results[i] = loops[i](clocks[i])
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors[i] = err
        finally:
            baton.finish(i)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(loops))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for err in errors:
        if err is not None:
            raise err
    return results, clocks
