"""The client SDK: Client (blocking) and AsyncClient (asyncio) for the router's Generation service.

Needs only grpcio and protobuf. Every gRPC failure reaches the caller as a RequestError.
"""
from __future__ import annotations

import operator
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from protos.pdserve.v1 import pdserve_pb2 as pb
from protos.pdserve.v1.pdserve_pb2_grpc import GenerationStub

if TYPE_CHECKING:
    from typing_extensions import Self

# Let the server, not the client, decide what is too big (gRPC's default receive limit is 4 MiB). Each client its
# own connection (gRPC shares one between channels to the same address): without API keys, a request belongs to the
# connection that made it, and only that client may cancel it.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.use_local_subchannel_pool", 1)]
SCALAR_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "max_tokens", "ignore_eos", "logprobs")
LIST_SAMPLING_KEYS = ("stop", "stop_token_ids")
FLOAT_SAMPLING_KEYS = ("temperature", "top_p")
# What each int field of the request can carry. The SDK refuses only what cannot be sent; the server checks the
# rest and names it (a max_tokens of 0, a token id outside the vocabulary, ...).
INT32 = (-(1 << 31), (1 << 31) - 1)
INT_SAMPLING_RANGES = {"top_k": INT32, "seed": (0, (1 << 64) - 1), "max_tokens": (0, (1 << 32) - 1),
                       "logprobs": (0, (1 << 32) - 1)}
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
PREFILL_PATHS = {pb.PREFILL_PATH_DISAGGREGATED: "disaggregated", pb.PREFILL_PATH_LOCAL: "local"}

Prompt = str | Sequence[int]  # raw text, or token ids
Messages = Sequence[Mapping[str, str]]  # chat turns, like [{"role": "user", "content": "Hi"}]


class RequestError(Exception):
    """A call failed: `code` is the grpc.StatusCode (INVALID_ARGUMENT, UNAVAILABLE, ...), `details` says why."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> RequestError:
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob) of the most likely tokens, most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache


@dataclass(frozen=True)
class Chunk:
    """One piece of a stream: the text and tokens sampled since the previous chunk."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # one per token when logprobs were asked for, else None
    finish_reason: str | None  # "stop" or "length" on the last chunk, else None
    usage: Usage | None  # last chunk only
    timings: dict[str, Any] | None  # last chunk only: the Timings fields in ms, path "disaggregated" or "local"

    @classmethod
    def from_proto(cls, response: pb.GenerateResponse, *, logprobs: bool) -> Chunk:
        usage = response.usage if response.HasField("usage") else None
        return cls(
            request_id=response.request_id,
            text=response.text,
            token_ids=list(response.token_ids),
            logprobs=[TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                      for lp in response.logprobs] if logprobs else None,
            finish_reason=FINISH_REASONS.get(response.finish_reason),
            usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) if usage else None,
            timings=timings_dict(response.timings) if response.HasField("timings") else None,
        )


@dataclass(frozen=True)
class Completion:
    """A whole generation: its chunks joined."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # one per token when logprobs were asked for, else None
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, Any]  # as Chunk.timings
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache

    @classmethod
    def from_chunks(cls, chunks: Sequence[Chunk]) -> Completion:
        if not chunks or chunks[-1].finish_reason is None:
            raise RequestError(grpc.StatusCode.INTERNAL, "the server ended the stream without a finish_reason")
        last = chunks[-1]
        usage = last.usage or Usage(0, 0)
        return cls(
            request_id=last.request_id,
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            logprobs=[lp for c in chunks for lp in c.logprobs] if last.logprobs is not None else None,
            finish_reason=last.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            timings=last.timings or {},
            cached_tokens=usage.cached_tokens,
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what GenerateRequest.model names
    max_model_len: int  # context length in tokens
    vocab_size: int


def timings_dict(timings: pb.Timings) -> dict[str, Any]:
    fields = {f.name: getattr(timings, f.name) for f in timings.DESCRIPTOR.fields}
    return fields | {"path": PREFILL_PATHS.get(timings.path)}


def prompt_token_ids(prompt: Any) -> list[int]:
    # operator.index admits numpy's ints but not floats; bytes would pass as ints, so they are refused by name.
    try:
        if not isinstance(prompt, (bytes, bytearray)):
            return _in_range("prompt token id", [_int(t) for t in prompt], *INT32)
    except TypeError:
        pass
    raise TypeError(f"prompt must be a str or a sequence of int token ids, got {prompt!r:.80}")


def _int(value: Any) -> int:
    if isinstance(value, bool):  # an int to Python, never a token id or a count
        raise TypeError(f"expected an int, got {value!r}")
    return operator.index(value)


def _in_range(name: str, ids: list[int], low: int, high: int) -> list[int]:
    for i, t in enumerate(ids):
        if not low <= t <= high:
            raise ValueError(f"{name} {t} at index {i} is out of range: the request's field holds [{low}, {high}]")
    return ids


def _text(name: str, value: Any) -> str:
    """value, checked to be a str that UTF-8 can encode (a lone surrogate, e.g. from a bad decode, cannot be)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r:.40}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: it has a lone surrogate {value[e.start]!r} at index {e.start}, "
                         f"which UTF-8 cannot encode") from None
    return value


def _texts(name: str, value: Any) -> list[str]:
    """A str or a sequence of them (not bytes)."""
    if isinstance(value, str):
        return [_text(name, value)]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__} {value!r:.40}")
    return [_text(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _sampling_value(key: str, value: Any) -> Any:
    """value as the SamplingParams field `key` takes it; a TypeError or ValueError naming the key if it cannot."""
    name = f"sampling parameter {key}"
    if key in FLOAT_SAMPLING_KEYS:
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            return float(value)
        except TypeError:
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}") from None
        except OverflowError:
            raise ValueError(f"{name}={value!r:.40} is too large") from None
    if key == "ignore_eos":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
        return value
    if key == "stop":
        return _texts(name, value)
    try:
        if key == "stop_token_ids":
            if isinstance(value, (str, bytes, bytearray)):
                raise TypeError
            return _in_range(f"{name}: token id", [_int(t) for t in value], *INT32)
        number = _int(value)
    except TypeError:
        kind = "a list of int token ids" if key == "stop_token_ids" else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r:.40}") from None
    low, high = INT_SAMPLING_RANGES[key]
    if not low <= number <= high:
        raise ValueError(f"{name}={number} is out of range: the request's field holds [{low}, {high}]")
    return number


def build_request(prompt: Prompt | None = None, *, messages: Messages | None = None, request_id: str = "",
                  model: str = "", **sampling: Any) -> pb.GenerateRequest:
    """The GenerateRequest for Client.generate's arguments. Sampling keys left out (or None) stay unset in the proto,
    so the server's defaults apply. An argument the request cannot carry raises TypeError (wrong type) or
    ValueError (wrong value), naming it; what only the server knows (vocabulary, context length, roles) it checks."""
    if (prompt is None) == (messages is None):
        raise ValueError(f"give exactly one of prompt or messages (got {'both' if prompt is not None else 'neither'})")
    request = pb.GenerateRequest(request_id=_text("request_id", "" if request_id is None else request_id),
                                 model=_text("model", "" if model is None else model))
    if messages is not None:
        request.chat.SetInParent()  # present even when empty, so the server names the problem (no messages)
        request.chat.messages.extend(_message(i, m) for i, m in enumerate(_messages(messages)))
    elif isinstance(prompt, str):
        request.text = _text("prompt", prompt)
    else:
        request.token_ids.ids.extend(prompt_token_ids(prompt))

    unknown = sorted(set(sampling) - set(SCALAR_SAMPLING_KEYS) - set(LIST_SAMPLING_KEYS))
    if unknown:
        known = ", ".join(SCALAR_SAMPLING_KEYS + LIST_SAMPLING_KEYS)
        raise TypeError(f"unknown sampling parameter(s) {', '.join(unknown)}; the known ones are {known}")
    params = pb.SamplingParams()
    for key, value in sampling.items():
        if value is None:
            continue
        value = _sampling_value(key, value)
        if key in LIST_SAMPLING_KEYS:
            getattr(params, key).extend(value)
        else:
            setattr(params, key, value)
    if params.ListFields():
        request.sampling.CopyFrom(params)
    return request


def _messages(messages: Any) -> list[Any]:
    if isinstance(messages, (str, bytes, bytearray, Mapping)) or not isinstance(messages, Iterable):
        raise TypeError(f"messages must be a list of dicts like {{'role': 'user', 'content': 'Hi'}}, "
                        f"got {type(messages).__name__} {messages!r:.40}")
    return list(messages)


def _message(i: int, m: Any) -> pb.ChatMessage:
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"messages[{i}] must be a dict like {{'role': 'user', 'content': 'Hi'}}, got {m!r:.60}")
    if extra := sorted(set(m) - {"role", "content"}, key=str):
        raise ValueError(f"messages[{i}] has key(s) {', '.join(map(repr, extra))}; a message has only role and content")
    return pb.ChatMessage(role=_text(f"messages[{i}].role", m["role"]),
                          content=_text(f"messages[{i}].content", m["content"]))


class _Connection:
    """How a client reaches the router: its address, TLS, and the API key sent with every call."""

    def __init__(self, address: str, timeout: float | None, api_key: str | None, tls: bool,
                 root_certificates: bytes | str | os.PathLike | None) -> None:
        self.address = address
        self.timeout = timeout
        api_key = os.environ.get("PDSERVE_API_KEY") if api_key is None else api_key
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        if isinstance(root_certificates, (str, os.PathLike)):
            with open(root_certificates, "rb") as f:
                root_certificates = f.read()
        self._credentials = grpc.ssl_channel_credentials(root_certificates) \
            if tls or root_certificates is not None else None

    def _error(self, e: grpc.RpcError) -> RequestError:
        error = RequestError.from_rpc_error(e)
        if error.code == grpc.StatusCode.UNAVAILABLE and error.details.startswith("failed to connect") \
                and self._credentials is None:  # the likeliest cause of a closed socket: a TLS port
            return RequestError(error.code, f"{error.details} (if the router serves TLS, connect with tls=True)")
        return error


class Client(_Connection):
    """A blocking client. `timeout` is the default deadline of each call, in seconds (None: no deadline).
    `api_key` (default: $PDSERVE_API_KEY) goes with every call when set. `tls=True` speaks TLS, checking
    the server's certificate against the system's roots or `root_certificates` (PEM bytes or a file;
    giving them implies tls)."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | os.PathLike | None = None):
        super().__init__(address, timeout, api_key, tls, root_certificates)
        self._channel = grpc.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS) \
            if self._credentials else grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = GenerationStub(self._channel)

    def generate(self, prompt: Prompt | None = None, *, messages: Messages | None = None, request_id: str = "",
                 model: str = "", timeout: float | None = None, **sampling: Any) -> Completion:
        """Generate one completion. prompt is raw text or token ids; messages are chat turns, the chat template
        applied. Sampling keys: temperature, top_k, top_p, seed, max_tokens, stop, stop_token_ids, ignore_eos,
        logprobs. `timeout` covers the whole generation."""
        chunks = self.stream(prompt, messages=messages, request_id=request_id, model=model, timeout=timeout, **sampling)
        return Completion.from_chunks(list(chunks))

    def stream(self, prompt: Prompt | None = None, *, messages: Messages | None = None, request_id: str = "",
               model: str = "", timeout: float | None = None, **sampling: Any) -> Iterator[Chunk]:
        """As generate, but yield chunks as they come. Leaving the loop early cancels the request on the server."""
        # Built here, not in the generator, so bad arguments raise at the call rather than at the first next().
        request = build_request(prompt, messages=messages, request_id=request_id, model=model, **sampling)
        return self._stream(request, self.timeout if timeout is None else timeout)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        logprobs = request.sampling.HasField("logprobs")
        try:
            for response in call:
                yield Chunk.from_proto(response, logprobs=logprobs)
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            call.cancel()  # a no-op once the stream has ended; otherwise the server sees the client go away

    def chat(self, messages: Messages, **kw: Any) -> Completion:
        """generate with chat turns, like [{"role": "user", "content": "Hi"}]."""
        return self.generate(messages=messages, **kw)

    def cancel(self, request_id: str) -> bool:
        """Abort a running request; False when none has that id."""
        return self._call(self._stub.Cancel, pb.CancelRequest(request_id=request_id)).cancelled

    def list_models(self) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo(m.name, m.max_model_len, m.vocab_size) for m in response.models]

    def status(self) -> pb.ClusterStatusResponse:
        """The cluster's state, as the proto message: model, kv_backend, requests_in_flight, requests_queued, and
        pools (role "prefill" or "decode") of replicas (healthy, running, waiting, kv_blocks_used/total, ...)."""
        return self._call(self._stub.ClusterStatus, pb.ClusterStatusRequest())

    def scale(self, pool: str, replicas: int, *, drain_timeout_s: float = 0.0) -> pb.ScaleResponse:
        """Grow or shrink pool "prefill" or "decode" to `replicas` while serving (a leaving replica
        drains: drain_timeout_s for its requests to finish, 0 for the router's default, then the rest
        move elsewhere). Returns once done: replicas, added, removed."""
        return self._call(self._stub.Scale, pb.ScaleRequest(pool=pool, replicas=replicas,
                                                            drain_timeout_s=drain_timeout_s))

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Connection):
    """Client for asyncio: the same methods as coroutines, and stream an async generator; the same
    arguments as Client."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | os.PathLike | None = None):
        super().__init__(address, timeout, api_key, tls, root_certificates)
        # An aio channel belongs to the event loop running when it is made, so it is made on first use, in the loop.
        self._channel: grpc.aio.Channel | None = None
        self._channel_stub: GenerationStub | None = None

    @property
    def _stub(self) -> GenerationStub:
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=CHANNEL_OPTIONS) \
                if self._credentials else grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._channel_stub = GenerationStub(self._channel)
        return self._channel_stub

    async def generate(self, prompt: Prompt | None = None, *, messages: Messages | None = None, request_id: str = "",
                       model: str = "", timeout: float | None = None, **sampling: Any) -> Completion:
        """As Client.generate."""
        chunks = self.stream(prompt, messages=messages, request_id=request_id, model=model, timeout=timeout, **sampling)
        return Completion.from_chunks([chunk async for chunk in chunks])

    def stream(self, prompt: Prompt | None = None, *, messages: Messages | None = None, request_id: str = "",
               model: str = "", timeout: float | None = None, **sampling: Any) -> AsyncIterator[Chunk]:
        """As Client.stream. Closing the generator or cancelling the task cancels the request on the server; after an
        early break that happens when the generator is collected (use contextlib.aclosing to make it immediate)."""
        request = build_request(prompt, messages=messages, request_id=request_id, model=model, **sampling)
        return self._stream(request, self.timeout if timeout is None else timeout)

    async def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        logprobs = request.sampling.HasField("logprobs")
        try:
            async for response in call:
                yield Chunk.from_proto(response, logprobs=logprobs)
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            call.cancel()

    async def chat(self, messages: Messages, **kw: Any) -> Completion:
        return await self.generate(messages=messages, **kw)

    async def cancel(self, request_id: str) -> bool:
        return (await self._call(self._stub.Cancel, pb.CancelRequest(request_id=request_id))).cancelled

    async def list_models(self) -> list[ModelInfo]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo(m.name, m.max_model_len, m.vocab_size) for m in response.models]

    async def status(self) -> pb.ClusterStatusResponse:
        """As Client.status."""
        return await self._call(self._stub.ClusterStatus, pb.ClusterStatusRequest())

    async def scale(self, pool: str, replicas: int, *, drain_timeout_s: float = 0.0) -> pb.ScaleResponse:
        """As Client.scale."""
        return await self._call(self._stub.Scale, pb.ScaleRequest(pool=pool, replicas=replicas,
                                                                  drain_timeout_s=drain_timeout_s))

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from e

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
