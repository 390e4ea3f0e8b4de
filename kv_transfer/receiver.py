"""Scheduler half of a connector on the decode side: reserve blocks with a lease, admit the
request when its KV has landed, free the blocks when the lease runs out or the request dies."""
from __future__ import annotations

import time
from collections.abc import Sequence as Seq

from engine import LLMEngine, SamplingParams
from engine.sequence import TokenLogprobs
from kv_transfer.metadata import KVTarget, KVTransferError, LeaseExpired, Reservation


class KVReceiver:
    def __init__(self, engine: LLMEngine, pool: str, lease_s: float = 30.0) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s={lease_s} must be positive")
        self.engine = engine
        self.pool = pool
        self.lease_s = lease_s
        self.reservations: dict[str, Reservation] = {}
        self.num_leases_expired = 0

    def reserve(self, prompt_token_ids: Seq[int], params: SamplingParams, request_id: str) -> KVTarget | None:
        """Hold blocks for the prompt; None when they are not free now (ask again, or go elsewhere)."""
        seq = self.engine.reserve(prompt_token_ids, params, request_id)
        if seq is None:
            return None
        blocks = tuple(seq.block_table)
        self.reservations[request_id] = Reservation(request_id, blocks, time.monotonic() + self.lease_s)
        return KVTarget(self.pool, request_id, blocks)

    def commit(self, request_id: str, first_token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Every layer of every chunk has landed: the request joins the decode batch."""
        if self.reservations.pop(request_id, None) is None:
            raise KVTransferError(request_id, "no live reservation (expired or aborted)")
        self.engine.admit_prefilled(request_id, first_token, logprobs)

    def abort(self, request_id: str) -> bool:
        self.reservations.pop(request_id, None)
        return self.engine.abort(request_id)

    def expire(self, now: float | None = None) -> list[LeaseExpired]:
        """Free every reservation whose lease ran out; call it once per engine step."""
        now = time.monotonic() if now is None else now
        dead = [r for r in self.reservations.values() if r.expires_at <= now]
        for r in dead:
            del self.reservations[r.request_id]
            self.engine.abort(r.request_id)
        self.num_leases_expired += len(dead)
        return [LeaseExpired(r.request_id, f"no KV arrived within the {self.lease_s:g} s lease") for r in dead]
