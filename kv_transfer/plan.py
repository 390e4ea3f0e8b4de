"""Which rows of a step's flat batch go where: shared by every backend's sender."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.kv_connector import StepLayout
from replica.contract import Reservation


@dataclass
class PoolPlan:
    """One decode pool's share of a step. Filled by plan_step."""
    rows: list[int] = field(default_factory=list)  # rows of the flat batch to send
    slots: list[int] = field(default_factory=list)  # decode-side cache slot of each row
    segments: list[int] = field(default_factory=list)  # flat (transfer id, first position, num rows) per request


def plan_step(layout: StepLayout, block_size_of: Callable[[str], int | None]) -> dict[str, PoolPlan]:
    """Group the step's rows by destination pool; block_size_of(pool) is None for an unknown pool."""
    plans: dict[str, PoolPlan] = {}
    for seq, n, start in zip(layout.seqs, layout.num_scheduled_tokens, layout.query_start_loc):
        target: Reservation | None = seq.kv_target
        if target is None:
            continue
        bs = block_size_of(target.pool)
        if bs is None:
            raise ValueError(f"request {seq.request_id!r}: KV pool {target.pool!r} is not reachable from here")
        # rows of positions the decode side's cache holds already are not sent (its blocks there are shared)
        skip = min(n, max(0, target.num_cached_tokens - seq.num_computed_tokens))
        first, start, n = seq.num_computed_tokens + skip, start + skip, n - skip
        if not n:
            continue
        plan = plans.setdefault(target.pool, PoolPlan())
        plan.rows.extend(range(start, start + n))
        plan.slots.extend(target.block_ids[p // bs] * bs + p % bs for p in range(first, first + n))
        plan.segments.extend((target.transfer_id, first, n))
    return plans
