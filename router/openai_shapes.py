"""OpenAI's request and response shapes for completions and chat completions, in and out of the
gRPC service's messages. parse() turns a JSON body into one GenerateRequest per choice (refusing
a parameter it does not support, naming it); the rest build responses and stream chunks."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.placement import RequestFailed
from router.tokenizer import Tokenizer

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# parameters both endpoints take (vLLM's extras the engine has: top_k, ignore_eos, stop_token_ids)
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
          "top_k", "ignore_eos", "stop_token_ids", "logprobs"}
# accepted at their no-op values only (what a client library may send by default)
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "response_format": {"type": "text"}, "echo": False,
           "best_of": 1, "tool_choice": "none", "parallel_tool_calls": None}


class BadParameter(RequestFailed):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.param = param


@dataclass
class Call:
    """One HTTP request as the gRPC service's requests. Filled by Shapes.parse."""
    requests: list[pb.GenerateRequest]  # one per choice: prompt i's choices are [i * n, (i + 1) * n)
    n: int  # choices per prompt
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    default_max_tokens: int | None  # when the body gives none (None: up to the context)


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed or (key in NEUTRAL and value == NEUTRAL[key]) or value is None:
            continue
        raise BadParameter(key, f"{key!r} is not supported by this server (supported: {sorted(allowed)})")


def _get(body: dict[str, Any], key: str, default: Any = None) -> Any:
    """body[key], or default where it is missing or null (OpenAI's spec lets a client send null for "unset")."""
    value = body.get(key)
    return default if value is None else value


def _integer(param: str, value: Any) -> int:
    """An integer parameter: an int, or a float with no fraction (JSON has one number type); 1.7 is refused,
    not cut to 1."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise BadParameter(param, f"{param}={value!r}: must be an integer")
    return int(value)


def _sampling(body: dict[str, Any], max_tokens_key: str, logprobs: int | None) -> pb.SamplingParams:
    s = pb.SamplingParams()
    try:
        key = max_tokens_key if body.get(max_tokens_key) is not None else "max_tokens"
        if (v := body.get(key)) is not None:
            s.max_tokens = _integer(key, v)
        s.temperature = float(_get(body, "temperature", 1.0))
        if body.get("top_p") is not None:
            s.top_p = float(body["top_p"])
        if body.get("top_k") is not None:
            s.top_k = _integer("top_k", body["top_k"])  # -1 or 0, as in vLLM: no top-k; the router checks the rest
        if body.get("seed") is not None:
            seed = _integer("seed", body["seed"])
            # OpenAI's seed is an int64: a negative one as its two's complement
            s.seed = seed % (1 << 64) if -(1 << 63) <= seed < 0 else seed
        stop = body.get("stop")
        s.stop.extend(_text("stop", x) for x in ([stop] if isinstance(stop, str) else list(stop or [])))
        s.stop_token_ids.extend(int(t) for t in body.get("stop_token_ids") or [])
        s.ignore_eos = bool(body.get("ignore_eos", False))
        if logprobs is not None:
            s.logprobs = _integer("logprobs", logprobs)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadParameter("sampling", f"a sampling parameter has the wrong type or range: {e}") from None
    return s


def _text(param: str, value: Any) -> str:
    """A JSON string the request can carry: JSON may escape a lone surrogate, which UTF-8 cannot encode."""
    if not isinstance(value, str):
        raise BadParameter(param, f"{param} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadParameter(param, f"{param} has a lone surrogate at index {e.start}, which UTF-8 cannot encode; "
                                  f"send valid Unicode text") from None
    return value


def _token_ids(param: str, ids: list[Any]) -> list[int]:
    """Token ids the request can carry (int32); the router names those outside the vocabulary."""
    if not all(type(t) is int and -(1 << 31) <= t < 1 << 31 for t in ids):
        raise BadParameter(param, f"{param}: each token id must be an integer, in [0, vocabulary size)")
    return ids


def _choices(body: dict[str, Any], prompts: list[pb.GenerateRequest], sampling: pb.SamplingParams,
             default_max_tokens: int | None) -> Call:
    n = _get(body, "n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise BadParameter("n", f"n={n!r}: must be an integer in [1, 16]")
    requests = []
    for prompt in prompts:
        for i in range(n):
            r = pb.GenerateRequest()
            r.CopyFrom(prompt)
            r.sampling.CopyFrom(sampling)
            if n > 1 and sampling.HasField("seed"):
                r.sampling.seed = (sampling.seed + i) % (1 << 64)  # reproducible, and not n copies of one choice
            requests.append(r)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadParameter("stream_options", "stream_options must be an object like {\"include_usage\": true}")
    stream = bool(body.get("stream"))
    if options and not stream:
        raise BadParameter("stream_options", "stream_options is only for a streamed response (stream: true)")
    return Call(requests, n, stream, bool(options.get("include_usage")), default_max_tokens)


def _usage(usage: pb.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def total_usage(finals: list[pb.GenerateResponse], n: int) -> pb.Usage:
    """Usage of a call's choices: each prompt counted once, every choice's completion."""
    return pb.Usage(prompt_tokens=sum(f.usage.prompt_tokens for f in finals[::n]),
                    completion_tokens=sum(f.usage.completion_tokens for f in finals),
                    cached_tokens=sum(f.usage.cached_tokens for f in finals[::n]))


def _token(tokenizer: Tokenizer | None, token_id: int) -> str:
    return tokenizer.token_text(token_id) if tokenizer is not None else f"token_id:{token_id}"


def _bytes(tokenizer: Tokenizer | None, token_id: int) -> list[int]:
    return list(tokenizer.token_bytes(token_id)) if tokenizer is not None else []


@dataclass(frozen=True)
class Shapes:
    """One endpoint's shapes. The functions take the choice's gRPC chunks."""
    id_prefix: str
    object: str  # of a whole response
    chunk_object: str  # of a stream chunk
    parse: Callable[[dict[str, Any]], Call]
    choice: Callable[[int, list[pb.GenerateResponse], Tokenizer | None], dict[str, Any]]
    delta: Callable[[int, pb.GenerateResponse, Tokenizer | None], dict[str, Any]]
    start: Callable[[int], dict[str, Any] | None]  # the first chunk of a choice, if the endpoint has one

    def response(self, rid: str, created: int, model: str, results: list[list[pb.GenerateResponse]],
                 n: int, tokenizer: Tokenizer | None) -> dict[str, Any]:
        return {"id": rid, "object": self.object, "created": created, "model": model,
                "choices": [self.choice(i, chunks, tokenizer) for i, chunks in enumerate(results)],
                "usage": _usage(total_usage([chunks[-1] for chunks in results], n))}

    def chunk(self, rid: str, created: int, model: str, choices: list[dict[str, Any]],
              usage: pb.Usage | None = None) -> dict[str, Any]:
        body = {"id": rid, "object": self.chunk_object, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = _usage(usage)
        return body


def _completion_parse(body: dict[str, Any]) -> Call:
    _check_keys(body, COMMON | {"prompt"})
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt: text or token ids
    if not isinstance(prompt, list) or not prompt:
        raise BadParameter("prompt", "prompt must be a string, a list of strings, token ids, or lists of token ids")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(pb.GenerateRequest(text=_text("prompt", p), model=body.get("model") or ""))
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            prompts.append(pb.GenerateRequest(token_ids=pb.TokenIds(ids=_token_ids("prompt", p)),
                                              model=body.get("model") or ""))
        else:
            raise BadParameter("prompt", "each prompt must be a string or a list of token ids")
    logprobs = body.get("logprobs")
    return _choices(body, prompts, _sampling(body, "max_tokens", logprobs), default_max_tokens=16)


def _completion_logprobs(chunks: list[pb.GenerateResponse], tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    lps = [lp for c in chunks for lp in c.logprobs]
    if not lps:
        return None
    return {"tokens": [_token(tokenizer, lp.token_id) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_token(tokenizer, t.token_id): t.logprob for t in lp.top} for lp in lps]}


completion_shapes = Shapes(
    id_prefix="cmpl", object="text_completion", chunk_object="text_completion", parse=_completion_parse,
    choice=lambda i, chunks, tok: {"index": i, "text": "".join(c.text for c in chunks),
                                   "logprobs": _completion_logprobs(chunks, tok),
                                   "finish_reason": FINISH.get(chunks[-1].finish_reason)},
    delta=lambda i, c, tok: {"index": i, "text": c.text, "logprobs": _completion_logprobs([c], tok),
                             "finish_reason": FINISH.get(c.finish_reason)},
    start=lambda i: None)


def _content(content: Any) -> Any:
    """A message's text: a string, or OpenAI's list of parts, of which this server takes text parts only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadParameter("messages", "each message must have a string role and string content (or a list of "
                                       "text parts)")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadParameter("messages", f"a message's content parts must be text parts "
                                           f"({{\"type\": \"text\", \"text\": ...}}); got {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _chat_parse(body: dict[str, Any]) -> Call:
    _check_keys(body, COMMON | {"messages", "max_completion_tokens", "top_logprobs"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadParameter("messages", "messages must be a non-empty list of {role, content} objects")
    chat = pb.ChatMessages()
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadParameter("messages", "each message must have a string role and string content")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system role
        chat.messages.add(role=_text("messages", role), content=_text("messages", _content(m.get("content"))))
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise BadParameter("top_logprobs", "top_logprobs needs logprobs: true")
    logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    prompt = pb.GenerateRequest(chat=chat, model=body.get("model") or "")
    return _choices(body, [prompt], _sampling(body, "max_completion_tokens", logprobs), default_max_tokens=None)


def _chat_logprobs(chunks: list[pb.GenerateResponse], tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": _token(tokenizer, token_id), "logprob": logprob, "bytes": _bytes(tokenizer, token_id)}

    lps = [lp for c in chunks for lp in c.logprobs]
    if not lps:
        return None
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t.token_id, t.logprob)
                                                                             for t in lp.top]} for lp in lps]}


chat_shapes = Shapes(
    id_prefix="chatcmpl", object="chat.completion", chunk_object="chat.completion.chunk", parse=_chat_parse,
    choice=lambda i, chunks, tok: {"index": i, "message": {"role": "assistant", "content": "".join(
        c.text for c in chunks)}, "logprobs": _chat_logprobs(chunks, tok),
        "finish_reason": FINISH.get(chunks[-1].finish_reason)},
    delta=lambda i, c, tok: {"index": i, "delta": {"content": c.text} if c.text else {},
                             "logprobs": _chat_logprobs([c], tok), "finish_reason": FINISH.get(c.finish_reason)},
    start=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
