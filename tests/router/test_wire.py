"""What reaches the router's gRPC port as bytes: a request that does not parse (corrupt, or a string
field that is not UTF-8) ends INVALID_ARGUMENT saying why, on every method, never UNKNOWN with a
Python exception; the caller's key is still checked first. A real RouterServer over a stand-in
decode replica (no Ray): nothing here gets past validation."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.config import RouterConfig
from protos.pdserve.v1 import pdserve_pb2 as pb
from router.placement import Replica
from router.router import Router
from router.server import RouterServer
from router.validate import Limits

NOT_UTF8 = b"\x0a\x02\xff\xfe"  # GenerateRequest.text (field 1): two bytes that are not UTF-8
CORRUPT = b"\x0a\x05hi"  # a length of 5 with 2 bytes after it
LIMITS = Limits(vocab_size=100, max_model_len=8192, max_request_bytes=1 << 20, max_logprobs=20, max_stop_strings=16,
                model_names=("default",), decode_kv_tokens=16384, prefill_kv_tokens=4096)


class _Method:
    def __init__(self, fn) -> None:
        self.remote = fn


class StandInDecode:
    """Answers the router's stats polls and event subscription as an idle decode replica would."""

    def __init__(self) -> None:
        self.stats = _Method(self._stats)
        self.events = _Method(self._events)

    async def _stats(self) -> dict:
        return {"kv_blocks_total": 1024, "kv_blocks_used": 0}

    async def _events(self):
        await asyncio.Event().wait()
        yield


def start_router(**config) -> RouterServer:
    def make_router() -> Router:
        return Router([], [Replica("decode", 0, StandInDecode())], None, LIMITS,
                      RouterConfig(port=0, metrics_port=None, http_port=None, **config))
    return RouterServer(make_router, "127.0.0.1", 0, LIMITS.max_request_bytes).start()


@pytest.fixture(scope="module")
def router():
    server = start_router()
    yield server
    server.stop()


def raw(channel: grpc.Channel, method: str, streaming: bool = False):
    """The method with bytes in and out (no serializers)."""
    path = f"/pdserve.v1.Generation/{method}"
    return channel.unary_stream(path) if streaming else channel.unary_unary(path)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_generate_with_bytes_that_do_not_parse_is_invalid_argument(router) -> None:
    with grpc.insecure_channel(router.address) as channel:
        generate = raw(channel, "Generate", streaming=True)
        assert status_of(lambda: list(generate(NOT_UTF8, timeout=10))) == (
            grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid GenerateRequest: string field had bad UTF-8")
        assert status_of(lambda: list(generate(CORRUPT, timeout=10))) == (
            grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid GenerateRequest: wire format was corrupt")
        request_id = pb.GenerateRequest(text="hi").SerializeToString() + b"\x2a\x01\xc3"  # a cut-off 2-byte character
        code, details = status_of(lambda: list(generate(request_id, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details
        # the same server still parses good bytes, and validates them
        good = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 9000)).SerializeToString()
        code, details = status_of(lambda: list(generate(good, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "a prompt may have at most 8191" in details


def test_every_method_refuses_bytes_that_do_not_parse(router) -> None:
    with grpc.insecure_channel(router.address) as channel:
        for method in ("Cancel", "ListModels", "ClusterStatus"):
            code, details = status_of(lambda: raw(channel, method)(CORRUPT, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert details.startswith(f"the request is not a valid {method}Request"), details
        cancel = pb.CancelResponse.FromString(raw(channel, "Cancel")(pb.CancelRequest(request_id="x")
                                                                      .SerializeToString(), timeout=10))
        assert cancel.cancelled is False


def test_list_models_says_what_a_request_can_get(router) -> None:
    with grpc.insecure_channel(router.address) as channel:
        answer = pb.ListModelsResponse.FromString(raw(channel, "ListModels")(b"", timeout=10))
    (model,) = answer.models
    assert (model.name, model.max_model_len, model.vocab_size) == ("default", 8192, 100)  # the context: the decode pool holds 16384


def test_the_key_is_checked_before_the_bytes() -> None:
    server = start_router(api_keys=("sk-test",))
    try:
        with grpc.insecure_channel(server.address) as channel:
            generate = raw(channel, "Generate", streaming=True)
            assert status_of(lambda: list(generate(NOT_UTF8, timeout=10)))[0] == grpc.StatusCode.UNAUTHENTICATED
            keyed = [("authorization", "Bearer sk-test")]
            assert status_of(lambda: list(generate(NOT_UTF8, timeout=10, metadata=keyed)))[0] == \
                grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()
