"""What the prefill and decode workers share as Ray actors around an engine: calls handed to
the engine's thread, load and utilization answered on the actor's own thread, the replica's
ranks, and the one place where what the engine raises becomes the contract's error family."""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from typing import Any

from replica.contract import BadRequest, Logprobs, ReplicaDead, ReplicaError


def as_replica_error(e: BaseException) -> BaseException:
    """The engine's errors as the contract's family: its ValueError is a BadRequest, a dead engine
    loop (engine.loop.EngineDead) a ReplicaDead. kv_transfer raises the family itself."""
    from engine.loop import EngineDead

    if isinstance(e, ReplicaError):
        return e
    if isinstance(e, ValueError):
        return BadRequest(str(e))
    if isinstance(e, EngineDead):
        return ReplicaDead(str(e))
    return e


def as_logprobs(lp) -> Logprobs | None:
    """The engine's TokenLogprobs (or None) as the contract's Logprobs."""
    return Logprobs(lp.token_id, lp.logprob, lp.top) if lp is not None else None


class ReplicaShell:
    """Subclasses start their engine with _start_engine (which sets self.loop; their build sets
    self.engine and self.peaks), and define _stats(), _on_step, _expire and _on_error."""
    _aloop: asyncio.AbstractEventLoop | None = None
    _cache_epoch = 0  # prefix-cache reports made (cache_report)
    peaks: dict[str, float] = {"peak_flops": 0.0, "peak_bandwidth": 0.0}  # MFU/MBU 0 until measure_peaks

    async def measure_peaks(self) -> dict[str, float]:
        """Measure this replica's peak_flops and peak_bandwidth (where none were configured) on its engine
        thread, for the path its steps take and the weights they read (engine.metrics.measure_peaks),
        this rank's times the ranks. The cluster asks each replica in turn once all are loaded, so no
        replica's probe shares the memory bus with another's (or with a load): a probe that does reads
        low, and MBU high. Returns the peaks."""
        if not self.peaks.get("peak_flops"):
            self.peaks = await self._call(self._measure_peaks)
        return self.peaks

    def _measure_peaks(self) -> dict[str, float]:
        from engine.metrics import measure_peaks

        runner, tp = self.engine.runner, self.engine.config.options.tensor_parallel_size
        tiles = any(getattr(m, "weight_amx", None) is not None for m in runner.model.modules())
        measured = measure_peaks(runner.device.type, tiles=tiles, read_bytes=int(runner.cost.weight_bytes / tp))
        return {k: v * tp for k, v in measured.items()}

    async def info(self) -> dict[str, Any]:
        """What the cluster's start-up needs to know of the replica (and a sign that it is built)."""
        config = self.engine.config
        mc = config.model_config
        return dict(pid=os.getpid(), vocab_size=mc.vocab_size, max_model_len=config.max_model_len,
                    num_kv_blocks=self.engine.block_manager.num_blocks, block_size=config.options.block_size,
                    eos_token_ids=list(mc.eos_token_ids), model=config.model, kernels=self.kernels())

    async def cpu_affinity(self) -> dict[str, Any]:
        """The cores this replica's threads may run on: its engine thread's ("engine"), and each distinct mask
        of its other threads ("others"), as sorted lists (replica/affinity.py sets them where configured)."""
        from replica.affinity import thread_masks

        masks = thread_masks()
        engine = masks.pop(self.loop.native_id)
        return {"engine": engine, "others": sorted({tuple(m) for m in masks.values()})}

    def kernels(self) -> str:
        """The path this replica's forward takes, and why (a CPU without AMX takes the portable one)."""
        from engine.layers.gemm import matmul_path

        return f"{self.engine.runner.stack_path}; matmuls: {matmul_path(self.engine.runner.model)}"

    def tokenizer_files(self) -> dict[str, str] | None:
        """The model's tokenizer as text, for the router (which has no engine)."""
        from engine.loader import tokenizer_files

        return tokenizer_files(self.engine.config.model)

    def rank_actors(self) -> list:
        """Ranks 1..n-1 of this replica (Ray actor handles; empty at TP 1)."""
        return list(self.engine.followers.actors) if self.engine.followers is not None else []

    async def stats(self, cache_epoch: int | None = None, with_cache: bool = False) -> dict[str, Any]:
        """Load and utilization, read on the actor's thread: a long step never delays the answer, so
        a replica that does not answer is really down. with_cache: also what changed in the prefix
        cache since the report of cache_epoch ("prefix_cache": see cache_report), for the router's index."""
        if self.loop.error is not None:
            raise ReplicaDead(f"the engine loop died: {self.loop.error!r}")
        stats = self._stats()
        if with_cache and (report := self.cache_report(cache_epoch)) is not None:
            stats["prefix_cache"] = report
        return stats

    def cache_report(self, epoch: int | None) -> dict[str, Any] | None:
        """The prefix cache's keys for the router's index (router/cache_index.py), read on the actor's
        thread: the changes since report `epoch` in order ("events": (added, key) pairs), or every key
        ("full") when the caller has not applied that report (or none yet). Each report has the next
        epoch; None when the engine caches nothing."""
        bm = self.engine.block_manager
        if not bm.enable_caching:
            return None
        events = bm.record_events()  # from now on every change is logged
        base = self._cache_epoch
        self._cache_epoch += 1
        if epoch is None or epoch != base:
            events.clear()  # what they said is in the full set below, which is read after
            while True:
                try:
                    keys = list(bm.cached_blocks)  # the engine's thread may change it meanwhile: then again
                    break
                except RuntimeError:
                    continue
            return dict(epoch=self._cache_epoch, base=base, full=True, keys=keys, events=[])
        changes = [events.popleft() for _ in range(len(events))]
        return dict(epoch=self._cache_epoch, base=base, full=False, keys=[], events=changes)

    @staticmethod
    def sampling_params(params: dict[str, Any]):
        """The router's SamplingParams fields as the engine's SamplingParams; bad ones a BadRequest."""
        from engine import SamplingParams

        try:
            return SamplingParams(**params)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"sampling parameters: {e}") from None

    def _start_engine(self, build, num_threads: int | None, cpus: tuple[int, ...] | None = None,
                      service_cpus: tuple[int, ...] | None = None) -> None:
        """Run build() on a new engine thread (self.loop), which then steps what build() made:
        loading and stepping on one thread keeps one OpenMP team (engine.loop.EngineLoop). build()
        sets self.engine (and whatever else the replica needs) and returns the step function; the
        loop hands each step's result to self._on_step, ticks self._expire, and reports a dead
        engine to self._on_error. cpus: the engine thread's cores (its OpenMP team, started from it,
        inherits them); service_cpus: every thread of the process there is now (threads they start
        inherit it) -- so the engine keeps its cores to itself (replica/affinity.py)."""
        import torch

        from engine.loop import EngineLoop
        from replica.affinity import pin, pin_process

        # the engine thread's cores: the pool's, else (its process moving to service_cpus) the process's before
        engine_cpus = cpus or (tuple(os.sched_getaffinity(0)) if service_cpus else None)
        if service_cpus:
            pin_process(service_cpus, "service_cpus")

        def on_thread():
            if engine_cpus:
                pin(0, engine_cpus, "cpus")
            torch.set_num_threads(num_threads or 1)
            return build()

        self.loop = EngineLoop(on_error=self._on_error)
        try:
            step = self.loop.call(on_thread).result()
            self.loop.bind(step, self.engine.has_unfinished, self._on_step, self._expire,
                           lambda: self.engine.runner.step_cost)
        except BaseException:
            self.loop.stop()
            raise

    async def _call(self, fn, *args):
        """fn(*args) on the engine's thread, between steps."""
        self._aloop = self._aloop or asyncio.get_running_loop()
        return await self._result(self.loop.call(fn, *args))

    @staticmethod
    async def _result(fut: Future):
        """Await a future of the engine's thread; its error as the contract's family."""
        try:
            return await asyncio.wrap_future(fut)
        except Exception as e:
            raise as_replica_error(e) from None
