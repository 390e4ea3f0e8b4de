"""Answers the planner gave for observed traffic, kept so that a steady load costs no simulation."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Any


class Answers:
    """What the planner answered for observed traffic (the autoscaler's sizes, slo_aware's rule), kept per key
    (pdserve.workload.mix_key: a steady load costs no simulation), the latest `size` of them. Each is computed
    once by fn(*args()) -> (answer, simulations run), on `executor` if given (a process pool, so a serving
    router's process is not slowed); args is called only then."""

    def __init__(self, size: int = 256, executor: Executor | None = None) -> None:
        self.size, self.executor = size, executor
        self._kept: OrderedDict[Hashable, Any] = OrderedDict()
        self.simulations = 0  # run so far, for tests and logs

    def get(self, key: Hashable, fn: Callable[..., tuple[Any, int]], args: Callable[[], tuple]) -> Any:
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        out, ran = fn(*args()) if self.executor is None else self.executor.submit(fn, *args()).result()
        self.simulations += ran
        self._kept[key] = out
        if len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return out
