"""The decode replica: an engine in the decode role behind a Ray actor. It reserves KV blocks
for prompts prefilled elsewhere (their KV lands straight in its shared-memory pool), admits them
into its continuously batched decode, and streams each sampled token back to the router.

Ray runs the public methods on the actor's event loop; the engine runs on its own thread
(EngineLoop) and is touched only there. The engine is imported inside the actor, so the process
that starts the cluster (and hosts the router) never imports torch."""
from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

from replica.actor import ReplicaShell

# What crosses to the router is plain data (it must unpickle without the engine, hence torch):
# a reservation as KVTarget fields, logprobs as (token_id, logprob, {token_id: logprob}), and
# stream items ("token", token_id, logprobs | None) then, last, ("finish", reason).
Item = tuple


class RanksLanding:
    """KVLanding of a tensor-parallel decode replica on the collective backend: every rank receives
    its own heads, so a transfer has landed when it has on each of them (rank 0's receiver thread
    here, the followers' over Ray)."""

    def __init__(self, local, followers: list) -> None:
        self.local, self.followers = local, followers
        self._everywhere: set[int] = set()  # transfers seen landed on every rank

    def wait_for_request(self, transfer_id: int, num_tokens: int, timeout: float) -> bool:
        import ray

        if transfer_id in self._everywhere:
            return True
        waits = [a.kv_wait.remote(transfer_id, num_tokens, timeout) for a in self.followers]
        here = self.local.wait_for_request(transfer_id, num_tokens, timeout)
        if landed := all(ray.get(waits, timeout=timeout + 10)) and here:
            self._everywhere.add(transfer_id)
        return landed

    def forget(self, transfer_id: int) -> None:
        """After a commit the followers may forget at leisure; after an abort they must have before
        the blocks are reused, so then this waits."""
        import ray

        self.local.forget(transfer_id)
        refs = [a.kv_forget.remote(transfer_id) for a in self.followers]
        if transfer_id in self._everywhere:
            self._everywhere.discard(transfer_id)
        else:
            ray.get(refs, timeout=30)


class DecodeWorker(ReplicaShell):
    def __init__(self, model: str, engine_kwargs: dict[str, Any], pool_name: str, lease_s: float = 30.0,
                 peaks: dict[str, float] | None = None, kv_backend: str = "ipc") -> None:
        """peaks: peak_flops and peak_bandwidth of the replica for MFU/MBU; measured here when not given.
        kv_backend "ipc": the KV pool in shared memory (or CUDA IPC) that prefill replicas on this host
        write into; "collective": a receiver thread takes KV from the cluster's KV group (join_kv_group)."""
        import functools

        import torch

        from engine import LLMEngine, SamplingParams
        from engine.loop import EngineLoop
        from replica.ranks import start_followers
        from kv_transfer import KVReceiver
        from kv_transfer.metadata import PoolHandle
        from kv_transfer.shm import ShmDecodeRanks, rank_pool_handles, shared_pool_allocator

        torch.set_num_threads(engine_kwargs.get("num_threads") or 1)
        self._params = SamplingParams
        handles = []
        self.pool_name = pool_name
        self.kv_backend = kv_backend
        if kv_backend == "ipc":  # each rank keeps its slice of the KV heads in its own shared-memory file
            self.engine = LLMEngine.from_model(
                model, **engine_kwargs, load_tokenizer=False, kv_allocator=shared_pool_allocator(pool_name, handles),
                rank_launcher=functools.partial(start_followers, role=ShmDecodeRanks(pool_name)))
        else:  # each rank receives its slice of the KV heads over the KV group (join_kv_group)
            self.engine = LLMEngine.from_model(model, **engine_kwargs, load_tokenizer=False)
            kv = self.engine.runner.kv_cache
            handles.append(PoolHandle(pool_name, tuple(kv.shape), str(kv.dtype).removeprefix("torch.")))
        tp = self.engine.config.parallel.tensor_parallel_size
        self.handles = [dataclasses.asdict(h) for h in rank_pool_handles(
            pool_name, handles[0], self.engine.config.model_config.num_key_value_heads, tp)]
        self._kv_store = None
        self.receiver = KVReceiver(self.engine, pool_name, lease_s)
        self._streams: dict[str, asyncio.Queue] = {}
        self.tokens_generated = 0
        self.peaks = self.measure_peaks(self.engine.runner.device.type, tp, peaks)
        self.loop = EngineLoop(self.engine.step, self.engine.has_unfinished, self._on_step, tick=self._expire,
                               on_error=self._on_error, cost=lambda: self.engine.runner.step_cost)

    # -- called by the router -------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        mc = self.engine.config.model_config
        return dict(pid=os.getpid(), pools=self.handles, vocab_size=mc.vocab_size,
                    max_model_len=self.engine.config.max_model_len, num_kv_blocks=self.engine.block_manager.num_blocks,
                    block_size=self.engine.config.cache.block_size, model=self.engine.config.model)

    def unlink_pool(self) -> None:
        """Every prefill replica has mapped the pool: drop its names so nothing outlives the actors."""
        from kv_transfer.shm import unlink_pool

        if self.kv_backend == "ipc":
            for h in self.handles:
                unlink_pool(h["name"])

    def start_kv_store(self) -> tuple[str, int]:
        """Host the rendezvous store of the cluster's KV group (collective backend) on this node."""
        import ray
        import torch.distributed as dist

        self._kv_store = dist.TCPStore(ray.util.get_node_ip_address(), 0, is_master=True, wait_for_workers=False)
        return ray.util.get_node_ip_address(), self._kv_store.port

    async def join_kv_group(self, host: str, port: int, rank: int, world_size: int, prefix: str) -> None:
        """Join the KV group as ranks rank.. rank+TP-1 (returns once every member has); each rank
        then receives its slice of the KV heads."""
        thread = await self._join_kv_group(host, port, rank, world_size, prefix)
        followers = self.engine.followers
        self.receiver.landing = thread if followers is None else RanksLanding(thread, followers.actors)
        for i, h in enumerate(self.handles):
            h["kv_rank"] = rank + i

    def tokenizer_files(self) -> dict[str, str] | None:
        from engine.loader import tokenizer_files

        return tokenizer_files(self.engine.config.model)

    async def reserve(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str
                      ) -> dict[str, Any] | None:
        """Hold blocks for a prompt a prefill replica will write; None when they are not free now.
        A request the engine cannot take at all raises ValueError. params: SamplingParams fields."""
        params = self._params(**params)
        self._open(request_id)
        target = await self._call(self.receiver.reserve, prompt_token_ids, params, request_id)
        if target is None:
            self._streams.pop(request_id, None)
            return None
        return dataclasses.asdict(target)

    async def commit(self, request_id: str, first_token: int, logprobs: tuple | None) -> None:
        """The prompt's KV has landed and the prefill side sampled the first token: start decoding."""
        from engine.sequence import TokenLogprobs

        lp = TokenLogprobs(*logprobs) if logprobs is not None else None
        if (r := self.receiver.reservations.get(request_id)) is not None:  # wait off the engine thread
            wait = self.receiver.landing.wait_for_request
            await asyncio.get_running_loop().run_in_executor(
                None, wait, r.transfer_id, r.num_tokens, self.receiver.commit_timeout_s)
        await self._call(self.receiver.commit, request_id, first_token, lp, 0.0)  # landed, or it never will

    async def add_local(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str) -> None:
        """Prefill here too (a short prompt): the stream then starts with the first token."""
        params = self._params(**params)
        self._open(request_id)
        try:
            await self._call(self.engine.add_request, prompt_token_ids, params, request_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise

    async def abort(self, request_id: str) -> bool:
        found = await self._call(self.receiver.abort, request_id)
        self._push([(request_id, ("finish", "abort"))])  # ends a consumer's stream, if there is one
        self._streams.pop(request_id, None)
        return found

    async def stream(self, request_id: str) -> AsyncIterator[list[Item]]:
        """The request's tokens as they are sampled, in batches of whatever arrived since the last."""
        q = self._streams.get(request_id)
        if q is None:
            raise ValueError(f"request {request_id!r} has no reservation or local prefill on this replica")
        try:
            while True:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                yield items
                if items[-1][0] == "finish":
                    return
        finally:
            self._streams.pop(request_id, None)

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()
        self.unlink_pool()

    # -- on the engine thread --------------------------------------------------------------------
    def _on_step(self, finished) -> None:
        items = [(seq.request_id, ("token", seq.token_ids[-1], dataclasses.astuple(seq.logprobs[-1])
                                   if seq.params.logprobs is not None else None)) for seq in self.engine.sampled]
        self.tokens_generated += len(items)
        items += [(out.request_id, ("finish", out.finish_reason)) for out in finished]
        if items:
            self._aloop.call_soon_threadsafe(self._push, items)

    def _on_error(self, e: BaseException) -> None:
        """The replica is dead: end every stream with the reason instead of leaving it waiting."""
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._fail_all, f"error: {e}")

    def _expire(self) -> None:
        if expired := self.receiver.expire():
            self._aloop.call_soon_threadsafe(self._push, [(e.request_id, ("finish", "abort")) for e in expired])

    def _stats(self) -> dict[str, Any]:
        from engine.metrics import engine_stats

        stats = engine_stats(self.engine, self.loop.metrics, self.peaks)
        stats.update(reserved=len(self.receiver.reservations), tokens_processed=self.tokens_generated,
                     leases_expired=self.receiver.num_leases_expired)
        return stats

    # -- on the actor's event loop --------------------------------------------------------------
    def _open(self, request_id: str) -> None:
        self._aloop = self._aloop or asyncio.get_running_loop()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running on this replica")
        self._streams[request_id] = asyncio.Queue()

    def _fail_all(self, reason: str) -> None:
        self._push([(rid, ("finish", reason)) for rid in self._streams])

    def _push(self, items: list[tuple[str, Item]]) -> None:
        for rid, item in items:
            if (q := self._streams.get(rid)) is not None:
                q.put_nowait(item)
