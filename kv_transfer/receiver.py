"""Scheduler half of a connector on the decode side: reserve blocks with a lease, admit the
request when its KV has landed, free the blocks when the lease runs out or the request dies."""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from typing import Protocol

from engine import LLMEngine, SamplingParams
from engine.sequence import TokenLogprobs
from kv_transfer.metadata import Lease, transfer_failed
from replica.contract import KVLost, LeaseEnded, Reservation


class KVLanding(Protocol):
    """How a backend's worker half tells the receiver that a transfer's bytes have landed."""

    def wait_for_request(self, transfer_id: int, num_tokens: int, timeout: float) -> bool: ...
    def forget(self, transfer_id: int) -> None: ...


class WrittenInPlace:
    """Backends whose sender writes straight into the pool (shared memory, CUDA IPC): by the time
    the sender reports a prefill done, its bytes are there."""

    def wait_for_request(self, transfer_id: int, num_tokens: int, timeout: float) -> bool:
        return True

    def forget(self, transfer_id: int) -> None:
        pass


class KVReceiver:
    def __init__(self, engine: LLMEngine, pool: str, lease_s: float = 30.0, landing: KVLanding | None = None,
                 commit_timeout_s: float = 10.0, grace_s: float = 5.0) -> None:
        """A sender stops writing at the lease's end (Reservation.deadline); the blocks are freed
        grace_s later, so a step that was mid-write at the deadline cannot touch reused blocks."""
        if lease_s <= 0:
            raise ValueError(f"lease_s={lease_s} must be positive")
        self.engine = engine
        self.pool = pool
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.landing = landing or WrittenInPlace()
        self.commit_timeout_s = commit_timeout_s
        self.reservations: dict[str, Lease] = {}
        self.num_leases_expired = 0
        self._transfer_ids = itertools.count(1)

    def reserve(self, prompt_token_ids: Seq[int], params: SamplingParams, request_id: str, local_below: int = 0
                ) -> Reservation | None:
        """Hold blocks for the prompt (those of its cached prefix shared); None when they are not free
        now (ask again, or go elsewhere). local_below: a prompt with fewer uncached tokens is queued here
        instead (Reservation.local; see LLMEngine.reserve)."""
        seq = self.engine.reserve(prompt_token_ids, params, request_id, local_below)
        if seq is None:
            return None
        if not seq.block_table:
            return Reservation(self.pool, request_id, (), local=True)
        blocks, tid = tuple(seq.block_table), next(self._transfer_ids)
        self.reservations[request_id] = Lease(request_id, tid, seq.num_prompt_tokens,
                                              time.monotonic() + self.lease_s + self.grace_s)
        return Reservation(self.pool, request_id, blocks, tid, deadline=time.time() + self.lease_s,
                           num_cached_tokens=seq.num_cached_tokens)

    def commit(self, request_id: str, first_token: int, logprobs: TokenLogprobs | None = None,
               timeout: float | None = None) -> None:
        """The sender is done: once every layer of every chunk has landed (waiting up to timeout,
        default commit_timeout_s), the request joins the decode batch. Raises KVLost
        (blocks freed) if that does not happen in time."""
        r = self.reservations.get(request_id)
        if r is None:
            raise transfer_failed(request_id, "no live reservation (expired or aborted)")
        if not self.landing.wait_for_request(r.transfer_id, r.num_tokens, self.commit_timeout_s
                                             if timeout is None else timeout):
            self.abort(request_id)
            raise transfer_failed(request_id, f"its KV did not land within {self.commit_timeout_s:g} s")
        del self.reservations[request_id]
        self.landing.forget(r.transfer_id)
        self.engine.admit_prefilled(request_id, first_token, logprobs)

    def abort(self, request_id: str) -> bool:
        r = self.reservations.pop(request_id, None)
        if r is not None:
            self.landing.forget(r.transfer_id)
        return self.engine.abort(request_id)

    def expire(self, now: float | None = None) -> list[KVLost]:
        """Free every reservation whose lease ran out; call it once per engine step."""
        now = time.monotonic() if now is None else now
        dead = [r for r in self.reservations.values() if r.expires_at <= now]
        for r in dead:
            self.abort(r.request_id)
        self.num_leases_expired += len(dead)
        return [transfer_failed(r.request_id, f"no KV arrived within the {self.lease_s:g} s lease", LeaseEnded)
                for r in dead]
