"""The OpenAI-compatible HTTP front door, on the router's own asyncio loop beside gRPC. A thin
translation: each choice of a request becomes the gRPC service's GenerateRequest and runs through
the same Router.generate (validation, admission, placement, detokenization, stop strings,
metrics); its chunks become OpenAI's JSON or server-sent events. Completions and chat completions
share one path; only the shapes differ (openai_shapes.py). An unknown model is a 404, a bad
parameter a 400 naming it, a full queue a 429 with Retry-After, a pool down a 503, all in OpenAI's
error shape."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.auth import Unauthenticated
from router.openai_shapes import Call, Shapes, chat_shapes, completion_shapes, total_usage
from router.placement import RequestFailed
from router.router import Router
from router.tokenizer import Tokenizer

log = logging.getLogger("pdserve.router")
T = TypeVar("T")

# gRPC status -> HTTP status and OpenAI's error type
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.INTERNAL: (500, "internal_error"),
}
RETRY_AFTER_S = 1  # what a 429 tells the client to wait


def error_body(code: grpc.StatusCode, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; its `code` is the HTTP status."""
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(code: grpc.StatusCode, message: str, param: str | None = None) -> JSONResponse:
    body = error_body(code, message, param)
    status = body["error"]["code"]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else \
        {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _owner(request: Request) -> str:
    """Whose request this is: its API key's name (Unauthenticated, a 401, if keys are required and it
    has none that fits), or "http" when no keys are configured."""
    return request.app.state.router.keys.owner(request.headers.get("authorization"), "http")


Owner = Annotated[str, Depends(_owner)]


def make_app(router: Router) -> FastAPI:
    """The API; with keys configured every /v1 route needs one (401 without), /health stays open."""
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router
    app.add_exception_handler(Unauthenticated, lambda _, e: error_response(grpc.StatusCode.UNAUTHENTICATED, str(e)))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if router.serving() else 503)

    @app.get("/v1/models")
    async def models(_: Owner) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": router.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": router.limits.context}]}

    @app.post("/v1/completions")
    async def completions(request: Request, owner: Owner) -> Response:
        return await _serve(router, request, owner, completion_shapes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, owner: Owner) -> Response:
        return await _serve(router, request, owner, chat_shapes)

    return app


class _ClientGone(Exception):
    """The client disconnected before its response began."""


async def _serve(router: Router, request: Request, owner: str, shapes: Shapes) -> Response:
    try:
        body = json.loads(await request.body())
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested past Python's stack
        return error_response(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid JSON: {e}")
    if body.get("model") not in (None, "", router.model_name):
        return error_response(grpc.StatusCode.NOT_FOUND, f"model {body['model']!r} is not served here; "
                                                         f"served: [{router.model_name!r}]", "model")
    try:
        call = shapes.parse(body)
    except RequestFailed as e:
        return error_response(e.code, str(e), getattr(e, "param", None))
    rid = f"{shapes.id_prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = [router.generate(_with_id(g, f"{rid}-{i}"), call.default_max_tokens, owner)
               for i, g in enumerate(call.requests)]
    choices = Choices(streams)
    try:
        if not call.stream:
            results = await _unless_gone(request, choices.collect())
            return JSONResponse(shapes.response(rid, created, router.model_name, results, call.n, router.tokenizer))
        # every choice's first chunk before the headers, so that a refused request is still an HTTP error
        await _unless_gone(request, choices.started())
    except Exception as e:  # the client left, or a choice failed: the others are cancelled
        await choices.cancel()
        return Response(status_code=499) if isinstance(e, _ClientGone) else error_response(*_status(e))
    except BaseException:  # this handler was cancelled
        await choices.cancel()
        raise
    return StreamingResponse(_sse(shapes, rid, created, router.model_name, router.tokenizer, call, choices),
                             media_type="text/event-stream")


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    """What the client is told of a failed choice: a RequestFailed's status, anything else (a bug) a 500."""
    if isinstance(e, RequestFailed):
        return e.code, str(e)
    log.error("a request failed inside the router", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {e!r}"


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """work's result, unless the client disconnects first (_ClientGone; work is cancelled)."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled
        watch.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        await asyncio.gather(task, watch, return_exceptions=True)
        raise _ClientGone
    return task.result()


class Choices:
    """A request's choices, each drained from its stream as its chunks come into one queue of (index,
    chunk | the error that ended it | None at its end). Draining at once matters: a choice that has
    started holds an admission slot until it ends, so one left paused while another waits in the queue
    could hold the slot that one needs (with more choices than max_ongoing_requests, forever)."""

    def __init__(self, streams: list[AsyncIterator[pb.GenerateResponse]]) -> None:
        self.queue: asyncio.Queue[tuple[int, pb.GenerateResponse | Exception | None]] = asyncio.Queue()
        self._first = [asyncio.get_running_loop().create_future() for _ in streams]
        self._tasks = [asyncio.create_task(self._drain(i, s)) for i, s in enumerate(streams)]

    def __len__(self) -> int:
        return len(self._tasks)

    async def _drain(self, index: int, stream: AsyncIterator[pb.GenerateResponse]) -> None:
        first = self._first[index]
        end: Exception | None = None
        try:
            async for chunk in stream:
                self.queue.put_nowait((index, chunk))
                if not first.done():
                    first.set_result(None)
        except Exception as e:  # RequestFailed, or a bug: either way the client hears of it
            end = e
        self.queue.put_nowait((index, end))
        if first.done():
            return
        if end is None:
            first.set_result(None)
        else:
            first.set_exception(end)

    async def started(self) -> None:
        """Every choice has its first chunk; raises the error of one that failed first."""
        for fut in asyncio.as_completed(self._first):
            await fut

    async def collect(self) -> list[list[pb.GenerateResponse]]:
        """Each choice's chunks once all have ended; raises the first error."""
        results: list[list[pb.GenerateResponse]] = [[] for _ in self._tasks]
        ended = 0
        while ended < len(results):
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                ended += 1
            else:
                results[index].append(item)
        return results

    async def cancel(self) -> None:
        """End every choice still running (the router frees what each holds)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._first:  # a failure nobody awaited is not worth a warning
            if fut.done() and not fut.cancelled():
                fut.exception()


def _with_id(g: pb.GenerateRequest, rid: str) -> pb.GenerateRequest:
    g.request_id = rid
    return g


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _sse(shapes: Shapes, rid: str, created: int, model: str, tok: Tokenizer | None, call: Call,
               choices: Choices) -> AsyncIterator[str]:
    """The choices' chunks as server-sent events, interleaved as they come, then the usage chunk
    (if asked for) and [DONE]; a choice that fails ends the stream with an error event. Leaving early
    (the client went away) cancels every choice."""
    finals: list[pb.GenerateResponse] = [pb.GenerateResponse()] * len(choices)  # each choice's last chunk
    try:
        for i in range(len(choices)):
            if (start := shapes.start(i)) is not None:
                yield _event(shapes.chunk(rid, created, model, [start]))
        ended = 0
        while ended < len(choices):
            index, item = await choices.queue.get()
            if isinstance(item, Exception):
                yield _event(error_body(*_status(item)))
                return
            if item is None:
                ended += 1
                continue
            finals[index] = item
            yield _event(shapes.chunk(rid, created, model, [shapes.delta(index, item, tok)]))
        if call.include_usage:
            yield _event(shapes.chunk(rid, created, model, [], total_usage(finals, call.n)))
        yield "data: [DONE]\n\n"
    finally:
        await choices.cancel()
