"""What a replica's Ray methods raise for the router to act on. Plain Python, built from a
message alone: the router unpickles them (it never imports torch, so the engine's and
kv_transfer's own exception types must not cross), and the router maps them by name to gRPC
statuses."""
from __future__ import annotations


class ReplicaDead(RuntimeError):
    """The replica's engine, or a rank of it, failed: it cannot step again."""


class KVLost(RuntimeError):
    """A request's KV could not reach its decode replica (a peer died, or it did not land in time);
    the decode side may still prefill it itself."""


class LeaseEnded(KVLost):
    """The decode side's reservation ran out before the prefill finished."""


def plain(e: BaseException) -> BaseException:
    """The error as the router should see it: the engine's and kv_transfer's types turned into
    the ones above; anything else (ValueError for bad input, Ray's errors) as it is."""
    from engine.loop import ReplicaDead as EngineDead
    from kv_transfer import KVTransferError, LeaseExpired

    if isinstance(e, LeaseExpired):
        return LeaseEnded(str(e))
    if isinstance(e, KVTransferError):
        return KVLost(str(e))
    if isinstance(e, EngineDead):
        return ReplicaDead(str(e))
    return e
