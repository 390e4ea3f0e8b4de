"""engine.loop.EngineLoop: calls between steps, and an engine built on the loop's own thread (one OpenMP team)."""
from __future__ import annotations

import threading
import time

import pytest

from engine.loop import EngineDead, EngineLoop


def test_an_engine_built_through_call_is_stepped_on_the_same_thread() -> None:
    loop = EngineLoop()
    try:
        built_on = loop.call(threading.get_ident).result(timeout=5)
        assert built_on != threading.get_ident()
        left, stepped_on, results = [3], [], []

        def step() -> int:
            stepped_on.append(threading.get_ident())
            left[0] -= 1
            return left[0]

        assert loop.num_steps == 0  # nothing to step before bind()
        loop.bind(step, lambda: left[0] > 0, results.append)
        deadline = time.monotonic() + 5
        while len(results) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert results == [2, 1, 0] and set(stepped_on) == {built_on} and loop.num_steps == 3
    finally:
        loop.stop()


def test_a_build_that_fails_reaches_the_caller_and_the_loop_keeps_taking_calls() -> None:
    loop = EngineLoop()
    try:
        with pytest.raises(ValueError, match="no such model"):
            loop.call(lambda: (_ for _ in ()).throw(ValueError("no such model"))).result(timeout=5)
        assert loop.call(lambda: 7).result(timeout=5) == 7
    finally:
        loop.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's thread re-raises
def test_a_failed_step_fails_later_calls() -> None:
    errors = []
    loop = EngineLoop(on_error=errors.append)
    loop.bind(lambda: 1 / 0, lambda: True, lambda _: None)
    deadline = time.monotonic() + 5
    while loop.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    loop._thread.join(timeout=5)  # it re-raises as it ends: inside this test, where the warning is expected
    assert isinstance(loop.error, ZeroDivisionError) and errors == [loop.error]
    with pytest.raises(EngineDead):
        loop.call(lambda: 1).result(timeout=5)


def _run_steps(step, n: int) -> dict:
    loop = EngineLoop()
    try:
        left, done = [n], []

        def counted():
            step()
            left[0] -= 1

        loop.bind(counted, lambda: left[0] > 0, done.append)
        deadline = time.monotonic() + 10
        while len(done) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(done) == n
        return loop.metrics.snapshot()
    finally:
        loop.stop()


def test_step_time_off_the_engine_thread_s_core_is_counted_apart() -> None:
    """A step that sleeps spends its time off its core; one that computes spends it on its core: the
    metric that shows what other threads on the engine's cores (or waits) cost its steps."""
    asleep = _run_steps(lambda: time.sleep(0.05), 4)
    assert asleep["busy_seconds"] >= 0.2 and asleep["step_off_cpu_seconds"] >= 0.18
    assert asleep["step_off_cpu_seconds"] <= asleep["busy_seconds"]

    def spin() -> None:
        end = time.thread_time() + 0.05  # 50 ms of this thread's own CPU time
        while time.thread_time() < end:
            pass

    busy = _run_steps(spin, 4)
    assert busy["busy_seconds"] >= 0.2
    # on its core but for what other threads take from it on a loaded host (the suite's own): most of the step
    assert busy["step_off_cpu_seconds"] < 0.5 * busy["busy_seconds"]
