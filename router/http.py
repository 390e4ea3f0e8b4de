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
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.auth import Unauthenticated
from router.openai_shapes import Call, Shapes, chat_shapes, completion_shapes, total_usage
from router.placement import RequestFailed
from router.router import Router

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


async def _serve(router: Router, request: Request, owner: str, shapes: Shapes) -> Response:
    try:
        body = json.loads(await request.body())
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except ValueError as e:
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
    if not call.stream:
        results = await asyncio.gather(*(_collect(s) for s in streams), return_exceptions=True)
        if failed := next((r for r in results if isinstance(r, BaseException)), None):
            return _failed(failed)
        return JSONResponse(shapes.response(rid, created, router.model_name, results, call.n, router.tokenizer))
    # every choice's first chunk before the headers, so that a refused request is still an HTTP error
    firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    if failed := next((r for r in firsts if isinstance(r, BaseException)), None):
        for s in streams:
            await s.aclose()
        return _failed(failed)
    return StreamingResponse(_sse(shapes, rid, created, router, call, streams, firsts),
                             media_type="text/event-stream")


def _failed(e: BaseException) -> Response:
    if isinstance(e, RequestFailed):
        return error_response(e.code, str(e))
    raise e


def _with_id(g: pb.GenerateRequest, rid: str) -> pb.GenerateRequest:
    g.request_id = rid
    return g


async def _collect(stream: AsyncIterator[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    return [chunk async for chunk in stream]


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _sse(shapes: Shapes, rid: str, created: int, router: Router, call: Call, streams: list,
               firsts: list[pb.GenerateResponse]) -> AsyncIterator[str]:
    """The choices' chunks as server-sent events, interleaved as they come, then the usage chunk
    (if asked for) and [DONE]. Leaving early (the client went away) cancels every choice."""
    queue: asyncio.Queue[tuple[int, pb.GenerateResponse | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, first: pb.GenerateResponse, stream) -> None:
        try:
            await queue.put((index, first))
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except RequestFailed as e:
            await queue.put((index, e))

    model, tok = router.model_name, router.tokenizer
    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams))]
    finals: list[pb.GenerateResponse] = [pb.GenerateResponse()] * len(tasks)  # each choice's last chunk
    try:
        for i in range(len(tasks)):
            if (start := shapes.start(i)) is not None:
                yield _event(shapes.chunk(rid, created, model, [start]))
        ended = 0
        while ended < len(tasks):
            index, item = await queue.get()
            if isinstance(item, RequestFailed):
                yield _event(error_body(item.code, str(item)))
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
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
