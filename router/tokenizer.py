"""Tokenize, apply the chat template and detokenize without transformers or torch: the
`tokenizers` library on the model's tokenizer.json, and jinja2 for the chat template."""
from __future__ import annotations

import json
from datetime import datetime

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


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
