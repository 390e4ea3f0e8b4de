"""Where a request runs: the router's view of the replicas, the placement policies (each picked by
name from a registry, so a config string selects it and tests can list them), and the calls that
place a request: reserve decode blocks (or queue a local prefill), prefill into the reservation
on a live prefill replica, release both when the request ends. What a replica call raises comes
back as a RequestFailed carrying the gRPC status the client gets."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from replica.contract import KVLost, LeaseEnded, PrefillResult, ReplicaDead, ReplicaError, Reservation
from router.cache_index import CacheIndex, Prompt

log = logging.getLogger("pdserve.router")

RESERVE_RETRY_S = 0.02  # how often a request waiting for decode blocks asks again
# prefix_aware decode placement: a replica running at most this many requests more than the least loaded
# one (or half as many again, when that is more) competes on its cached prefix; a busier one on load alone
PREFIX_LOAD_SLACK = 4


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
    down_at: float = 0.0  # time.monotonic() when a call or stream last found it dead (a poll sent before says nothing)
    stats: dict[str, Any] = field(default_factory=dict)  # the last poll's; emptied when it is known dead
    restarts: int = 0  # times pdserve.supervisor replaced its actor
    draining: bool = False  # leaving the pool: no new placements
    block_size: int = 16  # tokens per KV block
    in_flight: int = 0  # requests placed here and not yet released (decode) or prefilling here (prefill)
    local_tokens: int = 0  # decode: prompt tokens sent here to prefill since its last stats poll (kept by the router)
    cache: CacheIndex = field(default_factory=CacheIndex)  # what its prefix cache holds, from the stats polls

    @property
    def serves(self) -> bool:
        """It may take new requests."""
        return self.healthy and not self.draining

    @property
    def name(self) -> str:
        return f"{self.role}/{self.index}"


# A prefill policy picks one of the live prefill replicas; a decode policy orders the live decode
# replicas (the first with free blocks gets the request). Both see the prompt (router/cache_index.Prompt).
# Each registry maps a name to a factory.
PrefillPolicy = Callable[[list[Replica], Prompt], Replica]
DecodePolicy = Callable[[list[Replica], Prompt], list[Replica]]


class RoundRobin:
    """Each call starts one replica further on."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(self, live: list[Replica], prompt: Prompt) -> Replica:
        return live[next(self._next) % len(live)]

    def order(self, live: list[Replica], prompt: Prompt) -> list[Replica]:
        k = next(self._next) % len(live)
        return live[k:] + live[:k]


def least_tokens(live: list[Replica], prompt: Prompt) -> Replica:
    """The prefill replica with the fewest prompt tokens waiting."""
    return min(live, key=lambda r: r.queued_tokens)


def least_uncached_tokens(live: list[Replica], prompt: Prompt) -> Replica:
    """The prefill replica that would finish the prompt first: the fewest tokens waiting there plus the
    prompt's tokens its prefix cache does not hold."""
    return min(live, key=lambda r: r.queued_tokens - prompt.cached_tokens(r.cache, r.block_size))


def most_free_blocks(live: list[Replica], prompt: Prompt) -> list[Replica]:
    """Decode replicas by free KV blocks, most first."""
    return sorted(live, key=lambda r: -r.free_blocks)


def longest_prefix(live: list[Replica], prompt: Prompt) -> list[Replica]:
    """Decode replicas that are not much busier than the least loaded one (PREFIX_LOAD_SLACK) by how
    much of the prompt's prefix their cache holds, most first, where that is at least half the prompt
    (a shorter match, such as a system prompt alone, counts as none); then the less loaded, then the one
    with more free blocks. The busier ones come after them, least loaded first: load wins over a match,
    so one hot prefix cannot pile every request onto one replica."""
    least = min(r.in_flight for r in live)
    near = least + max(PREFIX_LOAD_SLACK, least // 2)

    def key(r: Replica) -> tuple[int, int, int, int]:
        if r.in_flight > near:
            return 1, r.in_flight, 0, -r.free_blocks
        cached = prompt.cached_tokens(r.cache, r.block_size)
        return 0, -cached if 2 * cached >= len(prompt.ids) else 0, r.in_flight, -r.free_blocks
    return sorted(live, key=key)


PREFILL_POLICIES: dict[str, Callable[[], PrefillPolicy]] = {
    "least_tokens": lambda: least_tokens,
    "round_robin": lambda: RoundRobin().pick,
    "prefix_aware": lambda: least_uncached_tokens,
}
DECODE_POLICIES: dict[str, Callable[[], DecodePolicy]] = {
    "most_free_blocks": lambda: most_free_blocks,
    "round_robin": lambda: RoundRobin().order,
    "prefix_aware": lambda: longest_prefix,
}


class RequestFailed(Exception):
    """A request failed (bad input, a full queue, a placement step); `code` is the status the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str, kv_lost: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.kv_lost = kv_lost  # the KV could not reach the decode replica: no use prefilling elsewhere


def replica_error(e: BaseException, replica: Replica, rid: str) -> RequestFailed:
    """What a call on `replica` raised, as a status: the contract's errors carry theirs; a dead
    replica (Ray's actor errors, ReplicaDead) is UNAVAILABLE and left out of placement."""
    from ray.exceptions import RayActorError

    cause = getattr(e, "cause", None) or e  # Ray wraps what a method raised
    if isinstance(e, RayActorError) or isinstance(cause, (RayActorError, ReplicaDead)):
        replica.healthy, replica.down_at = False, time.monotonic()
        return RequestFailed(grpc.StatusCode.UNAVAILABLE,
                              f"request {rid!r}: replica {replica.name} is down ({type(cause).__name__})")
    if isinstance(cause, ReplicaError):
        kv_lost = isinstance(cause, KVLost) and not isinstance(cause, LeaseEnded)
        return RequestFailed(grpc.StatusCode[cause.status], str(cause), kv_lost=kv_lost)
    return RequestFailed(grpc.StatusCode.INTERNAL, f"request {rid!r}: replica {replica.name}: "
                                                    f"{type(cause).__name__}: {cause}")


async def call(replica: Replica, rid: str, ref):
    """Await a call on `replica`; its failure as a RequestFailed."""
    try:
        return await ref
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise replica_error(e, replica, rid) from e


@dataclass
class Placed:
    """Where one request runs, and what its cleanup must release."""
    rid: str
    prefill: Replica | None = None
    decode: Replica | None = None
    prefilling: bool = False  # the prefill replica may still be writing its KV
    decoding: bool = False  # the decode replica holds blocks for it
    reservation: Reservation | None = None
    counted: bool = False  # in decode.in_flight, until released
    cached_tokens: int = 0  # prompt tokens a prefix cache held, as the replica that prefilled it says
    reason: str = ""  # why it prefilled where it did (Timings.dispatch_reason)
    predicted: tuple[float, float] = (0.0, 0.0)  # slo_aware: predicted TTFT of its path and TPOT there, seconds


class Placement:
    """The pools as the router sees them, and the policies that choose among their replicas."""

    def __init__(self, prefill: list[Replica], decode: list[Replica], prefill_policy: str, decode_policy: str) -> None:
        if not decode:
            raise ValueError("the decode pool needs at least one replica")
        for name, registry in ((prefill_policy, PREFILL_POLICIES), (decode_policy, DECODE_POLICIES)):
            if name not in registry:
                raise ValueError(f"placement policy {name!r} is unknown; choose one of {sorted(registry)}")
        self.prefill, self.decode = prefill, decode
        self._pick_prefill = PREFILL_POLICIES[prefill_policy]()
        self._order_decode = DECODE_POLICIES[decode_policy]()

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return (*self.prefill, *self.decode)

    def can_prefill(self) -> bool:
        """Some prefill replica is up."""
        return any(r.serves for r in self.prefill)

    def pick_prefill(self, prompt: Prompt) -> Replica | None:
        live = [r for r in self.prefill if r.serves]
        return self._pick_prefill(live, prompt) if live else None

    def decode_order(self, prompt: Prompt) -> list[Replica]:
        return self._order_decode([r for r in self.decode if r.serves] or [r for r in self.decode if not r.draining],
                                  prompt)

    def running_on(self, replica: Replica, placed: list[Placed]) -> int:
        """How many of these placements still hold work on `replica`."""
        return sum(p.decode is replica and p.decoding or p.prefill is replica and p.prefilling for p in placed)

    async def refresh_stats(self, timeout_s: float = 2.0) -> None:
        """Poll every replica's load; one that does not answer is left out of placement until it does."""
        async def one(r: Replica) -> None:
            sent, actor = time.monotonic(), r.actor
            try:
                stats = await asyncio.wait_for(actor.stats.remote(r.cache.epoch, with_cache=True), timeout_s)
            except Exception as e:  # noqa: BLE001 - a timeout (busy or gone), or dead (its actor or its engine)
                stats = e
            if r.actor is not actor:
                return  # replaced meanwhile: this said nothing of the new one
            if isinstance(stats, asyncio.TimeoutError):
                r.healthy = False  # keep its last figures until it is known which
            elif isinstance(stats, Exception):
                r.healthy, r.stats = False, {}  # no stale figures
                r.cache.clear()
            else:
                r.stats = stats
                r.healthy = sent > r.down_at  # an answer to a poll sent before a request found it dead is stale
                r.free_blocks = stats["kv_blocks_total"] - stats["kv_blocks_used"]
                r.local_tokens = 0  # its waiting_prefill_tokens count them now
                if (report := stats.pop("prefix_cache", None)) is not None:
                    r.cache.apply(report)
        await asyncio.gather(*(one(r) for r in self.replicas))

    async def place_decode(self, p: Placed, ids: list[int], params: dict, local: bool, local_below: int = 0,
                           order: list[Replica] | None = None) -> bool:
        """Reserve blocks (or queue a local prefill) on a decode replica, waiting while all are full.
        local_below: the decode replica prefills the prompt itself when fewer tokens than this are
        left uncached there. order: the replicas to try first, as decode_order gave them to a caller that
        looked already (a round-robin turns once a request); later tries ask again.
        Returns whether the prompt is prefilled there (local)."""
        prompt = Prompt(ids)
        while True:
            for d in order or self.decode_order(prompt):
                try:
                    reservation = None
                    if local:
                        await call(d, p.rid, d.actor.add_local.remote(ids, params, p.rid))
                    else:
                        reservation = await call(d, p.rid, d.actor.reserve.remote(ids, params, p.rid,
                                                                                   local_below))
                except asyncio.CancelledError:  # the call goes on at the replica: release() aborts it there
                    p.decode, p.decoding = d, True
                    raise
                except RequestFailed as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE or not any(r.serves for r in self.decode):
                        raise
                    continue  # that replica is gone (and now marked so): the next one
                if d not in self.decode:  # it drained and left the pool while the call was on its way back (its
                    continue  # events no longer come here, and it is stopped): the next one
                if local:
                    self._placed_on(p, d)
                    return True
                if reservation is not None:
                    self._placed_on(p, d)
                    if reservation.local:
                        return True
                    d.free_blocks -= len(reservation.block_ids) - reservation.num_cached_tokens // d.block_size
                    p.reservation = reservation
                    return False
            order = None
            await asyncio.sleep(RESERVE_RETRY_S)

    @staticmethod
    def _placed_on(p: Placed, d: Replica) -> None:
        p.decode, p.decoding, p.counted = d, True, True
        d.in_flight += 1

    async def prefill_remote(self, p: Placed, ids: list[int], params: dict, on_failure: Callable[[], None]
                             ) -> PrefillResult:
        """Prefill into the reservation on a live prefill replica; when one dies mid-way, the next
        rewrites the same blocks (the dead one writes nothing more). on_failure() counts each failure."""
        prompt = Prompt(ids)
        while (replica := self.pick_prefill(prompt)) is not None:
            p.prefill, p.prefilling = replica, True
            replica.queued_tokens += len(ids)
            replica.in_flight += 1
            try:
                result = await call(replica, p.rid, replica.actor.prefill.remote(ids, params, p.reservation))
                p.prefilling = False
                return result
            except RequestFailed as e:
                p.prefilling = False  # it never started, or its replica is gone
                on_failure()
                if e.code != grpc.StatusCode.UNAVAILABLE or e.kv_lost:  # kv_lost: the decode side decides
                    raise
                log.warning("%s; trying another prefill replica", e)
            finally:
                replica.queued_tokens -= len(ids)
                replica.in_flight -= 1
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"request {p.rid!r}: no prefill replica is up")

    async def prefill_locally(self, p: Placed, ids: list[int], params: dict) -> None:
        """No prefill replica could do it: drop the reservation, prefill on the decode replica."""
        await call(p.decode, p.rid, p.decode.actor.abort.remote(p.rid))
        p.prefill, p.reservation = None, None
        await call(p.decode, p.rid, p.decode.actor.add_local.remote(ids, params, p.rid))

    @staticmethod
    async def release(p: Placed) -> None:
        """Whatever ended the request, stop the prefill first (nothing more is written into the
        decode blocks), then free the decode side."""
        if p.counted:
            p.decode.in_flight -= 1
            p.counted = False
        for replica, live in ((p.prefill, p.prefilling), (p.decode, p.decoding)):
            if replica is not None and live:
                try:
                    await replica.actor.abort.remote(p.rid)
                except Exception as e:
                    log.warning("abort of %s on %s failed: %r", p.rid, replica.name, e)
