"""Token ids in, text deltas out."""
from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. A token may end inside a multi-byte
    character (the decode then ends in U+FFFD): its text waits for the tokens that complete it.
    Each step decodes only a short window: the tokens since the last emitted text, plus the few
    before them so that spacing between tokens decodes as in the whole text."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already in the emitted text
        self.text = ""  # all text emitted so far

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        now = decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever the windows held back (an incomplete character decodes as U+FFFD)."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
