"""The router's servers, on one asyncio loop (a thread of the process that started the cluster):
gRPC (the Generation service, the standard health service, server reflection) and, when asked
for, the OpenAI-compatible HTTP API (router/http.py, uvicorn) over the same Router."""
from __future__ import annotations

import asyncio
import functools
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.router import Router
from router.validate import InvalidRequest, parse

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


def host_port(host: str, port: int) -> str:
    """host:port as gRPC and URLs want it: an IPv6 literal in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RouterServer:
    """Runs `make_router()` and its grpc.aio server on a background thread; `port` is the bound one.
    With `tls` (a PEM certificate chain file and its key file), gRPC and HTTP serve TLS only."""

    def __init__(self, make_router, host: str, port: int, max_message_bytes: int,
                 metrics_port: int | None = None, http_port: int | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self._make_router, self.host, self._want_port = make_router, host, port
        self.tls = tls
        self._want_http_port = http_port
        self.http_port: int | None = None
        self._http = None  # uvicorn.Server
        self._want_metrics_port = metrics_port
        self.metrics_port: int | None = None
        self._max_message_bytes = max_message_bytes
        self.port: int | None = None
        self.router: Router | None = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pdserve-router", daemon=True)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def start(self, timeout_s: float = 30.0) -> RouterServer:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the router did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=15)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=15)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.router = self._make_router()
        # gRPC refuses only what is far past the router's own limit, so the router can name the problem
        limit = 4 * self._max_message_bytes
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                               ("grpc.max_send_message_length", limit)])
        add_generation_service(self.router, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        where = host_port(self.host, self._want_port)
        if self.tls is None:
            self.port = self.server.add_insecure_port(where)
        else:
            cert, key = (open(path, "rb").read() for path in self.tls)
            self.port = self.server.add_secure_port(where, grpc.ssl_server_credentials([(key, cert)]))
        if not self.port:
            raise OSError(f"could not bind the router to {where}")
        await self.server.start()
        self.router.start()
        if self._want_metrics_port is not None:
            self.metrics_port = self.router.metrics.serve(self.host, self._want_metrics_port)
        if self._want_http_port is not None:
            await self._start_http()
        self._serving: bool | None = None
        await self._update_health()
        self._health_task = asyncio.get_running_loop().create_task(self._watch_health())

    async def _update_health(self) -> None:
        """The health service says SERVING while some path can serve, NOT_SERVING while none can."""
        if (now := self.router.serving()) != self._serving:
            self._serving = now
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE):
                await self.health.set(name, status)

    async def _watch_health(self, every_s: float = 0.25) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self._update_health()

    async def _start_http(self) -> None:
        import uvicorn

        from router.http import make_app

        cert, key = self.tls or (None, None)
        config = uvicorn.Config(make_app(self.router), host=self.host, port=self._want_http_port, lifespan="off",
                                log_level="warning", access_log=False, ssl_certfile=cert, ssl_keyfile=key,
                                timeout_graceful_shutdown=2)  # as gRPC's grace: an idle keep-alive TLS client
        # would otherwise hold the shutdown until it hangs up
        self._http = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(self._http.serve())
        while not self._http.started:  # bound, or failed to
            if task.done():
                raise OSError(f"could not serve HTTP on {host_port(self.host, self._want_http_port)}: "
                              f"{task.exception()!r}")
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        self._http_task = task

    async def _shutdown(self) -> None:
        self._health_task.cancel()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._http is not None:
            self._http.should_exit = True
            await self._http_task
        await self.router.stop()
        self.router.metrics.stop()
        await self.server.stop(grace=2)


def add_generation_service(router: Router, server: grpc.aio.Server) -> None:
    """As pb_grpc.add_GenerationServicer_to_server, but with a request deserializer that does not
    raise: bytes that do not parse (corrupt, or a string field that is not UTF-8) end the call
    INVALID_ARGUMENT saying why, where gRPC would end it UNKNOWN naming a Python exception."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        request_type, response_type = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        if method.server_streaming:
            make, handle = grpc.unary_stream_rpc_method_handler, _parsed_stream(router, method.name)
        else:
            make, handle = grpc.unary_unary_rpc_method_handler, _parsed_unary(router, method.name)
        handlers[method.name] = make(handle, request_deserializer=functools.partial(parse, request_type),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def _refuse_unparsed(router: Router, request, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, InvalidRequest):
        await router.owner(context)  # the caller's key first, as every method checks it
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))


def _parsed_unary(router: Router, name: str):
    method = getattr(router, name)

    async def handle(request, context: grpc.aio.ServicerContext):
        await _refuse_unparsed(router, request, context)
        return await method(request, context)
    return handle


def _parsed_stream(router: Router, name: str):
    method = getattr(router, name)

    async def handle(request, context: grpc.aio.ServicerContext):
        await _refuse_unparsed(router, request, context)
        async for response in method(request, context):
            yield response
    return handle
