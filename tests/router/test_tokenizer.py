"""The router tokenizes and detokenizes without transformers, exactly as the engine does with it."""
from __future__ import annotations

import pytest

from detok import IncrementalDetokenizer
from engine.loader import tokenizer_files
from engine.loader.gguf import default_model_path, load_gguf_tokenizer
from replica.contract import StreamItem
from router.stream import Output
from router.tokenizer import Tokenizer

TEXTS = ["Hello world", "naïve café, 日本語のテキスト 🎉🎉 done", "  spaces\tand\nnewlines  ", "<|im_start|>user\nhi"]


@pytest.fixture(scope="module")
def tokenizers():
    return Tokenizer(tokenizer_files("default")), load_gguf_tokenizer(default_model_path())


def test_encode_chat_template_and_decode_equal_transformers(tokenizers) -> None:
    ours, hf = tokenizers
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(hf.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🎉"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    for messages in (chat, chat[1:2]):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == hf.encode(text, add_special_tokens=False)


def test_streamed_text_never_splits_a_character(tokenizers) -> None:
    ours, _ = tokenizers
    for text in TEXTS:
        ids = ours.encode(text)
        detok = IncrementalDetokenizer(ours)
        deltas = [detok.push([i]) for i in ids] + [detok.flush()]
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == ours.decode(ids)
    assert any(len(ours.encode(c)) > 1 for c in "日本語🎉")  # the case above is real: multi-token characters


def test_stop_string_split_across_tokens_is_held_back_and_cut(tokenizers) -> None:
    ours, _ = tokenizers
    ids = ours.encode("The answer is 42. END of story")
    out = Output("r", ours, stop=("END of",))
    sent = ""
    for i in ids:
        if chunk := out.add([StreamItem("r", i)]):
            sent += chunk.text
            assert "END" not in sent  # never streamed, not even its first part
        if out.stopped:
            break
    from protos.pdserve.v1 import pdserve_pb2 as pb

    sent += out.finish("length", pb.Usage(), pb.Timings()).text
    assert sent == "The answer is 42. " and out.stopped


def test_a_token_s_bytes_are_its_own_even_inside_a_character(tokenizers) -> None:
    """For logprobs: each token's bytes, joined, are the text's UTF-8 (a token may hold part of a character,
    where decoding it alone gives U+FFFD); its text shows such bytes as \\xNN, so distinct tokens read apart."""
    ours, _ = tokenizers
    for text in TEXTS[:3]:
        ids = ours.encode(text, add_special_tokens=False)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode()
    ids = ours.encode("日本 🎉", add_special_tokens=False)
    partial = [i for i in ids if ours.decode([i]) == "\ufffd"]
    assert len(partial) >= 2 and len({ours.token_text(i) for i in partial}) == len(set(partial))
    assert all("\ufffd" not in ours.token_text(i) and "\\x" in ours.token_text(i) for i in partial)


def test_the_first_output_word_keeps_its_space_after_the_prompt_with_a_sentencepiece_tokenizer() -> None:
    # SentencePiece (Llama, Mistral) drops the leading space of the first word of a decode: the output decoded on its
    # own reads "Paris is"; after the prompt, as vLLM streams it, " Paris is". The router and the engine agree.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from detok import output_text
    from protos.pdserve.v1 import pdserve_pb2 as pb

    words = ["<unk>", "\u2581What", "\u2581is", "\u2581the", "\u2581capital?", "\u2581Paris", "\u2581it", "."]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    ours = Tokenizer({"tokenizer.json": hf.to_str()})
    prompt, output = [1, 2, 3, 4], [5, 2, 6, 7]
    assert ours.decode(output) == "Paris is it."  # alone: no leading space
    out = Output("r", ours, (), prompt)
    streamed = "".join(out.add([StreamItem("r", i)]).text for i in output)
    streamed += out.finish("length", pb.Usage(), pb.Timings()).text
    assert streamed == " Paris is it." == output_text(ours, prompt, output)
    assert output_text(ours, [], output) == "Paris is it."  # no prompt: as the decode alone
