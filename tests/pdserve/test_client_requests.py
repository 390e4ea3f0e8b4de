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


SURROGATE = "ok \ud800"  # a lone surrogate: a str to Python, but UTF-8 (and so protobuf) cannot encode it

# (arguments, exception type, message): every argument the request cannot carry is named, never a raw protobuf or
# codec error. What it can carry goes to the server, which names what it refuses (a max_tokens of 0, ...).
BAD_ARGUMENTS = [
    ((SURROGATE,), {}, ValueError, "prompt is not valid text: it has a lone surrogate '\\ud800' at index 3"),
    (("Hi",), {"request_id": SURROGATE}, ValueError, "request_id is not valid text"),
    (("Hi",), {"request_id": 5}, TypeError, "request_id must be a str, got int"),
    (("Hi",), {"model": SURROGATE}, ValueError, "model is not valid text"),
    ((), {"messages": [{"role": "user", "content": SURROGATE}]}, ValueError, "messages[0].content is not valid text"),
    ((), {"messages": [{"role": 1, "content": "Hi"}]}, TypeError, "messages[0].role must be a str, got int"),
    ((), {"messages": "Hi"}, TypeError, "messages must be a list of dicts"),
    ((), {"messages": {"role": "user", "content": "Hi"}}, TypeError, "messages must be a list of dicts"),
    ((), {"messages": [("user", "Hi")]}, ValueError, "messages[0] must be a dict like"),
    ((), {"messages": [{"role": "user", "content": "Hi", "name": "x"}]}, ValueError,
     "messages[0] has key(s) 'name'; a message has only role and content"),
    (([1, 1 << 40],), {}, ValueError,
     "prompt token id 1099511627776 at index 1 is out of range: the request's field holds [-2147483648, 2147483647]"),
    (([True],), {}, TypeError, "prompt must be a str or a sequence of int token ids"),
    (("Hi",), {"stop": SURROGATE}, ValueError, "sampling parameter stop is not valid text"),
    (("Hi",), {"stop": ["a", SURROGATE]}, ValueError, "sampling parameter stop[1] is not valid text"),
    (("Hi",), {"stop": [5]}, TypeError, "sampling parameter stop[0] must be a str, got int"),
    (("Hi",), {"stop": b"x"}, TypeError, "sampling parameter stop must be a str or a list of str, got bytes"),
    (("Hi",), {"stop_token_ids": 5}, TypeError, "sampling parameter stop_token_ids must be a list of int token ids"),
    (("Hi",), {"stop_token_ids": "12"}, TypeError, "sampling parameter stop_token_ids must be a list of int token ids"),
    (("Hi",), {"stop_token_ids": [1, -1 << 40]}, ValueError,
     "sampling parameter stop_token_ids: token id -1099511627776 at index 1 is out of range"),
    (("Hi",), {"temperature": "hot"}, TypeError, "sampling parameter temperature must be a number, got str"),
    (("Hi",), {"temperature": 10 ** 400}, ValueError, "sampling parameter temperature=1000"),
    (("Hi",), {"top_p": True}, TypeError, "sampling parameter top_p must be a number, got bool"),
    (("Hi",), {"top_k": 1.5}, TypeError, "sampling parameter top_k must be an int, got float"),
    (("Hi",), {"top_k": 1 << 40}, ValueError,
     "sampling parameter top_k=1099511627776 is out of range: the request's field holds [-2147483648, 2147483647]"),
    (("Hi",), {"seed": -1}, ValueError,
     "sampling parameter seed=-1 is out of range: the request's field holds [0, 18446744073709551615]"),
    (("Hi",), {"max_tokens": 1 << 33}, ValueError, "sampling parameter max_tokens=8589934592 is out of range"),
    (("Hi",), {"logprobs": True}, TypeError, "sampling parameter logprobs must be an int, got bool"),
    (("Hi",), {"ignore_eos": "yes"}, TypeError, "sampling parameter ignore_eos must be True or False, got str"),
    (("Hi",), {"ignore_eos": 2}, TypeError, "sampling parameter ignore_eos must be True or False, got int"),
]


@pytest.mark.parametrize("args,kwargs,error,message", BAD_ARGUMENTS, ids=[m[:40] for *_, m in BAD_ARGUMENTS])
def test_each_bad_argument_is_a_type_or_value_error_naming_it(args, kwargs, error, message) -> None:
    with pytest.raises(Exception) as info:
        build_request(*args, **kwargs)
    assert type(info.value) is error and str(info.value).startswith(message), repr(info.value)


def test_a_lone_surrogate_fails_at_the_call_in_every_client() -> None:
    with Client(f"127.0.0.1:{unused_port()}") as client, pytest.raises(ValueError, match="prompt is not valid text"):
        client.generate(SURROGATE)
    with pytest.raises(ValueError, match=r"messages\[0\].content is not valid text"):
        AsyncClient(f"127.0.0.1:{unused_port()}").stream(messages=[{"role": "user", "content": SURROGATE}])


def test_values_that_convert_cleanly_are_taken() -> None:
    sampling = build_request((t for t in (1, 2)), top_k=-1, temperature=1, stop=("a", "b"),
                             stop_token_ids=range(2, 4), ignore_eos=False).sampling
    assert (sampling.top_k, sampling.temperature, list(sampling.stop), list(sampling.stop_token_ids)) == \
        (-1, 1.0, ["a", "b"], [2, 3])
    # sendable, though the server refuses them by name
    assert build_request([5, -1], top_k=-7, max_tokens=0).sampling.max_tokens == 0
    assert build_request("Hi", request_id=None, model=None).request_id == ""
    assert build_request("naïve 🎉").text == "naïve 🎉"


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
