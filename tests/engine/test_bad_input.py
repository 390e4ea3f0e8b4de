"""Bad input raises ValueError with a message that names the problem, changes nothing, and
leaves other requests in the same engine to finish normally."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.tiny_models import hf_greedy

VOCAB = 512  # the tiny models' vocabulary
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
GOOD = [[5, 17, 300, 42, 9, 11, 250], list(range(100, 140))]


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def llm(llama: Path) -> LLM:
    return LLM(str(llama), num_kv_blocks=64)


@pytest.fixture(scope="module")
def expected(llama: Path) -> list[list[int]]:
    return hf_greedy(llama, GOOD, GREEDY.max_tokens)


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# -- requests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, match", [
    ([], "empty"),
    ([1, VOCAB], r"outside the vocabulary.*512"),
    ([-1, 3], r"outside the vocabulary"),
    ([3] * 1024, r"1024 tokens.*context is 1024"),
    ("hello", "no tokenizer"),
])
def test_bad_prompt(llm: LLM, prompt, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request(prompt, GREEDY)
    assert_idle(llm.engine)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"logprobs": -1}, "logprobs"),
])
def test_bad_sampling_params(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_max_model_len(llama: Path) -> None:
    llm = LLM(str(llama), num_kv_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="prompt 0: prompt has 64 tokens; the model's context is 64"):
        llm.generate([[7] * 64], GREEDY)
    assert_idle(llm.engine)
    out = llm.generate([[7] * 63], GREEDY)[0]  # fits, but the context ends after one new token
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len=2048"):
        LLM(str(llama), num_kv_blocks=16, max_model_len=2048)


def test_request_larger_than_the_kv_cache(llama: Path) -> None:
    llm = LLM(str(llama), num_kv_blocks=4)  # 64 slots
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[7] * 60], SamplingParams(max_tokens=16))
    assert_idle(llm.engine)
    assert len(llm.generate([[7] * 40], SamplingParams(max_tokens=16))[0].token_ids) == 16


def test_other_bad_requests(llm: LLM) -> None:
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.engine.add_request([1, 2], {"temperature": 0})
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1, 2]], [GREEDY, GREEDY])
    llm.engine.add_request([1, 2], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="'dup' is already running"):
        llm.engine.add_request([3, 4], GREEDY, request_id="dup")
    assert llm.engine.abort("dup") and not llm.engine.abort("dup")
    assert_idle(llm.engine)


# -- models -----------------------------------------------------------------------------------

def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "no_such_model"))
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "no_such_model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path / "empty"))


def test_truncated_safetensors(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated"
    shutil.copytree(llama, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        LLM(str(bad), num_kv_blocks=16)


def test_truncated_gguf(tmp_path: Path) -> None:
    from engine.loader.gguf import default_model_path

    data = Path(default_model_path()).read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        LLM(str(bad), num_kv_blocks=16)


# -- the rest of the batch is unharmed ---------------------------------------------------------

def test_bad_request_leaves_the_running_batch_alone(llama: Path, expected: list[list[int]]) -> None:
    engine = LLMEngine.from_model(str(llama), num_kv_blocks=64)
    free_at_start = engine.block_manager.num_free_blocks
    good = [engine.add_request(p, GREEDY) for p in GOOD]
    engine.step()
    engine.step()  # both are running and hold blocks
    assert all(s.num_output_tokens == 2 for s in good)
    assert engine.block_manager.num_free_blocks < free_at_start
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 2, 10_000], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
    assert sorted(outs) == sorted(s.request_id for s in good)
    assert [outs[s.request_id].token_ids for s in good] == expected
    assert engine.block_manager.num_free_blocks == free_at_start


def test_generate_with_one_bad_prompt(llm: LLM, expected: list[list[int]]) -> None:
    with pytest.raises(ValueError, match=r"prompt 2: .*outside the vocabulary"):
        llm.generate([GOOD[0], GOOD[1], [4, 5, VOCAB + 1], [6]], GREEDY)
    assert_idle(llm.engine)
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate([GOOD[0], []], GREEDY)
    assert_idle(llm.engine)
    outs = llm.generate(GOOD, GREEDY)  # the next call works and is exact
    assert [o.token_ids for o in outs] == expected
    assert_idle(llm.engine)


def test_logprobs_beyond_the_vocabulary(llama: Path, expected: list[list[int]]) -> None:
    llm = LLM(str(llama), num_kv_blocks=64)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([GOOD[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=VOCAB + 88))
    assert_idle(llm.engine)
    assert [o.token_ids for o in llm.generate(GOOD, GREEDY)] == expected


def test_non_integer_token_id(llama: Path, expected: list[list[int]]) -> None:
    llm = LLM(str(llama), num_kv_blocks=64)
    with pytest.raises(ValueError, match="prompt 1: "):
        llm.generate([GOOD[0], [1, None]], GREEDY)
    assert_idle(llm.engine)
    assert [o.token_ids for o in llm.generate(GOOD, GREEDY)] == expected
