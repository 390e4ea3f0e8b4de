"""What the router has seen arrive, for the autoscaler (planner/autoscale.py): each request's arrival
time, and the prompt and output lengths of the latest ones. Kept on the router's loop; read from the
autoscaler's thread through a snapshot taken on the loop."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from itertools import takewhile


@dataclass(frozen=True)
class Window:
    rate: float  # requests/s that arrived in the window
    mix: tuple[tuple[int, int], ...]  # (prompt tokens, output tokens) of the latest requests, oldest first


class Traffic:
    def __init__(self, horizon_s: float = 600.0, keep: int = 256, started: float | None = None) -> None:
        self.horizon_s = horizon_s  # arrivals older than this are forgotten
        self.started = time.monotonic() if started is None else started  # on the clock `now` is given in
        self._arrivals: deque[float] = deque()
        self._asked: deque[tuple[int, int]] = deque(maxlen=keep)  # (prompt tokens, max_tokens) as they arrive
        self._done: deque[tuple[int, int]] = deque(maxlen=keep)  # (prompt tokens, tokens generated) as they end

    def arrived(self, prompt_tokens: int, max_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._arrivals.append(now)
        while self._arrivals[0] < now - self.horizon_s:
            self._arrivals.popleft()
        self._asked.append((prompt_tokens, max_tokens))

    def finished(self, prompt_tokens: int, output_tokens: int) -> None:
        if output_tokens:
            self._done.append((prompt_tokens, output_tokens))

    def window(self, window_s: float, now: float | None = None, min_done: int = 16) -> Window:
        """The arrival rate over the last window_s (over the time since the router started, while that is
        shorter; over horizon_s, all it remembers, where window_s is longer), and the lengths of the latest
        finished requests (of the latest arrivals, with max_tokens for the output, until min_done have finished)."""
        now = time.monotonic() if now is None else now
        window_s = min(window_s, self.horizon_s)
        since = now - window_s
        count = sum(1 for _ in takewhile(lambda t: t > since, reversed(self._arrivals)))
        span = min(window_s, max(now - self.started, 1e-3))
        return Window(count / span, tuple(self._done if len(self._done) >= min_done else self._asked))
