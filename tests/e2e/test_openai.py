"""The OpenAI-compatible HTTP front door on a real cluster (the default model), driven by the
official `openai` package and by raw HTTP: the same tokens as the gRPC SDK and the offline
engine, OpenAI's shapes and streaming, its error statuses, and a client that leaves mid-stream
freeing its blocks on both pools."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from pdserve import Client
from tests.e2e.conftest import wait_idle

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def api(default_cluster):
    base = f"http://{default_cluster.http_address}/v1"
    return default_cluster, base, openai.OpenAI(base_url=base, api_key="unused", max_retries=0)


def test_chat_equals_the_grpc_sdk_and_the_offline_engine(api) -> None:
    cluster, _, client = api
    got = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=24)
    with Client(cluster.address, timeout=60) as sdk:
        want = sdk.chat(MESSAGES, temperature=0, max_tokens=24)
    llm = LLM("default")
    offline = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24))[0]
    assert got.choices[0].message.content == want.text == offline.text
    assert got.choices[0].message.role == "assistant" and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids) == len(offline.token_ids)
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    # the router knows the tokens that end a request, for a request it must end without an engine
    assert cluster.router.limits.eos_token_ids == tuple(llm.engine.config.model_config.eos_token_ids)


def test_a_resent_conversation_reports_its_cached_prompt_tokens(api) -> None:
    """The second turn resends the first with its answer: usage.prompt_tokens_details.cached_tokens says how
    much of it came from a prefix cache (a fresh prompt: none), and the gRPC SDK says the same."""
    cluster, _, client = api
    system = {"role": "system", "content": "You answer questions about rivers. " * 40}
    first = [system, {"role": "user", "content": "Which river is the longest?"}]
    one = client.chat.completions.create(model="default", messages=first, temperature=0, max_tokens=16)
    assert one.usage.prompt_tokens_details.cached_tokens == 0
    second = [*first, {"role": "assistant", "content": one.choices[0].message.content},
              {"role": "user", "content": "And the widest?"}]
    two = client.chat.completions.create(model="default", messages=second, temperature=0, max_tokens=16)
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert one.usage.prompt_tokens // 16 * 16 - 16 <= cached < two.usage.prompt_tokens
    with Client(cluster.address, timeout=60) as sdk:
        again = sdk.chat(second, temperature=0, max_tokens=16)
    assert again.text == two.choices[0].message.content and again.cached_tokens >= cached


def test_completions_stream_and_not_agree_and_take_every_prompt_form(api) -> None:
    _, base, client = api
    whole = client.completions.create(model="default", prompt="The capital of France is", temperature=0,
                                      max_tokens=12)
    chunks = list(client.completions.create(model="default", prompt="The capital of France is", temperature=0,
                                            max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    ids = [504, 3458, 282, 4649, 314]
    several = client.completions.create(model="default", prompt=[ids, "Hello", ids], temperature=0, max_tokens=6)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].text == several.choices[2].text
    assert several.usage.completion_tokens == 18
    with httpx.stream("POST", f"{base}/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0,
                                                           "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    bodies = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(b["object"] == "text_completion" and b["id"] == bodies[0]["id"] for b in bodies)
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_n_choices_with_a_seed_are_reproducible_and_logprobs_are_there(api) -> None:
    _, _, client = api

    def two():
        return client.chat.completions.create(model="default", messages=MESSAGES, n=2, seed=7, temperature=1.0,
                                              max_tokens=16, logprobs=True, top_logprobs=2,
                                              extra_body={"ignore_eos": True})

    out = two()
    first = [c.message.content for c in out.choices]
    assert [c.message.content for c in two().choices] == first and len(first) == 2
    assert out.usage.completion_tokens == 32
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 16 and "".join(t.token for t in content) == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_async_streaming_chat(api) -> None:
    cluster, base, _ = api

    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(model="default", messages=MESSAGES, temperature=0,
                                                      max_tokens=16, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream]
        whole = await client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=16)
        return "".join(parts), whole.choices[0].message.content

    streamed, whole = asyncio.run(run())
    assert streamed == whole and streamed


def test_errors_in_openai_shape_with_their_status(api) -> None:
    cluster, base, client = api
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported"):
        client.chat.completions.create(model="default", messages=MESSAGES,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="default", prompt="Hi", max_tokens=100_000)
    r = httpx.post(f"{base}/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/chat/completions", json={"messages": "hi"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{base}/completions", content=b"[" * 100_000, timeout=10)  # nested past Python's stack
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{base}/models", timeout=10).json()["data"][0]["id"] == "default"
    assert httpx.get(f"http://{cluster.http_address}/health", timeout=10).status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_blocks(api) -> None:
    cluster, base, _ = api
    # 1500 tokens take this cluster well over 5 s: blocks freed sooner mean the request was cancelled
    with httpx.stream("POST", f"{base}/completions", json={"prompt": "Once upon a time", "max_tokens": 1500,
                                                           "temperature": 0, "ignore_eos": True, "stream": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    with Client(cluster.address) as sdk:
        assert not any(wait_idle(sdk, timeout_s=5).values())


def test_more_streamed_choices_than_the_router_runs_at_once_still_finish(api) -> None:
    """5 prompts x n=2 is 10 choices against max_ongoing_requests 8: the first 8 stream while 2 wait their
    turn (a choice that has started is drained, so it ends and frees its slot for them)."""
    cluster, base, _ = api
    body = {"prompt": ["a", "b", "c", "d", "e"], "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{base}/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    finished = [c["index"] for line in lines[:-1] for c in json.loads(line.removeprefix("data: "))["choices"]
                if c["finish_reason"] == "length"]
    assert sorted(finished) == list(range(10))
    with Client(cluster.address) as sdk:
        assert not any(wait_idle(sdk, timeout_s=10).values())


def test_a_client_that_leaves_before_its_whole_response_frees_its_blocks(api) -> None:
    """Not streamed: the client gives up after 1 s of a 1500-token answer, and the request ends with it."""
    cluster, base, _ = api
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/completions", json={"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
                                                "ignore_eos": True}, timeout=1)
    with Client(cluster.address) as sdk:
        assert not any(wait_idle(sdk, timeout_s=5).values()) and sdk.status().requests_in_flight == 0
