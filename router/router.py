"""The router's gRPC service: validate and admit a request, place it (placement.py: reserve ->
prefill -> commit), stream its tokens back as text (stream.py), and end it with a status. It holds
Ray actor handles, never tensors (no torch in this process)."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc
from replica.contract import StreamItem
from router.admission import Admission, QueueFull
from router.auth import Keys, Unauthenticated
from router.cache_index import Prompt
from router.dispatch import Load, SloAware
from router.metrics import RouterMetrics
from router.placement import Placed, Placement, Replica, RequestFailed, call, replica_error
from router.stream import Clock, Inboxes, Output
from router.tokenizer import Tokenizer
from router.traffic import Traffic, Window
from router.validate import DEFAULT_MAX_TOKENS, InvalidRequest, Limits, Validated, validate

log = logging.getLogger("pdserve.router")

MAX_REPLICAS = 64  # per pool, as a sanity bound on Scale
# what a request may be continued elsewhere after: its replica died, its KV was lost or its lease ended
MIGRATABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


@dataclass
class _Request:
    """A request in flight: where it runs, how far it got, and whether Cancel ended it. Its id is
    the client's, scoped to its owner (router/auth.py); the replicas know it by placed.rid, the
    client's id with a serial number of the router's (`rid~n`)."""
    placed: Placed
    clock: Clock
    cancelled: bool = False  # by the Cancel RPC
    # its last chunk is out with the caller (a gRPC write, say): a Cancel then only marks it, and the request
    # ends itself when the caller asks for more, so that the task is never cancelled inside the caller's code
    # (a gRPC stream cancelled mid-write ended with no status, and the client waited for it)
    handed_out: bool = False


class Router(pb_grpc.GenerationServicer):
    def __init__(self, prefill: list[Replica], decode: list[Replica], tokenizer: Tokenizer | None,
                 limits: Limits, config, kv_backend: str = "ipc", model_name: str = "default",
                 slo_aware: SloAware | None = None) -> None:
        self.placement = Placement(prefill, decode, config.prefill_policy, config.decode_policy)
        self.tokenizer = tokenizer
        self.limits = limits
        self.config = config  # pdserve.config.RouterConfig
        self.slo_aware = slo_aware  # config.dispatch "slo_aware": the predictions that place each prompt (the
        # supervisor's tuner swaps it for one with another rule)
        self.kv_backend = kv_backend
        self.model_name = model_name
        self.admission = Admission(config.max_ongoing_requests, config.max_queued_requests)
        self.metrics = RouterMetrics(model_name, lambda: self.placement.replicas, config.ttft_slo_s,
                                     config.tpot_slo_s)
        self.metrics.in_flight.set_function(lambda: self.admission.ongoing)
        self.metrics.queued.set_function(lambda: self.admission.queued)
        if slo_aware is not None:
            self.metrics.dispatch_rule(slo_aware.rule)
        self.keys = Keys(config.keys())
        self.requests: dict[tuple[str, str], tuple[_Request, asyncio.Task]] = {}  # (owner, request id) ->
        self._serial = itertools.count()  # makes the id the replicas know each request by its own
        self.inboxes = Inboxes()
        self.traffic = Traffic()  # arrivals and lengths, which the autoscaler and the dispatch tuner plan for
        self._tasks: list[asyncio.Task] = []
        self._pumps: dict[int, asyncio.Task] = {}  # id(decode replica) -> its event pump
        self.scaler = None  # pdserve.supervisor.Supervisor.scale(pool, replicas, drain_timeout_s), when it can
        self.shutting_down = False  # draining the whole cluster: no new requests

    def start(self) -> None:
        """Poll the replicas' stats, and subscribe once to each decode replica's events."""
        self._tasks = [asyncio.get_running_loop().create_task(self._poll_stats())]
        for d in self.placement.decode:
            self._pumps[id(d)] = asyncio.get_running_loop().create_task(self.inboxes.pump(d))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._pumps.values()]:
            task.cancel()

    async def _poll_stats(self, every_s: float = 0.25) -> None:
        while True:
            await self.placement.refresh_stats()
            await asyncio.sleep(every_s)

    async def owner(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's key (or, with no keys configured, its connection); a missing or wrong key
        ends the call UNAUTHENTICATED."""
        metadata = dict(context.invocation_metadata() or ())
        try:
            return self.keys.owner(metadata.get("authorization"), f"peer {context.peer()}")
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        owner = await self.owner(context)
        try:
            async for chunk in self.generate(request, owner=owner):
                yield chunk
        except RequestFailed as e:
            await context.abort(e.code, str(e))

    async def generate(self, request: pb.GenerateRequest, default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
                       owner: str = "") -> AsyncIterator[pb.GenerateResponse]:
        """One request's whole path, for both front doors (gRPC here, HTTP in router/http.py):
        validate, admit, place, stream. Raises RequestFailed with the status the client gets. The
        caller's task is the request's: cancelling it (the client left, Cancel) ends the request.
        Its id is scoped to `owner`: only the same owner can cancel it or collide with it."""
        clock = Clock()
        rid = request.request_id or uuid.uuid4().hex
        m = self.metrics
        try:
            v = validate(request, self.tokenizer, self.limits, default_max_tokens)
        except InvalidRequest as e:
            m.request_done("INVALID_ARGUMENT", None, time.monotonic() - clock.t0, 0)
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if self.shutting_down:
            m.request_done("UNAVAILABLE", None, time.monotonic() - clock.t0, 0)
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the cluster is shutting down; no new requests")
        key = (owner, rid)
        if key in self.requests:
            m.request_done("ALREADY_EXISTS", None, time.monotonic() - clock.t0, 0)
            raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already running")
        self.traffic.arrived(len(v.prompt_token_ids), v.params["max_tokens"])  # what the autoscaler plans for
        # the replicas know each request by an id of its own: one that reuses a finished request's id (another
        # owner's, or a retry) must not meet what is left of that one there (its abort not yet taken, its last
        # tokens still on their way to the router)
        replica_id = f"{rid}~{next(self._serial)}"
        req = _Request(Placed(replica_id), clock)
        # registered before it queues, so that Cancel reaches a queued request and a duplicate id is refused
        self.requests[key] = (req, asyncio.current_task())
        admitted = False
        error: RequestFailed | None = None
        status = "CANCELLED"  # unless it ends otherwise: the client went away or its deadline passed
        try:
            try:
                await self.admission.enter()
            except QueueFull as e:
                m.refused.inc()
                raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            admitted = True
            async for chunk in self._migrating(req, rid, clock, v):
                req.handed_out = True
                yield chunk
                req.handed_out = False
                if req.cancelled:
                    raise asyncio.CancelledError
            status = "OK"
        except RequestFailed as e:
            error, status = e, e.code.name
        except asyncio.CancelledError:
            if not req.cancelled:
                raise  # the client went away or its deadline passed: its call is over
            error = RequestFailed(grpc.StatusCode.CANCELLED, f"request {rid!r} was cancelled")
        finally:
            del self.requests[key]
            m.request_done(status, clock.ttft, time.monotonic() - clock.t0, clock.num_tokens)
            self.traffic.finished(len(v.prompt_token_ids), clock.num_tokens)
            if admitted:
                self.inboxes.close(req.placed.rid)
                self.admission.exit()
                await asyncio.shield(self.placement.release(req.placed))
        if error is not None:
            raise error

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        """Cancel a running or queued request of the caller's own (another key's or connection's
        request with the same id is not touched: False)."""
        owner = await self.owner(context)
        return pb.CancelResponse(cancelled=self.cancel(owner, request.request_id))

    def cancel(self, owner: str, rid: str) -> bool:
        entry = self.requests.get((owner, rid))
        if entry is None:
            return False
        req, task = entry
        req.cancelled = True
        if not req.handed_out:
            task.cancel()
        return True

    def serving(self) -> bool:
        """Some path can serve a request: a decode replica is up (it can prefill too)."""
        return not self.shutting_down and any(r.serves for r in self.placement.decode)

    async def add_replica(self, role: str, actor, tensor_parallel_size: int, num_kv_blocks: int,
                          kv_tokens: int, block_size: int = 16) -> None:
        """A new replica (pdserve.supervisor grew the pool, its KV wired): into placement. kv_tokens:
        the most tokens one sequence can have there (a prefill pool grown from 0 sets the limit)."""
        if role == "prefill" and self.limits.prefill_kv_tokens is None:
            self.limits = dataclasses.replace(self.limits, prefill_kv_tokens=kv_tokens)
        pool = getattr(self.placement, role)
        replica = Replica(role, len(pool), actor, tensor_parallel_size,
                          free_blocks=num_kv_blocks if role == "decode" else 0, block_size=block_size)
        pool.append(replica)
        if role == "decode":
            self._pumps[id(replica)] = asyncio.get_running_loop().create_task(self.inboxes.pump(replica))

    async def drain(self, replica: Replica, timeout_s: float) -> int:
        """Take `replica` out of placement and wait up to timeout_s for its requests to finish;
        returns how many are still on it (they move elsewhere once it is stopped: remove_replica)."""
        replica.draining = True
        deadline = time.monotonic() + timeout_s
        while (left := self.placement.running_on(replica, [r.placed for r, _ in self.requests.values()])) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return left

    async def swap_replicas(self, role: str, i: int, j: int) -> None:
        """Replicas i and j of pool `role` trade places and indexes (so names: a shrinking pool gives up its
        last, pdserve.supervisor)."""
        pool = getattr(self.placement, role)
        pool[i], pool[j] = pool[j], pool[i]
        pool[i].index, pool[j].index = i, j

    async def remove_replica(self, replica: Replica) -> None:
        """The drained replica was stopped: requests still on it move elsewhere; it leaves the pool."""
        self.inboxes.fail(replica, f"{replica.name} left the pool before they finished")
        if (pump := self._pumps.pop(id(replica), None)) is not None:
            pump.cancel()
        getattr(self.placement, replica.role).remove(replica)

    async def observed(self, window_s: float) -> tuple[Window, dict[str, int], dict[str, int]]:
        """For the autoscaler (on the loop, so nothing moves while it reads): the traffic of the last window_s,
        the requests on each pool now, and each pool's replicas."""
        pools = {"prefill": self.placement.prefill, "decode": self.placement.decode}
        return (self.traffic.window(window_s), {k: sum(r.in_flight for r in v) for k, v in pools.items()},
                {k: len(v) for k, v in pools.items()})

    async def drain_all(self, timeout_s: float) -> int:
        """Shutting down: refuse new requests (health NOT_SERVING) and wait up to timeout_s for
        those admitted to finish; returns how many had not."""
        self.shutting_down = True
        deadline = time.monotonic() + timeout_s
        while (left := self.admission.ongoing + self.admission.queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return left

    async def Scale(self, request: pb.ScaleRequest, context) -> pb.ScaleResponse:
        await self.owner(context)
        if self.scaler is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this cluster cannot scale: it was started without a supervisor")
        if request.pool not in ("prefill", "decode") or request.replicas > MAX_REPLICAS \
                or request.pool == "decode" and request.replicas < 1 \
                or not (math.isfinite(request.drain_timeout_s) and request.drain_timeout_s >= 0):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"scale pool={request.pool!r} to "
                                f"{request.replicas} (drain_timeout_s={request.drain_timeout_s}): the pool is "
                                f"'prefill' (0..{MAX_REPLICAS} replicas) or 'decode' (1..{MAX_REPLICAS}), "
                                f"drain_timeout_s finite and >= 0")
        timeout = request.drain_timeout_s or self.config.drain_timeout_s
        try:
            size, added, removed = await asyncio.to_thread(self.scaler, request.pool, request.replicas, timeout)
        except Exception as e:  # noqa: BLE001 - e.g. Ray cannot place another replica
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"scaling {request.pool} to {request.replicas} "
                                f"failed: {e}")
        return pb.ScaleResponse(replicas=size, added=added, removed=removed)

    async def replaced(self, replica: Replica, actor, num_kv_blocks: int) -> None:
        """pdserve.supervisor built `actor` in place of `replica`'s dead one and wired its KV: back into
        placement (a decode replica's event stream is subscribed again by its pump)."""
        replica.actor, replica.stats, replica.queued_tokens = actor, {}, 0
        replica.cache.clear()
        replica.restarts += 1
        if replica.role == "decode":
            replica.free_blocks = num_kv_blocks
        replica.healthy = True

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        """max_model_len: the most tokens (prompt + output) a request can have, the decode pool's KV counted."""
        await self.owner(context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=self.model_name, max_model_len=self.limits.context, vocab_size=self.limits.vocab_size)])

    async def ClusterStatus(self, request, context) -> pb.ClusterStatusResponse:
        await self.owner(context)
        await self.placement.refresh_stats()
        pools = []
        for role, replicas in (("prefill", self.placement.prefill), ("decode", self.placement.decode)):
            pools.append(pb.PoolStatus(role=role, replicas=[pb.ReplicaStatus(
                index=r.index, tensor_parallel_size=r.tensor_parallel_size, healthy=r.healthy, restarts=r.restarts,
                **{k: r.stats[k] for k in ("running", "waiting", "waiting_prefill_tokens", "kv_blocks_used",
                                           "kv_blocks_total", "busy_fraction", "tokens_processed", "mfu", "mbu",
                                           "prefix_cache_queries", "prefix_cache_hits", "kv_bytes_saved",
                                           "kv_bytes_sent")
                   if k in r.stats})
                for r in replicas]))
        return pb.ClusterStatusResponse(model=self.model_name, kv_backend=self.kv_backend, pools=pools,
                                        requests_in_flight=self.admission.ongoing,
                                        requests_queued=self.admission.queued)

    async def _migrating(self, req: _Request, rid: str, clock: Clock, v: Validated):
        """Run the request; when the replica running it dies (or its KV is lost), continue it on a
        live path: the prompt plus every token already streamed becomes the prompt, with the budget
        left. Sampling is a pure function of (seed, position, logits) and the router fixes the seed
        up front, so the continuation gives exactly the tokens the dead replica would have: the
        client's stream goes on with no token missing or repeated. At most router.max_migrations."""
        out = Output(rid, self.tokenizer, v.stop, v.prompt_token_ids)
        ids, params = v.prompt_token_ids, v.params
        if params.get("seed") is None:
            params = {**params, "seed": random.getrandbits(63)}
        for attempt in itertools.count():
            inbox = self.inboxes.open(req.placed)
            try:
                async for chunk in self._generate(req.placed, out, clock, ids, params, inbox, len(v.prompt_token_ids)):
                    yield chunk
                return
            except RequestFailed as e:
                if e.code not in MIGRATABLE or attempt >= self.config.max_migrations:
                    raise
                cause = e
            await asyncio.shield(self.placement.release(req.placed))
            self.inboxes.close(req.placed.rid)
            done = len(out.token_ids)
            if done and self.limits.ends_request(out.token_ids[-1], v.params):
                # the last token streamed was an end (end-of-sequence, a stop token; the prefill side's first, or
                # the last before a replica died), where the engine would have finished it "stop": no continuation
                yield self._finish(out, "stop", len(v.prompt_token_ids), clock, False, req.placed)
                return
            if done >= v.params["max_tokens"]:  # it died after the last token, before the end: nothing is missing
                yield self._finish(out, "length", len(v.prompt_token_ids), clock, False, req.placed)
                return
            # a new id at the replicas too: what is left of the last placement (its tokens on their way, a copy
            # a replica still runs) can never reach this request's stream again
            req.placed = Placed(f"{rid}~{next(self._serial)}")
            log.warning("%s; continuing request %r elsewhere after %d tokens (migration %d)", cause, rid, done,
                        attempt + 1)
            self.metrics.migrations.inc()
            if not await self._a_path_is_up(self.config.migration_wait_s):
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"{cause}; no decode replica came back within "
                                    f"{self.config.migration_wait_s:g} s to continue it") from None
            ids, params = v.prompt_token_ids + out.token_ids, {**params, "max_tokens": v.params["max_tokens"] - done}

    async def _a_path_is_up(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while not self.serving():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _generate(self, p: Placed, out: Output, clock: Clock, ids: list[int], params: dict,
                        inbox: asyncio.Queue[StreamItem], num_prompt: int):
        """Reserve on a decode replica, prefill on a prefill replica (or locally), then stream into
        `out` (the client's stream, which may have started on an earlier placement; its prompt had
        num_prompt tokens)."""
        place = self.placement
        # short prompts, prompts no prefill replica could hold, and prompts whose decode replica's cache
        # holds all but a short tail prefill on the decode replica
        threshold = self.config.local_prefill_threshold
        p.reason, p.predicted = "threshold", (0.0, 0.0)
        order = None  # the decode replicas in the order to try, where slo_aware looked at the first already
        if not self.limits.fits_prefill(len(ids)) or not place.can_prefill():
            local, p.reason = True, "no_prefill"
        elif self.slo_aware is not None:
            order = place.decode_order(Prompt(ids))
            d = order[0]
            queued = min(r.queued_tokens for r in place.prefill if r.serves)
            guess = self.slo_aware.decide(len(ids), params["max_tokens"], Load.of(d.stats, d.block_size,
                                                                                  d.local_tokens), queued)
            local, p.reason = guess.local, guess.reason
            p.predicted = (guess.ttft_local_s if local else guess.ttft_remote_s, guess.tpot_s)
        else:
            local = len(ids) < threshold
        chosen = local
        local = await place.place_decode(p, ids, params, local, threshold, order)
        if local:
            p.decode.local_tokens += len(ids)
        if local and not chosen:
            p.reason = "short_tail"  # fewer than the threshold's tokens were left uncached on the decode replica
        clock.placed = time.monotonic()
        self.metrics.queue.observe(clock.placed - clock.t0)
        if not local:
            try:
                first = await place.prefill_remote(p, ids, params, self.metrics.kv_failures.inc)
            except RequestFailed as e:
                if e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("%s; prefilling on %s instead", e, p.decode.name)
                await place.prefill_locally(p, ids, params)
                local, p.reason = True, "no_prefill"
        if not local:
            p.cached_tokens = first.num_cached_tokens
            clock.prefilled = time.monotonic()
            if chunk := self._add(out, clock, [StreamItem(p.rid, first.first_token, first.logprobs)]):
                yield chunk
            # the first token ended it (a stop string, an end token, its only token): no commit, no decode; release()
            # frees the reservation
            if out.stopped or self.limits.ends_request(first.first_token, params):
                yield self._finish(out, "stop", num_prompt, clock, local, p)
                return
            if params["max_tokens"] <= 1:
                yield self._finish(out, "length", num_prompt, clock, local, p)
                return
            await call(p.decode, p.rid, p.decode.actor.commit.remote(p.rid, first.first_token, first.logprobs))
            clock.committed = time.monotonic()
            self.metrics.kv_transfer.observe(clock.committed - clock.prefilled)
        while True:
            items = await Inboxes.take(inbox)
            end = next((i for i, it in enumerate(items) if it.last), None)
            if end is not None:  # nothing of the request after its last item counts (an error, then a late token)
                del items[end + 1:]
            last = items[-1] if end is not None else None
            if last is not None and last.error is not None:
                p.decoding = False
                raise replica_error(last.error, p.decode, p.rid)
            if local and not p.cached_tokens:
                p.cached_tokens = items[0].num_cached_tokens  # the first token of a prompt prefilled there says it
            if chunk := self._add(out, clock, [it for it in items if it.token_id is not None]):
                yield chunk
            if out.stopped or last is not None:
                p.decoding = last is None  # a stop string ended it here: the replica is still running it
                yield self._finish(out, last.finish_reason if last else "stop", num_prompt, clock, local, p)
                return

    def _add(self, out: Output, clock: Clock, items: list[StreamItem]):
        if not items:
            return None
        had = len(out.token_ids)
        chunk = out.add(items)
        if kept := len(out.token_ids) - had:  # not the tokens after a stop string
            for gap in clock.streamed(kept):
                self.metrics.itl.observe(gap)
        return chunk

    def _finish(self, out: Output, reason: str, num_prompt: int, clock: Clock, local: bool, p: Placed):
        local = local or p.prefill is None
        path = "local" if local else "disaggregated"
        self.metrics.path.labels(model=self.model_name, path=path).inc()
        self.metrics.dispatch.labels(model=self.model_name, path=path, reason=p.reason).inc()
        timings = clock.timings(local, (p.decode if local else p.prefill).name, p.decode.name, p.reason, p.predicted)
        usage = pb.Usage(prompt_tokens=num_prompt, completion_tokens=len(out.token_ids),
                         cached_tokens=min(p.cached_tokens, num_prompt))
        return out.finish(reason, usage, timings)
