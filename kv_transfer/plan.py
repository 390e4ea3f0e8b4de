"""Which rows of a step's flat batch go where: shared by every backend's sender."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.kv_connector import StepLayout
from replica.contract import Reservation


@dataclass
class PoolPlan:
    """One decode pool's share of a step. Filled by plan_step. Rows index the step's flat batch, then the
    `cached` slots of the sender's own cache gathered after it (row num_rows + i is cached[i])."""
    rows: list[int] = field(default_factory=list)  # rows to send
    slots: list[int] = field(default_factory=list)  # decode-side cache slot of each row
    segments: list[int] = field(default_factory=list)  # flat (transfer id, first position, num rows) per run of rows
    cached: list[int] = field(default_factory=list)  # slots of the sender's cache whose KV is sent too


def _slots(block_ids, block_size: int, start: int, end: int) -> list[int]:
    """The cache slots of positions [start, end) of a sequence whose blocks are block_ids."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def plan_step(layout: StepLayout, block_size_of: Callable[[str], int | None],
              local_block_size: int) -> dict[str, PoolPlan]:
    """Group the step's rows by destination pool; block_size_of(pool) is None for an unknown pool.
    What the decode side holds of a prompt (its own cache's blocks, and what was sent before: seq.kv_sent,
    which this advances) is not sent; what the sender's prefix cache gave it and the decode side lacks is
    sent from the sender's cache (local_block_size: its block size), with the step's first rows of the prompt."""
    plans: dict[str, PoolPlan] = {}
    num_rows = layout.query_start_loc[-1]
    for seq, n, start in zip(layout.seqs, layout.num_scheduled_tokens, layout.query_start_loc):
        target: Reservation | None = seq.kv_target
        if target is None:
            continue
        bs = block_size_of(target.pool)
        if bs is None:
            raise ValueError(f"request {seq.request_id!r}: KV pool {target.pool!r} is not reachable from here")
        first = seq.num_computed_tokens
        held = max(target.num_cached_tokens, seq.kv_sent)  # the decode side has positions [0, held)
        plan = plans.setdefault(target.pool, PoolPlan())
        if first > held:  # [held, first) came from this side's prefix cache: send it from there
            plan.rows.extend(range(num_rows + len(plan.cached), num_rows + len(plan.cached) + first - held))
            plan.cached.extend(_slots(seq.block_table, local_block_size, held, first))
            plan.slots.extend(_slots(target.block_ids, bs, held, first))
            plan.segments.extend((target.transfer_id, held, first - held))
            held = first
        skip = min(n, held - first)  # positions computed again that the decode side has
        if n > skip:
            plan.rows.extend(range(start + skip, start + n))
            plan.slots.extend(_slots(target.block_ids, bs, first + skip, first + n))
            plan.segments.extend((target.transfer_id, first + skip, n - skip))
        seq.kv_sent = max(held, first + n)
    return {name: p for name, p in plans.items() if p.rows}


def all_rows(plan: PoolPlan, num_rows: int) -> list[int] | None:
    """The plan's rows, or None when they are the whole batch in order (nothing to gather)."""
    return None if not plan.cached and len(plan.rows) == num_rows else plan.rows
