"""The client SDK without a server: building GenerateRequests, turning responses into chunks and completions, and
reporting a router that is not there as RequestError(UNAVAILABLE)."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from pdserve import AsyncClient, Chunk, Client, Completion, RequestError, TokenLogprob, Usage
from pdserve.client import build_request
from protos.pdserve.v1 import pdserve_pb2 as pb


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_fields(request: pb.GenerateRequest) -> list[str]:
    return [f for f in ("text", "chat", "token_ids") if request.HasField(f)]


def test_prompt_forms() -> None:
    text = build_request("")  # empty text is still a text prompt (the server refuses it, by name)
    assert prompt_fields(text) == ["text"] and text.text == ""
    ids = build_request([3, 1, 4])
    assert prompt_fields(ids) == ["token_ids"] and list(ids.token_ids.ids) == [3, 1, 4]
    assert list(build_request((5, 9)).token_ids.ids) == [5, 9]
    chat = build_request(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt_fields(chat) == ["chat"]
    assert [(m.role, m.content) for m in chat.chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert prompt_fields(build_request(messages=[])) == ["chat"]  # given, though empty: the server refuses it
    request = build_request("x", request_id="r1", model="m")
    assert (request.request_id, request.model) == ("r1", "m")


def test_exactly_one_of_prompt_and_messages() -> None:
    for kwargs in ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, {}):
        with pytest.raises(ValueError, match="prompt.*messages"):
            build_request(**kwargs)


def test_bad_prompts_and_messages() -> None:
    for prompt in ([1, 2.5], b"bytes", 7):
        with pytest.raises(TypeError, match="prompt must be a str or a sequence of int token ids"):
            build_request(prompt)
    with pytest.raises(ValueError, match="role"):
        build_request(messages=[{"content": "no role"}])


def test_unknown_sampling_key_is_named() -> None:
    with pytest.raises(TypeError, match="max_new_tokens"):
        build_request("Hi", max_new_tokens=5)
    with Client(f"127.0.0.1:{unused_port()}") as client, pytest.raises(TypeError, match="max_new_tokens"):
        client.stream("Hi", max_new_tokens=5)  # at the call, not at the first next()


def test_bad_sampling_value_names_the_key() -> None:
    with pytest.raises(ValueError, match="max_tokens=-1"):
        build_request("Hi", max_tokens=-1)


def test_unset_sampling_fields_stay_unset() -> None:
    assert not build_request("Hi").HasField("sampling")
    assert not build_request("Hi", temperature=None, seed=None).HasField("sampling")
    sampling = build_request("Hi", temperature=0.0, max_tokens=8).sampling
    assert sampling.HasField("temperature") and sampling.temperature == 0.0  # greedy, not "unset" (default 1.0)
    assert sampling.max_tokens == 8
    assert not any(sampling.HasField(f) for f in ("top_p", "seed", "logprobs"))


def test_all_sampling_keys() -> None:
    sampling = build_request("Hi", temperature=0.7, top_k=40, top_p=0.9, seed=123, max_tokens=32, stop="\n",
                             stop_token_ids=[2, 3], ignore_eos=True, logprobs=0).sampling
    assert sampling.temperature == pytest.approx(0.7) and sampling.top_p == pytest.approx(0.9)
    assert (sampling.top_k, sampling.seed, sampling.max_tokens, sampling.ignore_eos) == (40, 123, 32, True)
    assert list(sampling.stop) == ["\n"] and list(sampling.stop_token_ids) == [2, 3]
    assert sampling.HasField("logprobs") and sampling.logprobs == 0  # the sampled token's logprob, no alternatives
    assert list(build_request("Hi", stop=["a", "b"]).sampling.stop) == ["a", "b"]


def responses() -> list[pb.GenerateResponse]:
    top = [pb.TopLogprob(token_id=7, logprob=-0.1)]
    return [
        pb.GenerateResponse(request_id="r", text="Hel", token_ids=[7],
                            logprobs=[pb.TokenLogprob(token_id=7, logprob=-0.1, top=top)]),
        pb.GenerateResponse(request_id="r", text="lo", token_ids=[8],
                            logprobs=[pb.TokenLogprob(token_id=8, logprob=-0.5)],
                            finish_reason=pb.FINISH_REASON_LENGTH,
                            usage=pb.Usage(prompt_tokens=4, completion_tokens=2),
                            timings=pb.Timings(ttft_ms=12.5, path=pb.PREFILL_PATH_DISAGGREGATED,
                                               prefill_replica="prefill/0", decode_replica="decode/1")),
    ]


def test_chunks_and_completion_from_responses() -> None:
    first, last = (Chunk.from_proto(r, logprobs=True) for r in responses())
    assert first.finish_reason is None and first.usage is None and first.timings is None
    assert first.logprobs == [TokenLogprob(7, pytest.approx(-0.1), [(7, pytest.approx(-0.1))])]
    assert last.finish_reason == "length" and last.usage == Usage(4, 2)
    assert last.timings["path"] == "disaggregated" and last.timings["ttft_ms"] == 12.5
    assert last.timings["decode_replica"] == "decode/1" and "queue_ms" in last.timings

    completion = Completion.from_chunks([first, last])
    assert (completion.request_id, completion.text, completion.token_ids) == ("r", "Hello", [7, 8])
    assert [lp.token_id for lp in completion.logprobs] == [7, 8]
    assert (completion.finish_reason, completion.prompt_tokens, completion.completion_tokens) == ("length", 4, 2)
    assert completion.timings["prefill_replica"] == "prefill/0"


def test_logprobs_are_none_unless_asked_for() -> None:
    chunks = [Chunk.from_proto(r, logprobs=False) for r in responses()]
    assert chunks[0].logprobs is None and Completion.from_chunks(chunks).logprobs is None


def test_a_stream_without_a_last_chunk_is_an_error() -> None:
    with pytest.raises(RequestError, match="finish_reason"):
        Completion.from_chunks([Chunk.from_proto(responses()[0], logprobs=False)])


def test_request_error_reads_like_the_status() -> None:
    error = RequestError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1")
    assert str(error) == "INVALID_ARGUMENT: max_tokens must be >= 1"
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.details == "max_tokens must be >= 1"


def test_no_router_is_unavailable() -> None:
    with Client(f"127.0.0.1:{unused_port()}", timeout=5) as client:
        with pytest.raises(RequestError) as info:
            client.generate("Hi", max_tokens=1)
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RequestError) as info:
            client.list_models()
        assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_no_router_is_unavailable_async() -> None:
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{unused_port()}", timeout=5) as client:
            with pytest.raises(RequestError) as info:
                await client.chat([{"role": "user", "content": "Hi"}])
            assert info.value.code is grpc.StatusCode.UNAVAILABLE
            with pytest.raises(RequestError) as info:
                await client.status()
            assert info.value.code is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())
