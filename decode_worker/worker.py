"""The decode replica: an engine in the decode role behind a Ray actor. It reserves KV blocks
for prompts prefilled elsewhere (their KV lands straight in its pool, kv_transfer.ranks.DecodeKV),
admits them into its continuously batched decode, and sends what each engine step sampled back
to the router: one message a step carrying every request's StreamItems (events()), not a stream
per request.

Ray runs the public methods on the actor's event loop; the engine runs on its own thread
(EngineLoop) and is touched only there. The engine is imported inside the actor, so the process
that starts the cluster (and hosts the router) never imports torch."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from replica.actor import ReplicaShell, as_logprobs
from replica.contract import BadRequest, Logprobs, ReplicaDead, Reservation, StreamItem


class Events:
    """The replica's outgoing StreamItems, for one subscriber at a time: a new subscription (the router's, again
    after its stream broke) takes over, and the one before it stops before it takes anything more. Made on the
    actor's event loop."""

    def __init__(self) -> None:
        self._batches: list[list[StreamItem]] = []
        self._ready = asyncio.Event()
        self._subscriber = 0  # the newest subscription's number

    def push(self, items: list[StreamItem]) -> None:
        self._batches.append(items)
        self._ready.set()

    async def subscribe(self) -> AsyncIterator[list[StreamItem]]:
        """Everything pushed since the last batch taken, as one list per wake-up, until a newer subscription."""
        me = self._subscriber = self._subscriber + 1
        while True:
            await self._ready.wait()
            if self._subscriber != me:
                return  # superseded: what is waiting is the newer one's
            items = [it for batch in self._batches for it in batch]
            self._batches.clear()
            self._ready.clear()
            yield items


class DecodeWorker(ReplicaShell):
    """Called at start-up by kv_transfer.wiring (info, start_kv_store, join_kv_pair),
    then by the router (events, once; reserve, commit, add_local, abort per request); the _on_*
    methods run on the engine thread, the rest on the actor's event loop."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], pool_name: str, lease_s: float = 30.0,
                 peaks: dict[str, float] | None = None, kv_backend: str = "ipc", cpus: tuple[int, ...] | None = None,
                 service_cpus: tuple[int, ...] | None = None) -> None:
        """peaks: peak_flops and peak_bandwidth of the replica for MFU/MBU; measured (measure_peaks) when not
        given. cpus, service_cpus: the cores of its engine thread and of its other threads (None: the OS's
        choice; ReplicaShell._start_engine).
        kv_backend "ipc": each rank's slice of the KV pool in shared memory (or CUDA IPC) that prefill
        replicas on this host write into; "collective": each rank receives its slice over a pair group
        with each prefill replica (join_kv_pair)."""
        import functools

        from engine import LLMEngine
        from kv_transfer.ranks import DecodeKV
        from replica.ranks import start_followers

        self.kv = DecodeKV(pool_name, kv_backend)
        self._open: set[str] = set()  # requests whose stream has not ended yet
        self.kv_bytes_saved = 0  # KV of reserved prompts not sent here: the prefix cache held it
        self._events: Events | None = None  # made on the actor's event loop
        self.tokens_generated = 0

        def build():
            self.engine = LLMEngine.from_model(
                model, **engine_kwargs, load_tokenizer=False, kv_allocator=self.kv.allocator(),
                rank_launcher=functools.partial(start_followers, role=self.kv.role))
            self.receiver = self.kv.bind(self.engine, lease_s, self.rank_actors())
            if peaks:  # else the shell's zeros until measure_peaks
                self.peaks = peaks
            return self.engine.step
        self._start_engine(build, engine_kwargs.get("num_threads"), cpus, service_cpus)

    async def info(self) -> dict[str, Any]:
        # pool: the replica's KV pool name; pools: every rank's slice of it
        return {**await super().info(), "pool": self.kv.pool, "pools": self.kv.handles}

    def unlink_pool(self) -> None:
        self.kv.unlink()

    def start_kv_store(self) -> tuple[str, int]:
        return self.kv.start_store()

    async def join_kv_pair(self, host: str, port: int, prefill_uid: int, prefill_tp: int, prefix: str) -> None:
        """Form the pair group with prefill replica `prefill_uid` (its TP prefill_tp), this replica's
        ranks first (returns once every member has joined); each rank then receives its slice of the
        KV heads from it."""
        from kv_transfer.ranks import join_pair

        tp = self.engine.config.options.tensor_parallel_size
        await join_pair(self.kv.local, self.rank_actors(), host, port, 0, tp + prefill_tp, prefix, str(prefill_uid))

    async def drop_kv_pair(self, prefill_uid: int, why: str) -> None:
        """Stop receiving from prefill replica `prefill_uid` (it died or left its pool) on every rank: its pair
        group is aborted (collective backend: kv_transfer.collective's watchdog); nothing to do on ipc."""
        if self.kv.local is None or self.kv.local.receiver is None:
            return
        self.kv.local.drop_pair(str(prefill_uid), why)
        await asyncio.gather(*(a.kv.remote("drop_pair", str(prefill_uid), why) for a in self.rank_actors()))

    async def reserve(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str,
                      local_below: int = 0) -> Reservation | None:
        """Hold blocks for a prompt a prefill replica will write (those of its prefix this replica's
        cache holds are shared, and not sent); None when they are not free now. A prompt with fewer than
        local_below tokens left uncached is prefilled here instead (Reservation.local: its stream starts
        with the first token). A request the engine cannot take at all raises BadRequest. params:
        SamplingParams fields."""
        params = self.sampling_params(params)
        self._start(request_id)
        try:
            reservation = await self._call(self.receiver.reserve, prompt_token_ids, params, request_id, local_below)
        except BaseException:
            self._open.discard(request_id)
            raise
        if reservation is None:
            self._open.discard(request_id)
        elif not reservation.local:
            self.kv_bytes_saved += int(reservation.num_cached_tokens * self.engine.runner.cost.kv_bytes_per_token)
        return reservation

    async def commit(self, request_id: str, first_token: int, logprobs: Logprobs | None) -> None:
        """The prompt's KV has landed and the prefill side sampled the first token: start decoding."""
        from engine.sequence import TokenLogprobs

        lp = TokenLogprobs(logprobs.token_id, logprobs.logprob, logprobs.top) if logprobs is not None else None
        with self._ranks_alive(request_id):
            if (r := self.receiver.reservations.get(request_id)) is not None:  # wait off the engine thread
                wait = self.receiver.landing.wait_for_request
                await asyncio.get_running_loop().run_in_executor(
                    None, wait, r.transfer_id, r.num_tokens, self.receiver.commit_timeout_s)
            await self._call(self.receiver.commit, request_id, first_token, lp, 0.0)  # landed, or it never will

    async def add_local(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str) -> None:
        """Prefill here too (a short prompt): the stream then starts with the first token."""
        params = self.sampling_params(params)
        self._start(request_id)
        try:
            await self._call(self.engine.add_request, prompt_token_ids, params, request_id)
        except BaseException:
            self._open.discard(request_id)
            raise

    async def abort(self, request_id: str) -> bool:
        """End the request here and free its blocks; its stream ends without a last item (the
        router, which asked, no longer reads it)."""
        try:
            with self._ranks_alive(request_id):
                return await self._call(self.receiver.abort, request_id)
        finally:
            self._open.discard(request_id)

    @contextlib.contextmanager
    def _ranks_alive(self, request_id: str):
        """Around a call that reaches the replica's other ranks (a transfer's landing on each): a rank
        found dead means the replica is, as when a step finds it (its engine loop ends, its streams fail,
        the supervisor replaces it): ReplicaDead, not the rank actor's error."""
        from ray.exceptions import RayActorError

        try:
            yield
        except RayActorError as e:
            self.loop.fail(e)
            raise ReplicaDead(f"request {request_id!r}: a rank of the decode replica died ({e!r})", request_id) from e

    async def events(self) -> AsyncIterator[list[StreamItem]]:
        """Every request's stream, for the router's one subscription: a message per engine step
        (or per several, when the router falls behind) with each request's new tokens, and a
        request's last item when it ends (a finish reason, or the error that ended it)."""
        async for items in self._queue().subscribe():
            yield items

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()
        self.unlink_pool()

    def _on_step(self, finished) -> None:
        # a prompt prefilled here says with its first token how much of it came from the prefix cache
        items = [StreamItem(seq.request_id, seq.token_ids[-1], as_logprobs(seq.logprobs[-1])
                            if seq.params.logprobs is not None else None,
                            num_cached_tokens=seq.num_cached_tokens if seq.num_output_tokens == 1 else 0)
                 for seq in self.engine.sampled]
        self.tokens_generated += len(items)
        items += [StreamItem(out.request_id, finish_reason=out.finish_reason) for out in finished]
        if items:
            self._aloop.call_soon_threadsafe(self._push, items)

    def _on_error(self, e: BaseException) -> None:
        """The replica is dead: end every stream with the reason instead of leaving it waiting."""
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._fail_all, e)

    def _expire(self) -> None:
        if expired := self.receiver.expire():
            self._aloop.call_soon_threadsafe(self._push, [StreamItem(e.request_id, error=e) for e in expired])

    def _stats(self) -> dict[str, Any]:
        from engine.metrics import engine_stats

        stats = engine_stats(self.engine, self.loop.metrics, self.peaks)
        stats.update(reserved=len(self.receiver.reservations), tokens_processed=self.tokens_generated,
                     leases_expired=self.receiver.num_leases_expired, kv_bytes_saved=self.kv_bytes_saved)
        return stats

    def _start(self, request_id: str) -> None:
        self._aloop = self._aloop or asyncio.get_running_loop()
        if self.loop.error is not None:  # a dead engine takes nothing: the router moves the request elsewhere
            raise ReplicaDead(f"request {request_id!r}: the engine loop died: {self.loop.error!r}", request_id)
        if request_id in self._open:
            raise BadRequest(f"request id {request_id!r} is already running on this replica", request_id)
        self._open.add(request_id)

    def _queue(self) -> Events:
        if self._events is None:
            self._events = Events()
        return self._events

    def _fail_all(self, e: BaseException) -> None:
        self._push([StreamItem(rid, error=ReplicaDead(f"request {rid!r}: the decode replica failed ({e!r})", rid))
                    for rid in self._open])

    def _push(self, items: list[StreamItem]) -> None:
        """Send the items of requests whose stream is open; a request's last item closes it."""
        items = [it for it in items if it.request_id in self._open]
        for it in items:
            if it.last:
                self._open.discard(it.request_id)
        if items:
            self._queue().push(items)
