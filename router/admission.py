"""Admission: at most `max_ongoing` requests on the pools, at most `max_queued` more waiting for
a turn (first come, first served); past that a request is refused at once. Memory stays bounded
whatever the offered load."""
from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    pass


class Admission:
    def __init__(self, max_ongoing: int, max_queued: int) -> None:
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.ongoing = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def enter(self) -> None:
        """Returns when the request may go to the pools; raises QueueFull when it may not even wait."""
        if self.ongoing < self.max_ongoing and not self._waiters:
            self.ongoing += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise QueueFull(f"{self.ongoing} requests running and {len(self._waiters)} queued "
                            f"(max_queued_requests={self.max_queued}); retry later")
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn  # exit() hands its slot over: `ongoing` is unchanged
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.exit()  # the slot arrived as we were cancelled: pass it on
            elif turn in self._waiters:  # exit() may have passed over it, cancelled, already
                self._waiters.remove(turn)
            raise

    def exit(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.ongoing -= 1
