"""The router: admit, place, orchestrate reserve -> prefill -> transfer -> decode, and stream
text back. It holds Ray actor handles, never tensors (no torch in this process)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc
from router.admission import Admission, QueueFull
from router.metrics import RouterMetrics
from router.tokenizer import IncrementalDetokenizer, Tokenizer
from router.validate import InvalidRequest, Limits, Validated, validate

log = logging.getLogger("pdserve.router")

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
RESERVE_RETRY_S = 0.02  # how often a request waiting for decode blocks asks again


@dataclass
class Replica:
    """The router's view of one replica (its rank-0 actor)."""
    role: str  # "prefill" or "decode"
    index: int
    actor: Any  # Ray actor handle
    tensor_parallel_size: int = 1
    queued_tokens: int = 0  # prefill: prompt tokens sent and not yet prefilled (kept by the router)
    free_blocks: int = 0  # decode: from the last stats poll, lowered by each reservation since
    healthy: bool = True
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role}/{self.index}"


class WorkerError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, kv_lost: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.kv_lost = kv_lost  # the KV could not reach the decode replica: no use prefilling elsewhere


DEAD = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaDead")  # ReplicaDead: executor/errors.py


def worker_error(e: BaseException, replica: Replica, rid: str) -> WorkerError:
    """Map what a Ray call raised to a gRPC status: the engine's ValueError is the caller's fault,
    a dead replica is UNAVAILABLE (and left out of placement)."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, ValueError):
        return WorkerError(grpc.StatusCode.INVALID_ARGUMENT, str(cause))
    if type(cause).__name__ == "LeaseEnded":  # executor/errors.py
        return WorkerError(grpc.StatusCode.ABORTED, str(cause))
    if type(cause).__name__ == "KVLost":
        return WorkerError(grpc.StatusCode.UNAVAILABLE, str(cause), kv_lost=True)
    if type(e).__name__ in DEAD or type(cause).__name__ in DEAD:
        replica.healthy = False
        return WorkerError(grpc.StatusCode.UNAVAILABLE,
                           f"request {rid!r}: replica {replica.name} is down ({type(cause).__name__})")
    return WorkerError(grpc.StatusCode.INTERNAL, f"request {rid!r}: replica {replica.name}: "
                                                 f"{type(cause).__name__}: {cause}")


@dataclass
class _Request:
    """What the cleanup needs to know about a request in flight."""
    rid: str
    prefill: Replica | None = None
    decode: Replica | None = None
    prefilling: bool = False  # the prefill replica may still be writing its KV
    decoding: bool = False  # the decode replica holds blocks for it
    target: dict | None = None  # the decode replica's reservation (kv_transfer.KVTarget fields)
    cancelled: bool = False  # by the Cancel RPC
    ttft: float | None = None  # seconds to the first token
    num_tokens: int = 0  # tokens streamed
    last_token_at: float | None = None  # for inter-token latency


class _Output:
    """Token batches in, response chunks out: incremental text, stop strings, logprobs."""

    def __init__(self, rid: str, tokenizer: Tokenizer | None, stop: tuple[str, ...]) -> None:
        self.rid = rid
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.hold = max(map(len, stop), default=1) - 1  # chars that could be the start of a stop string
        self.text = ""  # decoded so far (a stop string cut off)
        self.sent = 0  # chars of text sent
        self.token_ids: list[int] = []
        self.stopped = False  # a stop string matched

    def add(self, tokens: list[tuple[int, Any]]) -> pb.GenerateResponse | None:
        ids, lps = [], []
        for token_id, lp in tokens:
            ids.append(token_id)
            if lp is not None:  # (token_id, logprob, {token_id: logprob})
                lps.append(pb.TokenLogprob(token_id=lp[0], logprob=lp[1],
                                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp[2].items()]))
            if self.detok is not None and self._append(self.detok.push([token_id])):
                break  # the tokens after a stop string are not part of the output
        self.token_ids += ids
        safe = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        return self._chunk(ids, lps, safe)

    def finish(self, reason: str, usage: pb.Usage, timings: pb.Timings) -> pb.GenerateResponse:
        if self.detok is not None and not self.stopped:
            self._append(self.detok.flush())
        chunk = self._chunk([], [], len(self.text), force=True)
        chunk.finish_reason = FINISH["stop" if self.stopped else reason]
        chunk.usage.CopyFrom(usage)
        chunk.timings.CopyFrom(timings)
        return chunk

    def _append(self, delta: str) -> bool:
        """Add decoded text; True when it completes a stop string (the text is cut before it)."""
        if not delta:
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def _chunk(self, ids, lps, upto: int, force: bool = False) -> pb.GenerateResponse | None:
        text = self.text[self.sent:upto]
        if not (ids or text or force):
            return None
        self.sent = max(self.sent, upto)
        return pb.GenerateResponse(request_id=self.rid, text=text, token_ids=ids, logprobs=lps)


class Router(pb_grpc.GenerationServicer):
    def __init__(self, prefill: list[Replica], decode: list[Replica], tokenizer: Tokenizer | None,
                 limits: Limits, config, kv_backend: str = "ipc", model_name: str = "default") -> None:
        if not decode:
            raise ValueError("the decode pool needs at least one replica")
        self.prefill, self.decode = prefill, decode
        self.tokenizer = tokenizer
        self.limits = limits
        self.config = config  # pdserve.config.RouterConfig
        self.kv_backend = kv_backend
        self.model_name = model_name
        self.admission = Admission(config.max_ongoing_requests, config.max_queued_requests)
        self.metrics = RouterMetrics(model_name, lambda: (*self.prefill, *self.decode), config.ttft_slo_s,
                                     config.tpot_slo_s)
        self.metrics.in_flight.set_function(lambda: self.admission.ongoing)
        self.metrics.queued.set_function(lambda: self.admission.queued)
        self.requests: dict[str, tuple[_Request, asyncio.Task]] = {}
        self._rr_prefill = itertools.count()
        self._rr_decode = itertools.count()
        self._poller: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_stats())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    async def _poll_stats(self, every_s: float = 0.25) -> None:
        while True:
            await self.refresh_stats()
            await asyncio.sleep(every_s)

    async def refresh_stats(self, timeout_s: float = 2.0) -> None:
        async def one(r: Replica) -> None:
            try:
                r.stats = await asyncio.wait_for(r.actor.stats.remote(), timeout_s)
                r.healthy = True
                r.free_blocks = r.stats["kv_blocks_total"] - r.stats["kv_blocks_used"]
            except Exception:  # a dead or hung replica is left out of placement until it answers
                r.healthy = False
        await asyncio.gather(*(one(r) for r in (*self.prefill, *self.decode)))

    # -- placement ---------------------------------------------------------------------------------
    def _decode_order(self) -> list[Replica]:
        live = [r for r in self.decode if r.healthy] or self.decode
        if self.config.decode_policy == "round_robin":
            k = next(self._rr_decode) % len(live)
            return live[k:] + live[:k]
        return sorted(live, key=lambda r: -r.free_blocks)

    def _pick_prefill(self) -> Replica | None:
        live = [r for r in self.prefill if r.healthy]
        if not live:
            return None
        if self.config.prefill_policy == "round_robin":
            return live[next(self._rr_prefill) % len(live)]
        return min(live, key=lambda r: r.queued_tokens)

    # -- RPCs ----------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        t0 = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex
        m = self.metrics
        try:
            v = validate(request, self.tokenizer, self.limits)
        except InvalidRequest as e:
            m.request_done("INVALID_ARGUMENT", None, time.monotonic() - t0, 0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if rid in self.requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is already running")
        try:
            await self.admission.enter()
        except QueueFull as e:
            m.refused.inc()
            m.request_done("RESOURCE_EXHAUSTED", None, time.monotonic() - t0, 0)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        req = _Request(rid)
        self.requests[rid] = (req, asyncio.current_task())
        error: WorkerError | None = None
        status = "CANCELLED"  # unless it ends otherwise: the client went away or its deadline passed
        try:
            async for chunk in self._generate(req, v, t0):
                yield chunk
            status = "OK"
        except WorkerError as e:
            error, status = e, e.code.name
        except asyncio.CancelledError:
            if not req.cancelled:
                raise  # the client went away or its deadline passed: grpc has ended the call
            error = WorkerError(grpc.StatusCode.CANCELLED, f"request {rid!r} was cancelled")
        finally:
            del self.requests[rid]
            self.admission.exit()
            m.request_done(status, req.ttft, time.monotonic() - t0, req.num_tokens)
            await asyncio.shield(self._release(req))
        if error is not None:
            await context.abort(error.code, str(error))

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        entry = self.requests.get(request.request_id)
        if entry is None:
            return pb.CancelResponse(cancelled=False)
        req, task = entry
        req.cancelled = True
        task.cancel()
        return pb.CancelResponse(cancelled=True)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=self.model_name, max_model_len=self.limits.max_model_len, vocab_size=self.limits.vocab_size)])

    async def ClusterStatus(self, request, context) -> pb.ClusterStatusResponse:
        await self.refresh_stats()
        pools = []
        for role, replicas in (("prefill", self.prefill), ("decode", self.decode)):
            pools.append(pb.PoolStatus(role=role, replicas=[pb.ReplicaStatus(
                index=r.index, tensor_parallel_size=r.tensor_parallel_size, healthy=r.healthy,
                **{k: r.stats[k] for k in ("running", "waiting", "waiting_prefill_tokens", "kv_blocks_used",
                                           "kv_blocks_total", "busy_fraction", "tokens_processed", "mfu", "mbu")
                   if k in r.stats})
                for r in replicas]))
        return pb.ClusterStatusResponse(model=self.model_name, kv_backend=self.kv_backend, pools=pools,
                                        requests_in_flight=self.admission.ongoing,
                                        requests_queued=self.admission.queued)

    # -- one request -------------------------------------------------------------------------------
    async def _generate(self, req: _Request, v: Validated, t0: float):
        ids, params = v.prompt_token_ids, v.params
        out = _Output(req.rid, self.tokenizer, v.stop)
        local = len(ids) < self.config.local_prefill_threshold or self._pick_prefill() is None
        t_placed = await self._place_decode(req, ids, params, local)
        self.metrics.queue.observe(t_placed - t0)
        t_first = t_prefilled = t_committed = None
        if not local:
            try:
                first, lp = await self._prefill(req, ids, params)
            except WorkerError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                # no prefill replica could do it: drop the reservation, prefill on the decode replica
                log.warning("%s; prefilling on %s instead", e, req.decode.name)
                await self._call(req, req.decode, req.decode.actor.abort.remote(req.rid))
                req.prefill, local = None, True
                await self._call(req, req.decode, req.decode.actor.add_local.remote(ids, params, req.rid))
        if not local:
            t_prefilled = t_first = time.monotonic()
            self._streamed(req, 1, t0)
            if chunk := out.add([(first, lp)]):
                yield chunk
            if out.stopped:  # the first token completed a stop string; release() frees the reservation
                yield out.finish("stop", self._usage(ids, out), self._timings(
                    req, local, t0, t_placed, t_prefilled, t_prefilled, t_first))
                return
            await self._call(req, req.decode, req.decode.actor.commit.remote(req.rid, first, lp))
            t_committed = time.monotonic()
            self.metrics.kv_transfer.observe(t_committed - t_prefilled)
        async for ref in req.decode.actor.stream.remote(req.rid):
            items = await self._call(req, req.decode, ref)
            tokens = [(it[1], it[2]) for it in items if it[0] == "token"]
            if tokens:
                t_first = t_first or time.monotonic()
                self._streamed(req, len(tokens), t0)
                if chunk := out.add(tokens):
                    yield chunk
            end = items[-1] if items[-1][0] == "finish" else None
            if out.stopped or end is not None:
                if end is not None and end[1] == "abort":
                    raise WorkerError(grpc.StatusCode.ABORTED, f"request {req.rid!r} was aborted on "
                                                               f"{req.decode.name} (its KV lease ran out)")
                if end is not None and end[1].startswith("error"):
                    req.decode.healthy = req.decoding = False
                    raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"request {req.rid!r}: replica "
                                                                   f"{req.decode.name} failed ({end[1]})")
                req.decoding = end is None  # a stop string ended it here: the replica is still running it
                t_prefilled = t_prefilled or t_first
                yield out.finish(end[1] if end else "stop", self._usage(ids, out), self._timings(
                    req, local, t0, t_placed, t_prefilled, t_committed or t_prefilled, t_first))
                return

    async def _place_decode(self, req: _Request, ids: list[int], params: dict, local: bool) -> float:
        """Reserve blocks (or queue a local prefill) on a decode replica, waiting while all are full."""
        while True:
            for d in self._decode_order():
                try:
                    if local:
                        await self._call(req, d, d.actor.add_local.remote(ids, params, req.rid))
                        req.decode, req.decoding = d, True
                        return time.monotonic()
                    target = await self._call(req, d, d.actor.reserve.remote(ids, params, req.rid))
                except WorkerError as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE or not any(r.healthy for r in self.decode):
                        raise
                    continue  # that replica is gone (and now marked so): the next one
                if target is not None:
                    d.free_blocks -= len(target["block_ids"])
                    req.decode, req.decoding, req.target = d, True, target
                    return time.monotonic()
            await asyncio.sleep(RESERVE_RETRY_S)

    async def _release(self, req: _Request) -> None:
        """Whatever ended the request, stop the prefill first (nothing more is written into the
        decode blocks), then free the decode side."""
        for replica, live in ((req.prefill, req.prefilling), (req.decode, req.decoding)):
            if replica is not None and live:
                try:
                    await replica.actor.abort.remote(req.rid)
                except Exception as e:
                    log.warning("abort of %s on %s failed: %r", req.rid, replica.name, e)

    async def _prefill(self, req: _Request, ids: list[int], params: dict) -> tuple[int, Any]:
        """Prefill into the reservation on a live prefill replica; when one dies mid-way, the next
        rewrites the same blocks (the dead one writes nothing more)."""
        while (replica := self._pick_prefill()) is not None:
            req.prefill, req.prefilling = replica, True
            replica.queued_tokens += len(ids)
            try:
                result = await self._call(req, replica, replica.actor.prefill.remote(ids, params, req.target))
                req.prefilling = False
                return result
            except WorkerError as e:
                req.prefilling = False  # it never started, or its replica is gone
                self.metrics.kv_failures.inc()
                if e.code != grpc.StatusCode.UNAVAILABLE or e.kv_lost:  # kv_lost: the decode side decides
                    raise
                log.warning("%s; trying another prefill replica", e)
            finally:
                replica.queued_tokens -= len(ids)
        raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"request {req.rid!r}: no prefill replica is up")

    @staticmethod
    async def _call(req: _Request, replica: Replica, ref):
        try:
            return await ref
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise worker_error(e, replica, req.rid) from e

    def _streamed(self, req: _Request, n: int, t0: float) -> None:
        now = time.monotonic()
        if req.ttft is None:
            req.ttft = now - t0
        elif n:
            for _ in range(n):  # tokens that arrive together share the gap
                self.metrics.itl.observe((now - req.last_token_at) / n)
        req.last_token_at, req.num_tokens = now, req.num_tokens + n

    @staticmethod
    def _usage(ids: list[int], out: _Output) -> pb.Usage:
        return pb.Usage(prompt_tokens=len(ids), completion_tokens=len(out.token_ids))

    def _timings(self, req: _Request, local: bool, t0, t_placed, t_prefilled, t_committed, t_first) -> pb.Timings:
        ms = lambda t: (t - t0) * 1e3 if t is not None else 0.0  # noqa: E731
        now = time.monotonic()
        self.metrics.path.labels(model=self.model_name, path="local" if local else "disaggregated").inc()
        return pb.Timings(
            queue_ms=ms(t_placed), prefill_ms=(t_prefilled - t_placed) * 1e3 if t_prefilled else 0.0,
            transfer_ms=(t_committed - t_prefilled) * 1e3 if (t_committed and t_prefilled) else 0.0,
            ttft_ms=ms(t_first), total_ms=ms(now),
            path=pb.PREFILL_PATH_LOCAL if local else pb.PREFILL_PATH_DISAGGREGATED,
            prefill_replica=(req.decode if local else req.prefill).name, decode_replica=req.decode.name)
