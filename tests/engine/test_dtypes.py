"""dtype="bfloat16" and "float16": weights, activations and the KV cache in that dtype (nothing left in fp32, on
the offline path or a pool's), the KV cache at half fp32's bytes, and greedy tokens against transformers loading
the same checkpoint in the same dtype.

What "the same tokens" can mean in half precision. A forward is bit for bit transformers' only where both run
the same ops on the same shapes in the same order. A whole prompt's prefill does: RMSNorm, rotary, the SDPA call
and the matmuls round as transformers' do (hidden states equal in every bit), so each prompt's first token is
transformers' own. A decode step does not: the engine runs a step's decodes as one SDPA call over K/V padded to
a multiple of the block size and masked, and the padding changes the kernel's fp32 summation order, so the
attention output may differ from transformers' unpadded call in its last bit, and the logits by about one unit
in the last place (bf16: 0.03 at |logit| ~ 5). Greedy picks the same token unless two logits lie that close. So
past the first token the test asserts what holds on any CPU: every token is the argmax of transformers' logits
over the same context, or within MARGIN_ULPS units in the last place of it (a rounding tie); the tokens equal
transformers' own greedy continuation up to the first such tie; and logprobs agree to LOGPROB_EPS of the dtype's
eps. (On this checkpoint every token is in fact transformers' argmax, a gap of 0.)"""
from __future__ import annotations

import random
import uuid
from itertools import chain
from pathlib import Path

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.config import resolve_dtype
from engine.layers.fused import add_rms_norm
from engine.layers.rotary import RotaryEmbedding, rotate_
from tests.engine.tiny_models import hf_greedy, hf_logits

LENGTHS = (1, 2, 7, 16, 17, 40, 129, 300)  # one block to 19; one prefill batch, then batched decodes
PROMPTS = [[random.Random(n).randrange(512) for _ in range(n)] for n in LENGTHS]
NUM_NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0)
MARGIN_ULPS = 4  # a token may trail transformers' top logit by this many units in the last place (a tie)
LOGPROB_EPS = 16  # logprobs agree to this many eps of the dtype (bf16: 0.125, fp16: 0.0156)
HALF = ["bfloat16", "float16"]


def floats(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at |x|."""
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny))))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_runs_in_that_dtype(tiny_checkpoints: dict[str, Path], dtype: str) -> None:
    path = str(tiny_checkpoints["llama"])
    want = getattr(torch, dtype)
    engine = LLM(path, dtype, num_kv_blocks=16).engine
    fp32 = LLMEngine.from_model(path, num_kv_blocks=16, weight_panels=False)
    runner = engine.runner
    assert engine.config.dtype is want and runner.kv_cache.dtype is want
    assert floats(runner.model) == {want}  # every weight, norm and rotary table: none left in fp32
    assert floats(fp32.runner.model) == {torch.float32}
    assert runner.kv_cache.nbytes * 2 == fp32.runner.kv_cache.nbytes
    assert runner.cost.kv_bytes_per_token * 2 == fp32.runner.cost.kv_bytes_per_token
    assert runner.cost.weight_bytes * 2 == fp32.runner.cost.weight_bytes
    assert runner.native_unsupported == "not CPU fp32"  # the C decoder is fp32-only: the Python forward runs
    # the other spellings name the same dtype
    assert resolve_dtype({"bfloat16": "bf16", "float16": "fp16"}[dtype]) is want
    assert LLM(path, want, num_kv_blocks=4).engine.runner.kv_cache.dtype is want


@pytest.mark.parametrize("dtype", HALF)
def test_norm_and_rotary_round_as_transformers_do(dtype: str) -> None:
    """Bit for bit transformers' LlamaRMSNorm (normalize in fp32, round, then scale in the dtype) and rotary (cos and
    sin rounded to the dtype, then q * cos + rotate_half(q) * sin in it), Llama-3 frequency scaling included."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    td = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(37, 64, generator=gen).to(td) for _ in range(2))
    norm = LlamaRMSNorm(64, eps=1e-6).to(td)
    norm.weight.data.copy_(torch.rand(64, generator=gen) + 0.5)
    out, summed = add_rms_norm(x.clone(), residual.clone(), norm.weight, 1e-6)
    assert torch.equal(summed, x + residual) and torch.equal(out, norm(x + residual))
    out, _ = add_rms_norm(x.clone(), None, norm.weight, 1e-6)
    assert torch.equal(out, norm(x))

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=512,
                      rope_parameters=dict(rope_theta=10000.0, **scaling))
    positions = torch.tensor([0, 1, 5, 17, 100, 300, 511])
    q, k = torch.randn(7, 4, 16, generator=gen).to(td), torch.randn(7, 2, 16, generator=gen).to(td)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    default = torch.get_default_dtype()
    torch.set_default_dtype(td)  # as the ModelRunner builds the model
    try:
        rotary = RotaryEmbedding(16, 512, 10000.0, scaling)
    finally:
        torch.set_default_dtype(default)
    qk = torch.cat([q, k], dim=1)
    rotate_(qk, rotary(positions))
    assert torch.equal(qk[:, :4], want_q[0].transpose(0, 1)) and torch.equal(qk[:, 4:], want_k[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_greedy_matches_transformers(tiny_checkpoints: dict[str, Path], dtype: str) -> None:
    path = tiny_checkpoints["llama"]
    td = getattr(torch, dtype)
    outs = LLM(str(path), dtype, num_kv_blocks=256).generate(PROMPTS, GREEDY)
    # sdpa: the SDPA call the engine's torch attention makes ("eager" rounds the scores to the dtype first)
    ref = hf_greedy(path, PROMPTS, NUM_NEW, dtype=td, attn_implementation="sdpa")
    assert len({tuple(r) for r in ref}) == len(ref)  # distinct continuations: a mix-up would show
    for prompt, out, want in zip(PROMPTS, outs, ref):
        n = len(prompt)
        assert len(out.token_ids) == NUM_NEW and out.finish_reason == "length"
        assert out.token_ids[0] == want[0], f"prompt of {n} tokens: the prefill's token is not transformers'"
        logits = hf_logits(path, prompt, out.token_ids, td, "sdpa")  # over the engine's own context
        top = logits.max(dim=-1).values
        margin = MARGIN_ULPS * ulp(top, td)
        mine = logits.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        far = (top - mine > margin).nonzero().flatten().tolist()
        assert not far, f"prompt of {n} tokens: tokens at {far} are not transformers' argmax or a tie with it"
        # token for token with transformers' own greedy run, up to a tie where the two may part
        split = next((i for i, (a, b) in enumerate(zip(out.token_ids, want)) if a != b), NUM_NEW)
        if split < NUM_NEW:
            theirs = logits[split, want[split]]
            assert top[split] - theirs <= margin[split], f"prompt of {n} tokens parts from transformers at {split}"
        lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        ours = torch.tensor([t.logprob for t in out.logprobs])
        torch.testing.assert_close(ours, lp, atol=LOGPROB_EPS * torch.finfo(td).eps, rtol=0)


@pytest.fixture
def pool_name():
    from kv_transfer.shm import unlink_pool

    name = f"test-dtype-{uuid.uuid4().hex[:8]}"
    yield name
    unlink_pool(name)


def test_a_pools_dtype_reaches_its_engine_and_the_kv_it_sends(tiny_checkpoints: dict[str, Path], pool_name) -> None:
    """A cluster pool's `dtype` key: what its replicas build (PoolConfig.engine_kwargs -> LLMEngine.from_model, as
    prefill_worker/decode_worker do) and the shared KV pool a prefill replica writes into are bf16, and a
    prefill -> shared memory -> decode handoff gives the tokens of one bf16 engine."""
    from kv_transfer import KVReceiver, KVSender
    from kv_transfer.metadata import PoolHandle
    from kv_transfer.shm import ShmKVSaver, shared_pool_allocator
    from pdserve.config import PoolConfig

    model = str(tiny_checkpoints["llama"])
    kwargs = PoolConfig(dtype="bfloat16", num_threads=None).engine_kwargs()  # None: keep this process's threads
    handles: list[PoolHandle] = []
    decode = LLMEngine.from_model(model, **{**kwargs, "block_size": 8}, load_tokenizer=False,
                                  kv_allocator=shared_pool_allocator(pool_name, handles))
    prefill = LLMEngine.from_model(model, **{**kwargs, "max_num_batched_tokens": 32}, load_tokenizer=False)
    for engine in (prefill, decode):
        assert floats(engine.runner.model) == {torch.bfloat16} and engine.runner.kv_cache.dtype is torch.bfloat16
    assert [h.dtype for h in handles] == ["bfloat16"]
    saver = ShmKVSaver()
    saver.attach(handles[0])
    sender, receiver = KVSender(prefill, saver), KVReceiver(decode, pool_name, 30.0)
    prompts, params = PROMPTS[2:7], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i, prompt in enumerate(prompts):  # chunked prefill (32-token budget), sent to blocks of 8
        target = receiver.reserve(prompt, params, f"r{i}")
        assert target is not None
        sender.add(prompt, params, target)
    while prefill.has_unfinished():
        for done in sender.step():
            receiver.commit(done.target.request_id, done.first_token, done.logprobs)
    got: dict[str, list[int]] = {}
    while decode.has_unfinished():
        got.update((o.request_id, o.token_ids) for o in decode.step())
    assert saver.bytes_sent > 0
    want = LLM(model, "bfloat16", num_kv_blocks=64).generate(prompts, params)
    assert [got[f"r{i}"] for i in range(len(prompts))] == [o.token_ids for o in want]
