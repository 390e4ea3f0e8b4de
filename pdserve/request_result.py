"""One benchmark request, sent through a backend and timed from the client's side: RequestResult holds what was
measured; a Sender, picked from BACKENDS by name, sends and measures it. Times come from time.perf_counter (see
pdserve.bench for TTFT, ITL and TPOT, and for how the two backends' measurements compare).

  grpc    pdserve's AsyncClient to the router's gRPC front door; each chunk says how many tokens it holds
  openai  POST {base_url}/completions with the prompt as token ids, streamed as server-sent events, to any
          OpenAI-compatible server (pdserve's HTTP front door, vllm serve, ...); read_sse turns the stream into
          measurements
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pdserve.client import AsyncClient, RequestError


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds."""
    prompt_len: int
    output_len: int  # max_tokens asked for
    status: str = "OK"  # the gRPC status name, HTTP_<code> (openai), or the exception's type when the client failed
    error: str = ""
    send_time: float = 0.0  # from the run's start
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    server: dict[str, Any] = field(default_factory=dict)  # grpc: the last chunk's timings (*_ms and path)
    last_token: float | None = None  # when the last tokens arrived, from the send
    token_ids: list[int] = field(default_factory=list)  # grpc: the tokens generated (the multiturn workload's history)
    cached_tokens: int | None = None  # prompt tokens the server took from a prefix cache, when its usage says

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)

    def meets(self, ttft_slo: float, tpot_slo: float) -> tuple[bool, bool]:
        """(TTFT met, TPOT met); a one-token output has no TPOT to miss."""
        if not self.ok:
            return False, False
        return self.ttft <= ttft_slo, self.tpot is None or self.tpot <= tpot_slo

    def arrived(self, at: float, n: int = 1) -> None:
        """n tokens arrived together `at` seconds after the send. The first arrival is the TTFT (the rest of its
        tokens get ITL 0); a later one's gap to the previous arrival is divided over its n tokens."""
        if self.ttft is None:
            self.ttft = at
            self.itl += [0.0] * (n - 1)
        else:
            self.itl += [(at - self.last_token) / n] * n
        self.last_token = at
        self.num_output_tokens += n


async def send(client: AsyncClient, prompt: list[int], output_len: int, model: str = "",
               t0: float = 0.0) -> RequestResult:
    """Send one request through the gRPC client and time its stream; never raises for a failed request."""
    result = RequestResult(len(prompt), output_len)
    start = time.perf_counter()
    result.send_time = start - t0
    finished = False
    try:
        stream = client.stream(prompt, model=model, max_tokens=output_len, ignore_eos=True, temperature=0)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if n := len(chunk.token_ids):
                    result.arrived(time.perf_counter() - start, n)
                    result.token_ids += chunk.token_ids
                result.server = chunk.timings or result.server
                if chunk.usage is not None:
                    result.cached_tokens = chunk.usage.cached_tokens
                finished = chunk.finish_reason is not None
        result.e2e = time.perf_counter() - start
        if not finished or result.ttft is None:
            result.status, result.error = "INCOMPLETE", "the stream ended without tokens or a finish reason"
    except RequestError as e:
        result.status, result.error = e.code.name, e.details
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
        result.status, result.error = type(e).__name__, str(e)
    return result


def read_sse(result: RequestResult, lines: Iterable[tuple[float, str]], end: float) -> RequestResult:
    """Fill `result` from an OpenAI completions stream as it was received: (seconds from the send, line) pairs, and
    `end`, when the stream ended. A choice chunk is one token arrival unless it is a bare end marker (a finish_reason
    and no text); the usage chunk's completion_tokens, when there is one, is the number of output tokens (else the
    number of arrivals). An error event fails the request with the server's message. No I/O, no clock."""
    finished, num_tokens = False, None
    for at, line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event: and id: fields
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            body = json.loads(data)
        except ValueError:
            result.status, result.error = "BAD_STREAM", f"an event is not JSON: {data[:200]}"
            break
        if (error := error_of(body)) is not None:
            result.status, result.error = error
            break
        for choice in body.get("choices") or ():
            end_marker = choice.get("finish_reason") is not None
            if choice.get("text") or not end_marker:
                result.arrived(at)
            finished = finished or end_marker
        if usage := body.get("usage"):
            num_tokens = usage.get("completion_tokens", num_tokens)
            if isinstance(details := usage.get("prompt_tokens_details"), dict):
                result.cached_tokens = details.get("cached_tokens", result.cached_tokens)
    result.e2e = end
    if num_tokens is not None:
        result.num_output_tokens = num_tokens
    if result.ok and (not finished or result.ttft is None):
        result.status, result.error = "INCOMPLETE", "the stream ended without tokens or a finish reason"
    return result


def error_of(body: Any) -> tuple[str, str] | None:
    """(status, message) of an OpenAI-shaped error body ({"error": {"message", "code"}}, or vLLM's older flat
    {"object": "error", ...}); None when the body is no error."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if not isinstance(error, dict):
        if body.get("object") != "error":
            return None
        error = body
    code = error.get("code")
    return (f"HTTP_{code}" if isinstance(code, int) else "STREAM_ERROR"), str(error.get("message", error))


class Sender(ABC):
    """One backend's way to send benchmark requests. Used as `async with sender:` (connections are opened in the
    running event loop), then `await sender.send(...)` for each request, concurrently."""

    def __init__(self, target: str, *, model: str = "", timeout: float | None = None, api_key: str | None = None,
                 max_connections: int = 100, tls: bool = False, tls_ca: str | None = None) -> None:
        self.target = target  # grpc: the router's host:port; openai: the API's base URL
        self.model = model  # "" : the server's first model
        self.timeout = timeout  # per request, seconds (None: none)
        self.api_key = api_key  # sent as `Bearer KEY` when given
        self.max_connections = max_connections  # requests that may be in flight at once
        self.tls = tls or tls_ca is not None  # grpc: connect with TLS (openai: the URL's https:// says so)
        self.tls_ca = tls_ca  # PEM root certificate(s) to check the server's against (None: the system's)

    @abstractmethod
    async def __aenter__(self) -> Sender: ...

    @abstractmethod
    async def __aexit__(self, *exc: object) -> None: ...

    @abstractmethod
    async def send(self, prompt: list[int], output_len: int, t0: float = 0.0) -> RequestResult:
        """Send one greedy request for exactly output_len tokens (ignore_eos) and time it; t0 is the run's start.
        Never raises for a failed request: the result's status says what went wrong."""


class GrpcSender(Sender):
    """Through pdserve's AsyncClient (one HTTP/2 channel for all requests)."""

    async def __aenter__(self) -> GrpcSender:
        key = {"api_key": self.api_key} if self.api_key else {}
        if self.tls:
            key |= {"tls": True, "root_certificates": self.tls_ca}
        self.client = await AsyncClient(self.target, timeout=self.timeout, **key).__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    async def send(self, prompt: list[int], output_len: int, t0: float = 0.0) -> RequestResult:
        return await send(self.client, prompt, output_len, self.model, t0)


class OpenAISender(Sender):
    """POST {target}/completions with httpx, one connection per request in flight."""

    async def __aenter__(self) -> OpenAISender:
        httpx = _httpx()
        self.target = self.target.rstrip("/")
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        self.http = httpx.AsyncClient(headers=bearer(self.api_key), limits=limits, timeout=self.timeout,
                                      verify=verify(self.tls_ca))
        if not self.model:
            try:
                response = await self.http.get(f"{self.target}/models", timeout=10)
                response.raise_for_status()
                self.model = response.json()["data"][0]["id"]
            except BaseException:
                await self.http.aclose()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def send(self, prompt: list[int], output_len: int, t0: float = 0.0) -> RequestResult:
        result = RequestResult(len(prompt), output_len)
        start = time.perf_counter()
        result.send_time = start - t0
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        lines: list[tuple[float, str]] = []
        try:
            status, text = await asyncio.wait_for(self._post(body, start, lines), self.timeout)
            if status // 100 == 2:
                read_sse(result, lines, time.perf_counter() - start)
            else:
                result.status = f"HTTP_{status}"
                result.error = error_message(text)
        except asyncio.TimeoutError:
            result.status, result.error = "DEADLINE_EXCEEDED", f"no whole answer within {self.timeout} s"
        except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
            result.status, result.error = type(e).__name__, str(e) or repr(e)
        return result

    async def _post(self, body: dict[str, Any], start: float, lines: list[tuple[float, str]]) -> tuple[int, str]:
        """The HTTP status and, when it is not 2xx, the body; the stream's lines, timed, go into `lines`."""
        async with self.http.stream("POST", f"{self.target}/completions", json=body) as response:
            if response.status_code // 100 != 2:
                return response.status_code, (await response.aread()).decode(errors="replace")
            async for line in response.aiter_lines():
                if line:
                    lines.append((time.perf_counter() - start, line))
            return response.status_code, ""


def _httpx():
    try:
        import httpx  # only the openai backend needs it
    except ImportError as e:
        raise ImportError("the openai backend sends with httpx: pip install httpx (or pdserve[test])") from e
    return httpx


def bearer(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(text: str) -> str:
    """The message of an HTTP error body: OpenAI's error shape, else the text itself."""
    try:
        error = error_of(json.loads(text))
    except ValueError:
        error = None
    return error[1] if error else text.strip()[:500]


def verify(tls_ca: str | None):
    """httpx's `verify` for an https:// URL: the system's roots, or a context trusting tls_ca's."""
    return True if tls_ca is None else ssl.create_default_context(cafile=tls_ca)


def openai_models(base_url: str, api_key: str | None = None, timeout: float = 10, tls_ca: str | None = None
                  ) -> list[dict[str, Any]]:
    """GET {base_url}/models: the served models' entries (id, and max_model_len on pdserve and vLLM)."""
    response = _httpx().get(f"{base_url.rstrip('/')}/models", headers=bearer(api_key), timeout=timeout,
                            verify=verify(tls_ca))
    response.raise_for_status()
    return response.json()["data"]


BACKENDS: dict[str, type[Sender]] = {"grpc": GrpcSender, "openai": OpenAISender}
