"""A hostile client against a running cluster (the tiny random llama, given a byte-level tokenizer
and a chat template so text, chat and stop strings are exercised too): arbitrary GenerateRequests
and arbitrary bytes each end OK or with a documented status, never UNKNOWN or INTERNAL, and every
KV block is free again afterwards. And a prompt over what the prefill pool's KV holds is prefilled
on the decode replica instead of failing late."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve import Client, RequestError
from pdserve.launch import start_cluster
from protos.pdserve.v1 import pdserve_pb2 as pb
from router.validate import CHAT_ROLES
from tests.e2e.conftest import small_cluster, wait_idle

# the same 60 examples each run (CI); PDSERVE_FUZZ_EXAMPLES=N: N fresh random ones, to hunt for more
EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", 60))
PREFILL_KV_BLOCKS = 32  # 512 tokens of 16: less than the tiny model's 1,024-token context
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def with_byte_tokenizer(checkpoint: Path, folder: Path) -> Path:
    """A copy of the checkpoint with a byte-level tokenizer (257 ids, within the model's 512) and a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    shutil.copytree(checkpoint, folder)
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|end|>", special=True)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_checkpoints, tmp_path_factory):
    model = with_byte_tokenizer(tiny_checkpoints["llama"], tmp_path_factory.mktemp("fuzz") / "llama")
    config = small_cluster(str(model), max_ongoing_requests=4, max_queued_requests=8, local_prefill_threshold=8)
    config = replace(config, prefill=replace(config.prefill, num_kv_blocks=PREFILL_KV_BLOCKS))
    with start_cluster(config, progress=None) as c:
        assert c.router.limits.prefill_kv_tokens == PREFILL_KV_BLOCKS * 16
        yield c


# What a hostile client sends: mostly requests that could be served, each field sometimes odd.

def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """usual 5 times in 6, so that most requests get past validation (st.one_of would merge repeated branches)."""
    return st.sampled_from([usual] * 5 + [odd]).flatmap(lambda strategy: strategy)


texts = st.text(st.characters(codec="utf-8"), max_size=40)  # any code point UTF-8 can carry: controls, specials, emoji
some_text = mostly(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40), st.just(""))
token_ids = mostly(st.lists(mostly(st.integers(0, 511), st.integers(-(1 << 31), (1 << 31) - 1)), min_size=1,
                            max_size=40), st.just([]))
floats = st.floats(width=32)  # nan, inf, negatives, denormals
sampling = st.builds(
    pb.SamplingParams,
    temperature=mostly(st.none() | st.sampled_from([0.0, 0.7, 1.0]), floats | st.just(1e-30)),
    top_k=mostly(st.integers(-1, 600), st.integers(-(1 << 31), (1 << 31) - 1)),
    top_p=mostly(st.none() | st.floats(0.01, 1.0), floats | st.just(1e-30)),
    seed=st.none() | st.integers(0, (1 << 64) - 1),
    max_tokens=mostly(st.none() | st.integers(1, 8), st.integers(0, (1 << 32) - 1)),
    stop=st.lists(mostly(some_text, st.text(min_size=250, max_size=300)), max_size=3),
    stop_token_ids=st.lists(mostly(st.integers(0, 511), st.integers(-5, 1000)), max_size=4),
    ignore_eos=st.booleans(),
    logprobs=mostly(st.none() | st.integers(0, 20), st.integers(0, (1 << 32) - 1)),
)
message = st.builds(pb.ChatMessage, role=mostly(st.sampled_from(CHAT_ROLES), texts), content=texts)
messages = mostly(st.lists(message, min_size=1, max_size=3), st.just([]))


@st.composite
def requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=draw(mostly(st.just("") | texts, st.text(min_size=250, max_size=300))),
                                 model=draw(mostly(st.sampled_from(["", "llama"]), texts)))
    form = st.sampled_from(["text", "chat", "token_ids"])
    for f in draw(mostly(st.sets(form, min_size=1, max_size=1), st.sets(form, max_size=3))):  # none or several: odd
        if f == "text":
            request.text = draw(some_text)
        elif f == "chat":
            request.chat.SetInParent()
            request.chat.messages.extend(draw(messages))
        else:
            request.token_ids.SetInParent()
            request.token_ids.ids.extend(draw(token_ids))
    if draw(st.booleans()):
        request.sampling.CopyFrom(draw(sampling))
    return request


def one_byte_changed(data: bytes) -> st.SearchStrategy[bytes]:
    if not data:
        return st.just(b"\xff")
    return st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
        lambda t: data[:t[0]] + bytes([t[1]]) + data[t[0] + 1:])


encoded = requests().map(lambda r: r.SerializeToString())
wire = mostly(encoded, st.binary(max_size=64) | encoded.flatmap(one_byte_changed))


def send(channel: grpc.Channel, data: bytes) -> tuple[grpc.StatusCode, str, list[pb.GenerateResponse]]:
    generate = channel.unary_stream("/pdserve.v1.Generation/Generate",  # bytes in, as any client may send
                                    response_deserializer=pb.GenerateResponse.FromString)
    chunks: list[pb.GenerateResponse] = []
    try:
        for chunk in generate(data, timeout=60):
            chunks.append(chunk)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", chunks
    return grpc.StatusCode.OK, "", chunks


def test_arbitrary_requests_end_ok_or_with_a_documented_status(cluster) -> None:
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(cluster.address) as channel:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES == 60,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(wire)
        def one(data: bytes) -> None:
            code, details, chunks = send(channel, data)
            seen[code] = seen.get(code, 0) + 1
            assert code in DOCUMENTED, f"{code.name}: {details} (request {data!r:.300})"
            if code != grpc.StatusCode.OK:
                assert details and "Traceback" not in details and "<class" not in details, details
                return
            request = pb.GenerateRequest.FromString(data)
            assert chunks and chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            text = "".join(c.text for c in chunks)
            assert not any(s in text for s in request.sampling.stop), (text, list(request.sampling.stop))
            budget = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
            assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks) <= budget

        one()
    assert seen.get(grpc.StatusCode.OK) and seen.get(grpc.StatusCode.INVALID_ARGUMENT), seen  # both sides exercised
    with Client(cluster.address) as client:
        assert not any(wait_idle(client).values())


def test_bytes_that_are_not_utf8_are_invalid_argument(cluster) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        for data in (b"\x0a\x02\xff\xfe", pb.GenerateRequest(text="hi").SerializeToString() + b"\x2a\x01\x80"):
            code, details, _ = send(channel, data)
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                       "the request is not a valid GenerateRequest: string field had bad UTF-8")


def test_a_prompt_over_the_prefill_pools_kv_is_prefilled_on_the_decode_replica(cluster) -> None:
    with Client(cluster.address, timeout=60) as client:
        (model,) = client.list_models()
        assert model.max_model_len == 1024  # the context: the decode pool holds it, whatever the prefill pool holds
        longest = client.generate([1] * 511, max_tokens=2, temperature=0)  # fits the prefill pool's 512 tokens
        assert longest.timings["path"] == "disaggregated" and len(longest.token_ids) == 2
        over = client.generate([1] * 600, max_tokens=2, temperature=0)  # does not: no late refusal, the local path
        assert over.timings["path"] == "local" and len(over.token_ids) == 2
        with pytest.raises(RequestError) as refused:
            client.generate([1] * 1024, max_tokens=1)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1023" in refused.value.details
        assert not any(wait_idle(client).values())
