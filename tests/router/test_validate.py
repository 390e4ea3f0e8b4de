"""The router's validation refuses what no replica could serve, naming the field and the real limit:
top_k, long stop strings, and prompts over what the pools' KV caches hold (not only the model's context)."""
from __future__ import annotations

import pytest

from protos.pdserve.v1 import pdserve_pb2 as pb
from router.validate import InvalidRequest, Limits, kv_tokens, parse, validate


class CharTokenizer:
    """One token per character: enough for stop strings and text prompts."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]


def limits(**kv) -> Limits:
    return Limits(vocab_size=100, max_model_len=8192, max_request_bytes=1 << 20, max_logprobs=20, max_stop_strings=4,
                  model_names=("default",), **kv)


def request(num_prompt_tokens: int = 4, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * num_prompt_tokens),
                              sampling=pb.SamplingParams(**sampling))


def refused(req: pb.GenerateRequest, lim: Limits, tokenizer=None) -> str:
    with pytest.raises(InvalidRequest) as e:
        validate(req, tokenizer, lim)
    return str(e.value)


def test_top_k_minus_one_and_zero_are_off_and_the_message_says_so() -> None:
    assert validate(request(top_k=-1), None, limits()).params["top_k"] == 0
    assert validate(request(top_k=0), None, limits()).params["top_k"] == 0
    assert validate(request(top_k=5), None, limits()).params["top_k"] == 5
    assert refused(request(top_k=-2), limits()) == \
        "sampling.top_k=-2: must be -1 or 0 (off: all tokens) or >= 1 (keep the top_k most likely)"


def test_a_stop_string_over_the_limit_is_refused_naming_it() -> None:
    ok = request(stop=["END", "x" * 256])
    assert validate(ok, CharTokenizer(), limits()).stop == ("END", "x" * 256)
    message = refused(request(stop=["END", "x" * 2000]), limits(), CharTokenizer())
    assert message.startswith("sampling.stop[1] is 2000 characters; at most 256")
    assert "at most 8" in refused(request(stop=["x" * 9]), limits(max_stop_string_length=8), CharTokenizer())


def test_a_prompt_over_the_prefill_pools_kv_is_not_refused_but_marked_for_the_decode_replica() -> None:
    lim = limits(decode_kv_tokens=16384, prefill_kv_tokens=4096)
    assert lim.context == 8192  # what ListModels says: the decode side bounds a request, not the prefill side
    assert validate(request(5000), None, lim).prompt_token_ids == [1] * 5000
    assert lim.fits_prefill(4095) and not lim.fits_prefill(4096)  # the prefill replica also holds the first token
    assert limits().fits_prefill(8000)  # no prefill pool figures: no limit from it


def test_the_decode_pools_kv_bounds_prompt_and_output_together() -> None:
    lim = limits(decode_kv_tokens=2048)
    assert lim.context == 2048
    assert refused(request(3000), lim) == ("prompt has 3000 tokens; the context length is 2048 (what a decode "
                                           "replica's KV cache holds; the model's is 8192), so a prompt may have "
                                           "at most 2047")
    assert refused(request(2000, max_tokens=49), lim) == (
        "sampling.max_tokens=49: must be in [1, 48]: the prompt has 2000 tokens and the context length is 2048 (what "
        "a decode replica's KV cache holds; the model's is 8192)")
    assert validate(request(2000, max_tokens=48), None, lim).params["max_tokens"] == 48
    assert validate(request(2000), None, lim, default_max_tokens=None).params["max_tokens"] == 48
    # without pool figures, the model's context alone
    assert limits().context == 8192
    assert refused(request(8192), limits()).endswith("the context length is 8192, so a prompt may have at most 8191")


def test_kv_tokens_is_the_context_or_what_the_cache_holds() -> None:
    assert kv_tokens({"max_model_len": 8192, "num_kv_blocks": 128, "block_size": 16}) == 2048
    assert kv_tokens({"max_model_len": 1024, "num_kv_blocks": 128, "block_size": 16}) == 1024


def test_bytes_that_do_not_parse_are_an_invalid_request_saying_why() -> None:
    good = pb.GenerateRequest(text="hi", request_id="r1")
    assert parse(pb.GenerateRequest, good.SerializeToString()) == good
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (text), 2 bytes that are not UTF-8
    error = parse(pb.GenerateRequest, bad_utf8)
    assert isinstance(error, InvalidRequest)
    assert str(error) == "the request is not a valid GenerateRequest: string field had bad UTF-8"
    truncated = parse(pb.GenerateRequest, b"\x0a\x05hi")
    assert str(truncated) == "the request is not a valid GenerateRequest: wire format was corrupt"


def test_the_router_knows_a_token_that_ends_a_request_as_the_engine_does() -> None:
    """Where a request must be continued elsewhere after its first token (the decode replica died before
    taking it), a first token that ends it ends it there: end-of-sequence unless ignore_eos, or a stop token."""
    lim = limits(eos_token_ids=(2, 7))
    params = validate(request(temperature=0, max_tokens=5), None, lim).params
    assert lim.ends_request(2, params) and lim.ends_request(7, params) and not lim.ends_request(3, params)
    ignoring = validate(request(temperature=0, max_tokens=5, ignore_eos=True, stop_token_ids=[3]), None, lim).params
    assert not lim.ends_request(2, ignoring) and lim.ends_request(3, ignoring)
