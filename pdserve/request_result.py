"""One benchmark request, sent through the AsyncClient and timed from the client's side: RequestResult holds what
was measured, send() measures it. Times come from time.perf_counter (see pdserve.bench for TTFT, ITL and TPOT)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.client import AsyncClient, RequestError


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds."""
    prompt_len: int
    output_len: int  # max_tokens asked for
    status: str = "OK"  # the gRPC status name, or the exception's type when the client itself failed
    error: str = ""
    send_time: float = 0.0  # from the run's start
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    server: dict[str, Any] = field(default_factory=dict)  # the last chunk's timings: *_ms and path

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


async def send(client: AsyncClient, prompt: list[int], output_len: int, model: str = "",
               t0: float = 0.0) -> RequestResult:
    """Send one request and time its stream; never raises for a failed request."""
    result = RequestResult(len(prompt), output_len)
    start = time.perf_counter()
    result.send_time = start - t0
    last, finished = start, False
    try:
        stream = client.stream(prompt, model=model, max_tokens=output_len, ignore_eos=True, temperature=0)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                now = time.perf_counter()
                if n := len(chunk.token_ids):
                    if result.ttft is None:
                        result.ttft = now - start
                        result.itl += [0.0] * (n - 1)  # the rest of a first chunk came with the first token
                    else:
                        result.itl += [(now - last) / n] * n
                    last = now
                    result.num_output_tokens += n
                result.server = chunk.timings or result.server
                finished = chunk.finish_reason is not None
        result.e2e = time.perf_counter() - start
        if not finished or result.ttft is None:
            result.status, result.error = "INCOMPLETE", "the stream ended without tokens or a finish reason"
    except RequestError as e:
        result.status, result.error = e.code.name, e.details
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
        result.status, result.error = type(e).__name__, str(e)
    return result
