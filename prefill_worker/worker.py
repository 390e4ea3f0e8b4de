"""The prefill replica: an engine in the prefill role behind a Ray actor. It runs prompts in
chunked-prefill batches and, layer by layer, writes their KV straight into the blocks a decode
replica reserved (kv_transfer.ranks.PrefillKV); `prefill()` returns the first token once all of
a prompt's KV is there.

Ray runs the public methods on the actor's event loop; the engine runs on its own thread
(EngineLoop) and is touched only there. The engine is imported inside the actor, so the process
that starts the cluster (and hosts the router) never imports torch."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from replica.actor import ReplicaShell, as_logprobs
from replica.contract import KVLost, LeaseEnded, PrefillResult, ReplicaDead, Reservation


class PrefillWorker(ReplicaShell):
    """Called at start-up by kv_transfer.wiring (info, join_kv_pair, attach), then by the router
    (prefill, abort); the _on_* and _expire methods run on the engine thread."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], peaks: dict[str, float] | None = None,
                 kv_backend: str = "ipc", cpus: tuple[int, ...] | None = None,
                 service_cpus: tuple[int, ...] | None = None) -> None:
        """peaks: peak_flops and peak_bandwidth of the replica for MFU/MBU; measured (measure_peaks) when not
        given. cpus, service_cpus: the cores of its engine thread and of its other threads (None: the OS's
        choice; ReplicaShell._start_engine).
        kv_backend "ipc": write into decode pools mapped on this host; "collective": send over a pair
        group with each decode replica (join_kv_pair)."""
        import functools

        from engine import LLMEngine
        from kv_transfer.ranks import PrefillKV
        from replica.ranks import start_followers

        self.kv = PrefillKV(kv_backend)
        self._pending: dict[str, Future] = {}  # request id -> PrefillResult, set on the engine thread
        self.leases_expired = 0

        def build():
            self.engine = LLMEngine.from_model(model, **engine_kwargs, load_tokenizer=False,
                                               rank_launcher=functools.partial(start_followers, role=self.kv.role))
            self.sender = self.kv.bind(self.engine)
            if peaks:  # else the shell's zeros until measure_peaks
                self.peaks = peaks
            return self.sender.step
        self._start_engine(build, engine_kwargs.get("num_threads"), cpus, service_cpus)

    async def info(self) -> dict[str, Any]:
        # kv_uid: this replica's id in its pair groups (collective backend)
        return {**await super().info(), "kv_uid": self.kv.uid}

    async def join_kv_pair(self, host: str, port: int, pool: str, decode_tp: int, prefix: str) -> None:
        """Form the pair group with decode replica `pool` (its TP decode_tp; its ranks come first),
        between steps (returns once every member has joined); attach its ranks next."""
        from kv_transfer.ranks import join_pair

        tp = self.engine.config.options.tensor_parallel_size
        await join_pair(self.kv.local, self.rank_actors(), host, port, decode_tp, decode_tp + tp, prefix, pool,
                        self.kv.uid)

    async def attach(self, handles: list[dict[str, Any]]) -> None:
        """Reach the decode replicas' KV pools (PoolHandle fields, one per decode rank): map them
        (ipc) or learn their ranks in the pair groups (collective), on every rank of this replica."""
        if self.engine.followers is not None:  # before any step sends there
            await asyncio.get_running_loop().run_in_executor(None, self.engine.followers.call, "kv", "attach",
                                                             handles)
        await self._call(self.kv.local.attach, handles)

    async def detach(self, pool_name: str) -> None:
        """Forget a decode replica's pool (it died, was replaced or left): the prompts bound there fail
        with KVLost, then every rank unmaps it (ipc) or drops its pair group (collective), between steps."""
        await self._call(self._detach, pool_name)
        if self.engine.followers is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.followers.call, "kv", "detach",
                                                             pool_name)

    def _detach(self, pool_name: str) -> None:
        for e in self.sender.drop_pool(pool_name, "its decode replica was replaced"):
            self._settle(e.request_id, exception=e)
        self.kv.local.detach(pool_name)

    async def prefill(self, prompt_token_ids: list[int], params: dict[str, Any], reservation: Reservation
                      ) -> PrefillResult:
        """Prefill the prompt into the reservation's blocks; return the first token (and its
        logprobs when asked for) once all of the prompt's KV is there. params: SamplingParams fields."""
        params = self.sampling_params(params)
        done: Future = Future()
        self._pending[reservation.request_id] = done
        try:
            await self._call(self.sender.add, prompt_token_ids, params, reservation)
            return await self._result(done)
        finally:
            self._pending.pop(reservation.request_id, None)

    async def abort(self, request_id: str) -> bool:
        """Stop prefilling the request: once this returns, nothing more is written to its blocks."""
        found = await self._call(self.sender.abort, request_id)
        self._settle(request_id, exception=KVLost(f"request {request_id!r}: its prefill was aborted", request_id))
        return found

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()

    def _on_step(self, done) -> None:
        for d in done:
            self._settle(d.target.request_id, PrefillResult(d.first_token, as_logprobs(d.logprobs),
                                                            d.num_cached_tokens))

    def _expire(self) -> None:
        for e in self.sender.expire():
            self.leases_expired += isinstance(e, LeaseEnded)
            self._settle(e.request_id, exception=e)

    def _on_error(self, e: BaseException) -> None:
        for rid in list(self._pending):
            self._settle(rid, exception=ReplicaDead(f"the prefill replica failed: {e!r}", rid))

    def _settle(self, request_id: str, result: PrefillResult | None = None,
                exception: BaseException | None = None) -> None:
        """Hand a waiting prefill() its result or error (once; a later one is dropped)."""
        if (fut := self._pending.get(request_id)) is None or fut.done():
            return
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)

    def _stats(self) -> dict[str, Any]:
        from engine.metrics import engine_stats

        stats = engine_stats(self.engine, self.loop.metrics, self.peaks)
        stats.update(tokens_processed=stats["tokens"], kv_bytes_sent=self.sender.saver.bytes_sent,
                     leases_expired=self.leases_expired)
        return stats
