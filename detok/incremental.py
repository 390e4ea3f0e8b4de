"""Token ids in, text deltas out."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


CONTEXT = 4  # prompt tokens the first window starts with


def context_of(tokenizer: Decoder, prompt: Sequence[int]) -> list[int]:
    """The last CONTEXT prompt tokens, decoded before the first output token so that it reads as it does after the
    prompt (a SentencePiece tokenizer drops the leading space of the text's first word: " Paris" would be "Paris");
    none where the prompt ends inside a character (its bytes would merge with the output's)."""
    tail = list(prompt[-CONTEXT:])
    return tail if tail and not tokenizer.decode(tail).endswith("\ufffd") else []


def output_text(tokenizer: Decoder, prompt: Sequence[int], output: Sequence[int]) -> str:
    """The whole output's text as IncrementalDetokenizer(tokenizer, context_of(tokenizer, prompt)) streams it."""
    context = context_of(tokenizer, prompt)
    return tokenizer.decode([*context, *output])[len(tokenizer.decode(context)):]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. A token may end inside a multi-byte
    character (the decode then ends in U+FFFD): its text waits for the tokens that complete it.
    Each step decodes only a short window: the tokens since the last emitted text, plus the few
    before them so that spacing between tokens decodes as in the whole text. context: the prompt's
    last tokens (context_of), before the first output token's window."""

    def __init__(self, tokenizer: Decoder, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self._prefix = 0  # window start
        self._read = len(self.ids)  # ids before this are already in the emitted text (or are the context)
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
        """At the end: whatever the window held back (an incomplete character decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        before, now = decode(self.ids[self._prefix:self._read]), decode(self.ids[self._prefix:])
        delta = now[len(before):] if now.startswith(before) else ""
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
