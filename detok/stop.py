"""Stop strings over a growing text."""
from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """The earliest of a request's stop strings in its output text, searched only where text just
    added could complete one; and how much of the text is safe to send (none of it can be the
    start of a stop string still to be completed)."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max(map(len, self.stops), default=0)

    def find(self, text: str, new_from: int = 0) -> int | None:
        """Where the earliest stop string starts in `text`, given that text[:new_from] was
        searched before (None: nowhere). A match must reach past new_from, so it starts at most
        `longest` characters before it."""
        start = max(0, new_from - self.longest)
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def safe_end(self, text: str) -> int:
        """Text before this index cannot become part of a stop string, whatever comes next."""
        return max(0, len(text) - max(0, self.longest - 1))
