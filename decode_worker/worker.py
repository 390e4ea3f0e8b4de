"""The decode replica: an engine in the decode role behind a Ray actor. It reserves KV blocks
for prompts prefilled elsewhere (their KV lands straight in its pool, kv_transfer.ranks.DecodeKV),
admits them into its continuously batched decode, and streams each sampled token back to the
router as the contract's StreamItems.

Ray runs the public methods on the actor's event loop; the engine runs on its own thread
(EngineLoop) and is touched only there. The engine is imported inside the actor, so the process
that starts the cluster (and hosts the router) never imports torch."""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from replica.actor import ReplicaShell, as_logprobs
from replica.contract import BadRequest, Logprobs, ReplicaDead, Reservation, StreamItem


class DecodeWorker(ReplicaShell):
    """Called at start-up by kv_transfer.wiring (info, start_kv_store, join_kv_group, unlink_pool),
    then by the router (reserve, commit, add_local, stream, abort); the _on_* methods run on the
    engine thread, the rest on the actor's event loop."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], pool_name: str, lease_s: float = 30.0,
                 peaks: dict[str, float] | None = None, kv_backend: str = "ipc") -> None:
        """peaks: peak_flops and peak_bandwidth of the replica for MFU/MBU; measured here when not given.
        kv_backend "ipc": each rank's slice of the KV pool in shared memory (or CUDA IPC) that prefill
        replicas on this host write into; "collective": each rank receives its slice over the cluster's
        KV group (join_kv_group)."""
        import functools

        import torch

        from engine import LLMEngine
        from engine.loop import EngineLoop
        from kv_transfer.ranks import DecodeKV
        from replica.ranks import start_followers

        torch.set_num_threads(engine_kwargs.get("num_threads") or 1)
        self.kv = DecodeKV(pool_name, kv_backend)
        self.engine = LLMEngine.from_model(
            model, **engine_kwargs, load_tokenizer=False, kv_allocator=self.kv.allocator(),
            rank_launcher=functools.partial(start_followers, role=self.kv.role))
        self.receiver = self.kv.bind(self.engine, lease_s)
        self._streams: dict[str, asyncio.Queue] = {}
        self.tokens_generated = 0
        tp = self.engine.config.options.tensor_parallel_size
        self.peaks = self.measure_peaks(self.engine.runner.device.type, tp, peaks)
        self.loop = EngineLoop(self.engine.step, self.engine.has_unfinished, self._on_step, tick=self._expire,
                               on_error=self._on_error, cost=lambda: self.engine.runner.step_cost)

    async def info(self) -> dict[str, Any]:
        mc = self.engine.config.model_config
        return dict(pid=os.getpid(), pools=self.kv.handles, vocab_size=mc.vocab_size,
                    max_model_len=self.engine.config.max_model_len, num_kv_blocks=self.engine.block_manager.num_blocks,
                    block_size=self.engine.config.options.block_size, model=self.engine.config.model)

    def unlink_pool(self) -> None:
        self.kv.unlink()

    def start_kv_store(self) -> tuple[str, int]:
        return self.kv.start_store()

    async def join_kv_group(self, host: str, port: int, rank: int, world_size: int, prefix: str) -> None:
        """Join the KV group as ranks rank.. rank+TP-1 (returns once every member has); each rank
        then receives its slice of the KV heads."""
        from kv_transfer.ranks import join_group

        await join_group(self.kv.local, self.rank_actors(), host, port, rank, world_size, prefix)
        self.kv.joined(rank, self.rank_actors())

    def tokenizer_files(self) -> dict[str, str] | None:
        from engine.loader import tokenizer_files

        return tokenizer_files(self.engine.config.model)

    async def reserve(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str
                      ) -> Reservation | None:
        """Hold blocks for a prompt a prefill replica will write; None when they are not free now.
        A request the engine cannot take at all raises BadRequest. params: SamplingParams fields."""
        params = self.sampling_params(params)
        self._open(request_id)
        reservation = await self._call(self.receiver.reserve, prompt_token_ids, params, request_id)
        if reservation is None:
            self._streams.pop(request_id, None)
        return reservation

    async def commit(self, request_id: str, first_token: int, logprobs: Logprobs | None) -> None:
        """The prompt's KV has landed and the prefill side sampled the first token: start decoding."""
        from engine.sequence import TokenLogprobs

        lp = TokenLogprobs(logprobs.token_id, logprobs.logprob, logprobs.top) if logprobs is not None else None
        if (r := self.receiver.reservations.get(request_id)) is not None:  # wait off the engine thread
            wait = self.receiver.landing.wait_for_request
            await asyncio.get_running_loop().run_in_executor(
                None, wait, r.transfer_id, r.num_tokens, self.receiver.commit_timeout_s)
        await self._call(self.receiver.commit, request_id, first_token, lp, 0.0)  # landed, or it never will

    async def add_local(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str) -> None:
        """Prefill here too (a short prompt): the stream then starts with the first token."""
        params = self.sampling_params(params)
        self._open(request_id)
        try:
            await self._call(self.engine.add_request, prompt_token_ids, params, request_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise

    async def abort(self, request_id: str) -> bool:
        found = await self._call(self.receiver.abort, request_id)
        self._push([(request_id, StreamItem(finish_reason="abort"))])  # ends a consumer's stream, if any
        self._streams.pop(request_id, None)
        return found

    async def stream(self, request_id: str) -> AsyncIterator[list[StreamItem]]:
        """The request's tokens as they are sampled, in batches of whatever arrived since the last;
        the last item carries the finish reason. A request that ends on an error raises it."""
        q = self._streams.get(request_id)
        if q is None:
            raise BadRequest(f"request {request_id!r} has no reservation or local prefill on this replica",
                             request_id)
        try:
            while True:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                if isinstance(error := items[-1], Exception):
                    if items[:-1]:
                        yield items[:-1]
                    raise error
                yield items
                if items[-1].finish_reason is not None:
                    return
        finally:
            self._streams.pop(request_id, None)

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()
        self.unlink_pool()

    def _on_step(self, finished) -> None:
        items = [(seq.request_id, StreamItem(seq.token_ids[-1], as_logprobs(seq.logprobs[-1])
                                             if seq.params.logprobs is not None else None))
                 for seq in self.engine.sampled]
        self.tokens_generated += len(items)
        items += [(out.request_id, StreamItem(finish_reason=out.finish_reason)) for out in finished]
        if items:
            self._aloop.call_soon_threadsafe(self._push, items)

    def _on_error(self, e: BaseException) -> None:
        """The replica is dead: end every stream with the reason instead of leaving it waiting."""
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._fail_all, e)

    def _expire(self) -> None:
        if expired := self.receiver.expire():
            self._aloop.call_soon_threadsafe(self._push, [(e.request_id, e) for e in expired])

    def _stats(self) -> dict[str, Any]:
        from engine.metrics import engine_stats

        stats = engine_stats(self.engine, self.loop.metrics, self.peaks)
        stats.update(reserved=len(self.receiver.reservations), tokens_processed=self.tokens_generated,
                     leases_expired=self.receiver.num_leases_expired)
        return stats

    def _open(self, request_id: str) -> None:
        self._aloop = self._aloop or asyncio.get_running_loop()
        if request_id in self._streams:
            raise BadRequest(f"request id {request_id!r} is already running on this replica", request_id)
        self._streams[request_id] = asyncio.Queue()

    def _fail_all(self, e: BaseException) -> None:
        self._push([(rid, ReplicaDead(f"request {rid!r}: the decode replica failed ({e!r})", rid))
                    for rid in self._streams])

    def _push(self, items: list[tuple[str, StreamItem | Exception]]) -> None:
        for rid, item in items:
            if (q := self._streams.get(rid)) is not None:
                q.put_nowait(item)
