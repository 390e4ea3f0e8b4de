"""OpenAI-shaped bodies that a GenerateRequest cannot carry are a 400 naming the parameter, never a
500 from protobuf: lone surrogates (JSON can escape them), token ids past int32, a seed that would
wrap, and what OpenAI itself refuses (fractional integers, top_logprobs without logprobs, ...); top_k reaches
the router as given, so it names a bad one."""
from __future__ import annotations

import pytest

from router.openai_shapes import BadParameter, chat_shapes, completion_shapes

BAD = [
    (completion_shapes, {"prompt": "ok \ud800"}, "prompt", "prompt has a lone surrogate at index 3"),
    (completion_shapes, {"prompt": ["fine", "\udc00"]}, "prompt", "prompt has a lone surrogate"),
    (completion_shapes, {"prompt": [1, 1 << 40]}, "prompt", "each token id must be an integer, in [0, vocabulary"),
    (completion_shapes, {"prompt": [[1, True]]}, "prompt", "each token id must be an integer"),
    (completion_shapes, {"prompt": "x", "stop": ["\ud800"]}, "stop", "stop has a lone surrogate"),
    (completion_shapes, {"prompt": "x", "stream_options": [1]}, "stream_options", "stream_options must be an object"),
    (chat_shapes, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "messages has a lone surrogate"),
]
# what OpenAI refuses, as it does
REFUSED = [
    (completion_shapes, {"prompt": "x", "max_tokens": 1.7}, "max_tokens", "max_tokens=1.7: must be an integer"),
    (chat_shapes, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": True},
     "max_completion_tokens", "must be an integer"),
    (completion_shapes, {"prompt": "x", "seed": 0.5}, "seed", "seed=0.5"),
    (completion_shapes, {"prompt": "x", "n": True}, "n", "n=True"),
    (chat_shapes, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs",
     "top_logprobs needs logprobs: true"),
    (completion_shapes, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "only for a streamed response"),
]


@pytest.mark.parametrize("shapes,body,param,message", BAD + REFUSED, ids=[m for *_, m in BAD + REFUSED])
def test_what_protobuf_cannot_carry_or_openai_refuses_is_a_bad_parameter(shapes, body, param, message) -> None:
    with pytest.raises(BadParameter) as info:
        shapes.parse(body)
    assert info.value.param == param and message in str(info.value)


def test_top_k_and_seeds_pass_through() -> None:
    (request,) = completion_shapes.parse({"prompt": "x", "top_k": -5}).requests
    assert request.sampling.top_k == -5  # the router refuses it, naming -1 and 0 as "off"
    first, second = completion_shapes.parse({"prompt": "x", "n": 2, "seed": (1 << 64) - 1}).requests
    assert (first.sampling.seed, second.sampling.seed) == ((1 << 64) - 1, 0)


def test_null_means_unset_as_openai_says() -> None:
    """A client may send null for any optional parameter: the default then, never a 400 or the other key lost."""
    (chat,) = chat_shapes.parse({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": None,
                                 "max_tokens": 2, "temperature": None, "n": None, "stream": None}).requests
    assert chat.sampling.max_tokens == 2 and chat.sampling.temperature == 1.0
    call = completion_shapes.parse({"prompt": "x", "n": None, "max_tokens": 3.0, "seed": -1})
    assert call.n == 1 and not call.stream
    assert call.requests[0].sampling.max_tokens == 3 and call.requests[0].sampling.seed == (1 << 64) - 1






def test_chat_takes_text_parts_and_the_developer_role() -> None:
    """What agent frameworks send: content as a list of text parts (joined), "developer" for the system role."""
    (request,) = chat_shapes.parse({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "there"}]}]}).requests
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "Be brief."), ("user", "Hi, there")]
    with pytest.raises(BadParameter, match="content parts must be text parts.*'image_url'"):
        chat_shapes.parse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(BadParameter, match="string role and string content"):
        chat_shapes.parse({"messages": [{"role": "user", "content": None}]})
