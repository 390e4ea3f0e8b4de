"""The HTTP front door's handling of a request's choices (router/http.py): every choice drained as its
chunks come, a choice's failure ending the stream with an error event in OpenAI's shape (a RequestFailed
with its status, anything else as a 500) rather than leaving the client waiting, and the others cancelled.
The streams are async generators standing in for Router.generate at the moment it fails, which a
running cluster cannot be made to do on demand."""
from __future__ import annotations

import asyncio
import json

import grpc

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.http import Choices, _sse
from router.openai_shapes import Call, completion_shapes
from router.placement import RequestFailed


async def tokens(n: int, then: BaseException | None = None, cancelled: list | None = None):
    try:
        for i in range(n):
            yield pb.GenerateResponse(text=f"t{i}", token_ids=[i])
            await asyncio.sleep(0)
        if then is not None:
            raise then
        yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH)
    except asyncio.CancelledError:
        if cancelled is not None:
            cancelled.append(True)
        raise


def run_sse(*streams) -> list[str]:
    async def go() -> list[str]:
        choices = Choices([s() for s in streams])
        call = Call(requests=[], n=1, stream=True, include_usage=False, default_max_tokens=None)
        return [e async for e in _sse(completion_shapes, "cmpl-1", 0, "m", None, call, choices)]
    return asyncio.run(go())


def test_a_bug_mid_stream_ends_it_with_a_500_event_and_cancels_the_rest() -> None:
    cancelled: list = []
    out = run_sse(lambda: tokens(2, RuntimeError("boom")), lambda: tokens(10_000, cancelled=cancelled))
    last = json.loads(out[-1].removeprefix("data: "))
    assert last["error"]["code"] == 500 and "boom" in last["error"]["message"]
    assert "[DONE]" not in "".join(out) and cancelled == [True]


def test_a_failed_request_mid_stream_keeps_its_status() -> None:
    out = run_sse(lambda: tokens(1, RequestFailed(grpc.StatusCode.UNAVAILABLE, "the decode pool is down")))
    last = json.loads(out[-1].removeprefix("data: "))
    assert last["error"]["code"] == 503 and "the decode pool is down" in last["error"]["message"]


def test_every_choice_streams_to_the_end() -> None:
    out = run_sse(lambda: tokens(3), lambda: tokens(2))
    assert out[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e.removeprefix("data: ")) for e in out[:-1]]
    text = {i: "".join(b["choices"][0]["text"] for b in bodies if b["choices"][0]["index"] == i) for i in (0, 1)}
    assert text == {0: "t0t1t2", 1: "t0t1"}
    assert sum(b["choices"][0]["finish_reason"] == "length" for b in bodies) == 2


def test_started_raises_the_first_failure_and_collect_gathers_every_choice() -> None:
    async def go():
        failing = Choices([tokens(1), tokens(0, RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))])
        try:
            await failing.started()
        except RequestFailed as e:
            raised = e.code
        await failing.cancel()
        fine = Choices([tokens(2), tokens(1)])
        await fine.started()
        return raised, [[c.text for c in chunks] for chunks in await fine.collect()]
    raised, collected = asyncio.run(go())
    assert raised == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert collected == [["t0", "t1", ""], ["t0", ""]]
