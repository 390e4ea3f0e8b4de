"""Turn a GenerateRequest into prompt token ids and sampling parameters, or refuse it with a
message that names the field and the allowed range."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.tokenizer import Tokenizer

CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    """What a request may ask for. Filled by pdserve.launch from the config and the replicas' info()."""
    vocab_size: int
    max_model_len: int  # the model's context as the decode replicas run it: prompt + output tokens
    max_request_bytes: int
    max_logprobs: int
    max_stop_strings: int
    model_names: tuple[str, ...]
    # The router holds back streamed text that could begin a stop string, so one long stop string
    # would hold back every chunk until the end.
    max_stop_string_length: int = 256
    # Most tokens (prompt + output) one decode replica's KV cache holds: kv_tokens(its info()); None: the context.
    decode_kv_tokens: int | None = None
    # Most tokens one prefill replica's KV cache holds (a prompt there, plus the first token it samples):
    # kv_tokens(its info()); None: no prefill pool. A longer prompt is prefilled on its decode replica.
    prefill_kv_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-sequence tokens (ends_request)

    def ends_request(self, token: int, params: dict) -> bool:
        """Whether sampling `token` ends the request (validated params), as the engine decides: a stop token,
        or end-of-sequence unless ignore_eos. The router needs it where no engine is left to say so."""
        return token in params["stop_token_ids"] or (not params["ignore_eos"] and token in self.eos_token_ids)

    @property
    def context(self) -> int:
        """The most tokens (prompt + output) a request may have: what ListModels reports."""
        return min(self.max_model_len, self.decode_kv_tokens or self.max_model_len)

    @property
    def max_prompt_tokens(self) -> int:
        return self.context - 1

    def fits_prefill(self, num_prompt_tokens: int) -> bool:
        """A prefill replica can hold this prompt (and the first token it samples)."""
        return self.prefill_kv_tokens is None or num_prompt_tokens + 1 <= self.prefill_kv_tokens


def kv_tokens(info: dict[str, Any]) -> int:
    """The most tokens (prompt + output) one sequence can have on a replica: its context, or what its
    KV cache holds when that is less (the engine refuses a request whose blocks could never fit)."""
    return min(info["max_model_len"], info["num_kv_blocks"] * info["block_size"])


def parse(message_type: type[Message], data: bytes) -> Message | InvalidRequest:
    """The request message in `data`, or an InvalidRequest saying why it is not one (corrupt wire
    bytes, a string field that is not UTF-8): gRPC's deserializer, returning the error instead of
    raising it so that the call can end INVALID_ARGUMENT (a raise would end it UNKNOWN)."""
    try:
        return message_type.FromString(data)
    except Exception as e:  # noqa: BLE001 - whatever the bytes make the parser raise, they are the caller's
        why = str(e).split(": ", 1)[-1] if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"
        return InvalidRequest(f"the request is not a valid {message_type.DESCRIPTOR.name}: {why[:1].lower()}{why[1:]}")


@dataclass
class Validated:
    prompt_token_ids: list[int]
    params: dict[str, Any]  # engine SamplingParams fields (the router cannot import the engine: no torch)
    stop: tuple[str, ...]  # stop strings, applied by the router to the detokenized text


def validate(req: pb.GenerateRequest, tokenizer: Tokenizer | None, limits: Limits,
             default_max_tokens: int | None = DEFAULT_MAX_TOKENS) -> Validated:
    """default_max_tokens: when the request gives none (None: up to the context length, as OpenAI's chat)."""
    size = req.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(f"request is {size} bytes; the limit is {limits.max_request_bytes} (max_request_bytes)")
    if req.model and req.model not in limits.model_names:
        raise InvalidRequest(f"model {req.model!r} is not served here; served: {list(limits.model_names)}")
    if len(req.request_id) > 256:
        raise InvalidRequest(f"request_id is {len(req.request_id)} characters; at most 256")
    ids = _prompt_ids(req, tokenizer, limits.vocab_size)
    if not ids:
        raise InvalidRequest("prompt is empty: it must have at least one token")
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; {_context(limits)}, "
                             f"so a prompt may have at most {limits.max_prompt_tokens}")
    return Validated(ids, *_sampling(req.sampling, limits.context - len(ids), limits, tokenizer, default_max_tokens))


def _context(limits: Limits) -> str:
    if limits.context < limits.max_model_len:
        return (f"the context length is {limits.context} (what a decode replica's KV cache holds; "
                f"the model's is {limits.max_model_len})")
    return f"the context length is {limits.context}"


def _prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer | None, vocab: int) -> list[int]:
    given = [f for f in ("text", "chat", "token_ids") if req.HasField(f)]
    if len(given) != 1:
        raise InvalidRequest(f"prompt: give exactly one of text, chat or token_ids (got {given or 'none'})")
    if req.HasField("token_ids"):
        ids = list(req.token_ids.ids)
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise InvalidRequest(f"token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        return ids
    if tokenizer is None:
        raise InvalidRequest("this model has no tokenizer: give the prompt as token_ids")
    if req.HasField("text"):
        return tokenizer.encode(req.text)
    if not req.chat.messages:
        raise InvalidRequest("chat.messages is empty: give at least one message")
    for i, m in enumerate(req.chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"chat.messages[{i}].role={m.role!r}; allowed: {', '.join(CHAT_ROLES)}")
    try:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.chat.messages])
    except Exception as e:  # a template's own raise_exception, or a template error
        raise InvalidRequest(f"chat: the chat template refused the messages: {e}") from None


def _sampling(s: pb.SamplingParams, room: int, limits: Limits, tokenizer,
              default_max_tokens: int | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    p: dict[str, Any] = {}
    if s.HasField("temperature"):
        if not (math.isfinite(s.temperature) and s.temperature >= 0):
            raise InvalidRequest(f"sampling.temperature={s.temperature}: must be finite and >= 0 (0 means greedy)")
        p["temperature"] = s.temperature
    if s.top_k < -1:
        raise InvalidRequest(f"sampling.top_k={s.top_k}: must be -1 or 0 (off: all tokens) or >= 1 "
                             f"(keep the top_k most likely)")
    p["top_k"] = max(s.top_k, 0)
    if s.HasField("top_p"):
        if not 0 < s.top_p <= 1:
            raise InvalidRequest(f"sampling.top_p={s.top_p}: must be in (0, 1]")
        p["top_p"] = s.top_p
    if s.HasField("seed"):
        p["seed"] = s.seed
    if s.HasField("max_tokens"):
        if not 1 <= s.max_tokens <= room:
            raise InvalidRequest(f"sampling.max_tokens={s.max_tokens}: must be in [1, {room}]: the prompt has "
                                 f"{limits.context - room} tokens and {_context(limits)}")
        p["max_tokens"] = s.max_tokens
    else:
        p["max_tokens"] = room if default_max_tokens is None else min(default_max_tokens, room)
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"sampling.stop has {len(s.stop)} strings; at most {limits.max_stop_strings}")
    if any(not x for x in s.stop):
        raise InvalidRequest("sampling.stop: stop strings must not be empty")
    if long := [i for i, x in enumerate(s.stop) if len(x) > limits.max_stop_string_length]:
        raise InvalidRequest(f"sampling.stop[{long[0]}] is {len(s.stop[long[0]])} characters; at most "
                             f"{limits.max_stop_string_length} (the text that could begin one is held back from "
                             f"the stream)")
    if s.stop and tokenizer is None:
        raise InvalidRequest("sampling.stop: this model has no tokenizer, so stop strings cannot apply")
    if bad := [t for t in s.stop_token_ids if not 0 <= t < limits.vocab_size]:
        raise InvalidRequest(f"sampling.stop_token_ids: {bad[:5]} outside the vocabulary [0, {limits.vocab_size})")
    p["stop_token_ids"] = tuple(s.stop_token_ids)
    p["ignore_eos"] = s.ignore_eos
    if s.HasField("logprobs"):
        if s.logprobs > limits.max_logprobs:
            raise InvalidRequest(f"sampling.logprobs={s.logprobs}: must be in [0, {limits.max_logprobs}]")
        p["logprobs"] = s.logprobs
    return p, tuple(s.stop)
