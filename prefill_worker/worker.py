"""The prefill replica: an engine in the prefill role behind a Ray actor. It runs prompts in
chunked-prefill batches and, layer by layer, writes their KV straight into the blocks a decode
replica reserved; `prefill()` returns the first token once all of a prompt's KV is there.

Ray runs the public methods on the actor's event loop; the engine runs on its own thread
(EngineLoop) and is touched only there. The engine is imported inside the actor, so the process
that starts the cluster (and hosts the router) never imports torch."""
from __future__ import annotations

import asyncio
import dataclasses
import os
from concurrent.futures import Future
from typing import Any

from replica.actor import ReplicaShell


class PrefillWorker(ReplicaShell):
    def __init__(self, model: str, engine_kwargs: dict[str, Any], peaks: dict[str, float] | None = None,
                 kv_backend: str = "ipc") -> None:
        """peaks: peak_flops and peak_bandwidth of the replica for MFU/MBU; measured here when not given.
        kv_backend "ipc": write into decode pools mapped on this host; "collective": send over the
        cluster's KV group (join_kv_group)."""
        import functools

        import torch

        from engine import LLMEngine, SamplingParams
        from engine.loop import EngineLoop
        from replica.ranks import start_followers
        from kv_transfer import KVSender
        from kv_transfer.plan import PrefillRanks
        from kv_transfer.shm import ShmKVSaver

        torch.set_num_threads(engine_kwargs.get("num_threads") or 1)
        self._params = SamplingParams
        self.model = model
        if kv_backend == "ipc":
            make_saver = ShmKVSaver.for_rank
        else:
            from kv_transfer.collective import CollectiveKVSaver as make_saver
        self.engine = LLMEngine.from_model(model, **engine_kwargs, load_tokenizer=False, rank_launcher=functools.partial(
            start_followers, role=PrefillRanks(make_saver)))
        tp = self.engine.config.parallel.tensor_parallel_size
        saver = make_saver(self.engine.config.model_config.num_key_value_heads, 0, tp)
        self.sender = KVSender(self.engine, saver)
        self._pending: dict[str, Future] = {}  # request id -> (first token, logprobs), set on the engine thread
        self.leases_expired = 0
        self.peaks = self.measure_peaks(self.engine.runner.device.type, tp, peaks)
        self.loop = EngineLoop(self.sender.step, self.engine.has_unfinished, self._on_step, tick=self._expire,
                               on_error=self._on_error, cost=lambda: self.engine.runner.step_cost)

    async def info(self) -> dict[str, Any]:
        mc = self.engine.config.model_config
        return dict(pid=os.getpid(), vocab_size=mc.vocab_size, max_model_len=self.engine.config.max_model_len,
                    num_kv_blocks=self.engine.block_manager.num_blocks, eos_token_ids=list(mc.eos_token_ids),
                    model=self.engine.config.model)

    def tokenizer_files(self) -> dict[str, str] | None:
        from engine.loader import tokenizer_files

        return tokenizer_files(self.model)

    async def join_kv_group(self, host: str, port: int, rank: int, world_size: int, prefix: str) -> None:
        """Join the cluster's KV group as ranks rank.. rank+TP-1 (collective backend; returns once
        every member has)."""
        await self._join_kv_group(host, port, rank, world_size, prefix)

    async def attach(self, handles: list[dict[str, Any]]) -> None:
        """Reach the decode replicas' KV pools (PoolHandle fields, one per decode rank): map them
        (ipc) or learn their ranks in the KV group (collective), on every rank of this replica."""
        from kv_transfer.metadata import PoolHandle

        if self.engine.followers is not None:  # before any step sends there
            await asyncio.get_running_loop().run_in_executor(None, self.engine.followers.call, "attach", handles)
        for h in handles:
            await self._call(self.sender.saver.attach, PoolHandle(**h))

    async def prefill(self, prompt_token_ids: list[int], params: dict[str, Any], target: dict[str, Any]
                      ) -> tuple[int, tuple | None]:
        """Prefill the prompt into the blocks of `target` (KVTarget fields); return the first token
        and its logprobs as (token_id, logprob, {token_id: logprob}). params: SamplingParams fields."""
        from kv_transfer.metadata import KVTarget

        params, target = self._params(**params), KVTarget(**target)
        done: Future = Future()
        self._pending[target.request_id] = done
        try:
            await self._call(self.sender.add, prompt_token_ids, params, target)
            return await self._plain(done)
        finally:
            self._pending.pop(target.request_id, None)

    async def abort(self, request_id: str) -> bool:
        """Stop prefilling the request: once this returns, nothing more is written to its blocks."""
        found = await self._call(self.sender.abort, request_id)
        if (fut := self._pending.pop(request_id, None)) is not None and not fut.done():
            from kv_transfer import KVTransferError

            fut.set_exception(KVTransferError(request_id, "aborted"))
        return found

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()

    def _on_step(self, done) -> None:
        for d in done:
            if (fut := self._pending.get(d.target.request_id)) is not None and not fut.done():
                fut.set_result((d.first_token, dataclasses.astuple(d.logprobs) if d.logprobs is not None else None))

    def _expire(self) -> None:
        from kv_transfer import LeaseExpired

        for e in self.sender.expire():
            self.leases_expired += isinstance(e, LeaseExpired)
            if (fut := self._pending.get(e.request_id)) is not None and not fut.done():
                fut.set_exception(e)

    def _on_error(self, e: BaseException) -> None:
        from engine.loop import ReplicaDead

        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(ReplicaDead(f"the prefill replica failed: {e}"))

    def _stats(self) -> dict[str, Any]:
        from engine.metrics import engine_stats

        stats = engine_stats(self.engine, self.loop.metrics, self.peaks)
        stats.update(tokens_processed=stats["tokens"], kv_bytes_sent=self.sender.saver.bytes_sent,
                     leases_expired=self.leases_expired)
        return stats
