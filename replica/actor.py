"""What the prefill and decode workers share as Ray actors around an engine: calls handed to
the engine's thread, load and utilization answered on the actor's own thread, and the ranks
of the replica."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from replica.contract import ReplicaDead, plain


class ReplicaShell:
    """Subclasses set self.engine, self.loop (an EngineLoop) and self.peaks, and define _stats()."""

    _aloop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def measure_peaks(device: str, tensor_parallel_size: int, given: dict[str, float] | None) -> dict[str, float]:
        """The replica's peak_flops and peak_bandwidth: given, or this rank's measured times the ranks."""
        from engine.metrics import measure_peaks

        return given or {k: v * tensor_parallel_size for k, v in measure_peaks(device).items()}

    def rank_actors(self) -> list:
        """Ranks 1..n-1 of this replica (Ray actor handles; empty at TP 1)."""
        return list(self.engine.followers.actors) if self.engine.followers is not None else []

    async def _join_kv_group(self, host: str, port: int, rank: int, world_size: int, prefix: str):
        """This rank and its followers join the cluster's KV group as ranks rank.. rank+TP-1 (the
        collective backend); returns this rank's receiver thread on a decode replica, else None."""
        from kv_transfer.collective import join_kv_group

        followers = self.rank_actors()
        joins = [a.join_kv_group.remote(host, port, rank + i, world_size, prefix) for i, a in enumerate(followers, 1)]
        thread = await asyncio.get_running_loop().run_in_executor(
            None, join_kv_group, self.engine.runner, host, port, rank, world_size, prefix)
        await asyncio.gather(*joins)
        return thread

    async def stats(self) -> dict[str, Any]:
        """Load and utilization, read on the actor's thread: a long step never delays the answer, so
        a replica that does not answer is really down."""
        if self.loop.error is not None:
            raise ReplicaDead(f"the engine loop died: {self.loop.error!r}")
        return self._stats()

    async def _call(self, fn, *args):
        """fn(*args) on the engine's thread, between steps."""
        self._aloop = self._aloop or asyncio.get_running_loop()
        return await self._plain(self.loop.call(fn, *args))

    @staticmethod
    async def _plain(fut: Future):
        """Await a future of the engine's thread; its error as the router can read it (errors.plain)."""
        try:
            return await asyncio.wrap_future(fut)
        except Exception as e:
            raise plain(e) from None
