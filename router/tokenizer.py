"""Tokenize, apply the chat template and detokenize without transformers or torch: the
`tokenizers` library on the model's tokenizer.json, and jinja2 for the chat template."""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


def _raise(message: str):
    raise ValueError(message)


class Tokenizer:
    """Built from `engine.loader.tokenizer_files`: {"tokenizer.json": ..., "tokenizer_config.json": ...,
    "chat_template.jinja": ...} as text."""

    def __init__(self, files: dict[str, str]) -> None:
        self._tok = _HFTokenizer.from_str(files["tokenizer.json"])
        config = json.loads(files.get("tokenizer_config.json", "{}"))
        template = files.get("chat_template.jinja") or config.get("chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self._template = env.from_string(template) if template else None
        self._specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(files["tokenizer.json"]).get("decoder"))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the conversation with the assistant turn opened, then tokenize it (the template
        already placed the special tokens)."""
        if self._template is None:
            raise ValueError("this model has no chat template; send the prompt as text or token ids")
        text = self._template.render(messages=messages, add_generation_prompt=True, **self._specials)
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, which may be part of a character (decode of it alone gives
        U+FFFD there): byte-level BPE's pieces mapped back to their bytes, a byte-fallback piece <0xNN> its
        byte, a SentencePiece word boundary a space; a special token its text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        table = _byte_of_char()
        if self._byte_level and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs: its bytes as UTF-8, those that are part of a character written as
        \\xNN (so two such tokens never read the same)."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


@cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: bytes that print as themselves in Latin-1
    stand for themselves, the other 68 (controls, space, 0x7F-0xA0, 0xAD) for 256, 257, ... in byte order."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
