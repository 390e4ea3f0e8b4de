"""The router<->replica contract: what crosses between the router and a replica's Ray actors.

Plain dataclasses and one exception family. This module imports nothing of the project's and no
torch: the router unpickles these in a process without the engine, and kv_transfer carries the
Reservation on the prefill side. A call on a replica either returns one of the dataclasses below
or raises a ReplicaError; the router acts on the class (isinstance), and the client gets the
class's `status`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reservation:
    """Decode-side KV blocks held for one prompt under a lease, and where its KV goes. Filled by
    the decode replica's reserve(); the router hands it unchanged to a prefill replica, whose
    kv_transfer sender writes each layer's K/V into these blocks."""
    pool: str  # the decode replica's KV pool, as the KV backend knows it
    request_id: str  # the request's id on the decode side
    block_ids: tuple[int, ...]  # decode-side blocks reserved for the prompt, in order
    transfer_id: int = 0  # the decode replica's number for this transfer (unique per pool)
    deadline: float = float("inf")  # time.time() after which the sender must not write (the lease's end)
    # the prompt's leading tokens whose KV the decode replica's prefix cache holds already (in shared
    # blocks, block_ids' first ones): the sender computes and sends only what follows
    num_cached_tokens: int = 0
    # the decode replica holds all but a short tail of the prompt and prefills that itself: nothing
    # is reserved (block_ids is empty) and nothing is to be sent; its stream starts with the first token
    local: bool = False


@dataclass(frozen=True)
class Logprobs:
    """One sampled token's log-probability and the top alternatives. Filled by the replica that
    sampled the token, when the request asked for logprobs."""
    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, the request's `logprobs` most likely tokens


@dataclass(frozen=True)
class PrefillResult:
    """A prompt prefilled and all of its KV written into the reservation. Filled by the prefill
    replica's prefill(); the router streams the first token and commits it to the decode replica."""
    first_token: int
    logprobs: Logprobs | None  # None unless the request asked for logprobs
    num_cached_tokens: int = 0  # prompt tokens the prefill replica took from its prefix cache


@dataclass(frozen=True)
class StreamItem:
    """One event of one request's decode stream: a sampled token, or (last) how the request ended.
    Filled by the decode replica, which sends every request's events of an engine step in one
    message (DecodeWorker.events)."""
    request_id: str
    token_id: int | None = None  # the sampled token; None on the last item
    logprobs: Logprobs | None = None  # with token_id, when the request asked for logprobs
    finish_reason: str | None = None  # on the last item: "stop" (eos, stop token) or "length"
    error: ReplicaError | None = None  # on the last item instead of finish_reason: why the request failed
    num_cached_tokens: int = 0  # on the first token of a prompt prefilled there: how much its prefix cache held

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class ReplicaError(RuntimeError):
    """What a replica call raises for the router to act on. `status` names the gRPC status code
    the client gets (the contract stays free of grpc)."""
    status = "INTERNAL"

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id  # the request it concerns ("" when it concerns the replica)

    def __reduce__(self):  # keep request_id across pickling (Ray ships errors between processes)
        return type(self), (str(self), self.request_id)


class BadRequest(ReplicaError, ValueError):
    """The engine refused the request as given (the caller's fault): nothing was queued."""
    status = "INVALID_ARGUMENT"


class KVLost(ReplicaError):
    """A request's KV could not reach its decode replica (a peer died, or it did not land in
    time); its blocks are freed on the side that raised. The decode side may prefill it itself."""
    status = "UNAVAILABLE"


class LeaseEnded(KVLost):
    """The decode side's reservation ran out before the prefill finished: the request is over."""
    status = "ABORTED"


class ReplicaDead(ReplicaError):
    """The replica's engine, or a rank of it, failed: it cannot step again."""
    status = "UNAVAILABLE"
