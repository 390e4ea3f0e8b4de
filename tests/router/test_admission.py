"""Admission: a bounded number running, a bounded queue served first come first served."""
from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission, QueueFull


def test_admits_queues_in_order_then_refuses() -> None:
    async def run():
        adm = Admission(max_ongoing=2, max_queued=2)
        await adm.enter()
        await adm.enter()
        order = []

        async def waiter(name):
            await adm.enter()
            order.append(name)

        tasks = [asyncio.create_task(waiter(n)) for n in ("a", "b")]
        await asyncio.sleep(0)
        assert adm.queued == 2 and adm.ongoing == 2
        with pytest.raises(QueueFull, match="max_queued_requests=2"):
            await adm.enter()
        adm.exit()
        await asyncio.sleep(0)
        assert order == ["a"] and adm.ongoing == 2
        adm.exit()
        await asyncio.gather(*tasks)
        assert order == ["a", "b"] and adm.queued == 0
        adm.exit(), adm.exit()
        assert adm.ongoing == 0

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    async def run():
        adm = Admission(max_ongoing=1, max_queued=4)
        await adm.enter()
        gone = asyncio.create_task(adm.enter())
        stays = asyncio.create_task(adm.enter())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert adm.queued == 1
        adm.exit()  # the slot goes to the waiter still there
        await stays
        assert adm.ongoing == 1
        adm.exit()
        assert adm.ongoing == 0

    asyncio.run(run())


def test_a_waiter_cancelled_as_a_slot_frees_ends_cancelled_and_the_counts_stay_right() -> None:
    """Cancelled in the same turn of the loop in which the running request ends: exit() passes over the
    cancelled waiter, which must still end with CancelledError (it raised ValueError: an UNKNOWN status)."""
    async def run():
        adm = Admission(max_ongoing=1, max_queued=4)
        await adm.enter()
        waiter = asyncio.create_task(adm.enter())
        await asyncio.sleep(0)
        waiter.cancel()
        adm.exit()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return adm.ongoing, adm.queued
    assert asyncio.run(run()) == (0, 0)
