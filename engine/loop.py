"""An engine's steps on one thread. The engine is single-threaded; a worker's other threads
(a Ray actor's event loop) hand it work as calls that run between steps."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.metrics import StepMetrics

_STOP = object()


class _Fail:
    """An inbox item that ends the loop with its error (EngineLoop.fail)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class EngineDead(RuntimeError):
    """The engine loop stopped on an error (e.g. a tensor-parallel rank died): nothing more runs here."""


class EngineLoop:
    """Between steps: run the queued calls, then `tick()`; then, while `has_work()`, one `step()`
    whose result goes to `on_step`. Idle, it sleeps on the inbox (waking every `idle_tick_s`
    for `tick`, e.g. to expire leases).

    Build the engine on the loop's thread too: `EngineLoop(on_error=...)`, then `call(build).result()`,
    then `bind(...)`. OpenMP gives each thread that starts parallel work a team of its own; an engine
    loaded on one thread and stepped on another leaves two teams on the cores, and then libgomp stops
    spinning between parallel regions: each of a step's hundreds of regions waits on a futex wake-up
    (seen in a decode replica: ~28k voluntary context switches per thread in a 24-request burst, none
    in the offline engine, and steps ~10% longer with the router on the same 2 cores)."""

    def __init__(self, step: Callable[[], Any] | None = None, has_work: Callable[[], bool] | None = None,
                 on_step: Callable[[Any], None] | None = None, tick: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 cost: Callable[[], tuple[int, float, float]] | None = None, idle_tick_s: float = 0.1,
                 window_s: float = 5.0) -> None:
        """cost(): (tokens, FLOPs, bytes read) of the step just run, for `metrics`. Without step,
        has_work and on_step the loop only runs calls until bind() gives them."""
        self._step, self._has_work, self._on_step, self._tick = step, has_work or (lambda: False), on_step, tick
        self._on_error, self._cost = on_error, cost
        self.metrics = StepMetrics(window_s)
        self._idle_tick_s = idle_tick_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.num_steps = 0
        self.error: BaseException | None = None  # set if a step raised: the loop is dead
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        """The loop thread's id in the OS (its CPU affinity, its /proc entry)."""
        return self._thread.native_id

    def bind(self, step: Callable[[], Any], has_work: Callable[[], bool], on_step: Callable[[Any], None],
             tick: Callable[[], None] | None = None,
             cost: Callable[[], tuple[int, float, float]] | None = None) -> None:
        """Start stepping an engine built with call(); runs on the loop's thread before any step."""
        def set_() -> None:
            self._step, self._on_step, self._tick, self._cost = step, on_step, tick, cost
            self._has_work = has_work
        self.call(set_).result()

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on the loop thread before the next step; its result or exception lands in the future."""
        fut: Future = Future()
        if self.error is not None:
            fut.set_exception(EngineDead(f"the engine loop died: {self.error!r}"))
        else:
            self._inbox.put((fn, args, fut))
        return fut

    def fail(self, error: BaseException) -> None:
        """End the loop as a failed step would, before its next step: for a replica that lost a rank
        between steps (found by a call to it). Waiting calls and the replica's requests fail."""
        self._inbox.put(_Fail(error))

    def stop(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while True:
                try:  # idle: sleep on the inbox; busy: only take what is already there
                    item = self._inbox.get_nowait() if self._has_work() else self._inbox.get(timeout=self._idle_tick_s)
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        return
                    if isinstance(item, _Fail):
                        raise item.error
                    self._run_call(*item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self._tick is not None:
                    self._tick()
                if self._has_work():
                    t0, c0 = time.monotonic(), time.thread_time()
                    out = self._step()
                    t1, c1 = time.monotonic(), time.thread_time()
                    self.num_steps += 1
                    self.metrics.record(t1 - t0, *(self._cost() if self._cost is not None else (0, 0.0, 0.0)), c1 - c0)
                    self._on_step(out)
        except BaseException as e:  # a failed step: fail every waiting call and request rather than hang them
            self.error = e
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and not isinstance(item, _Fail):
                    item[2].set_exception(EngineDead(f"the engine loop died: {e!r}"))
            if self._on_error is not None:
                self._on_error(e)
            raise

    @staticmethod
    def _run_call(fn, args, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)
