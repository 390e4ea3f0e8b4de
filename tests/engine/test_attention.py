"""Attention backends agree with a dense causal attention over each sequence's whole context."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine.attention.backend import available_backends, get_backend
from engine.attention.metadata import AttentionMetadata

BLOCK, KV_HEADS, HEADS, DIM = 16, 2, 6, 32


def _batch(query_lens: list[int], context_lens: list[int], seed: int = 0, heads: int = HEADS, kv_heads: int = KV_HEADS,
           dim: int = DIM):
    """Random sequences on shuffled blocks; the cache already holds each context's first
    (context - query) tokens, the new ones come as k/v."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // BLOCK) for c in context_lens) + 3
    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    full_k, full_v, tables, slots = [], [], [], []
    for n, c in zip(query_lens, context_lens):
        table = [free.pop() for _ in range(-(-c // BLOCK))]
        tables.append(table)
        fk, fv = torch.randn(c, kv_heads, dim, generator=gen), torch.randn(c, kv_heads, dim, generator=gen)
        full_k.append(fk)
        full_v.append(fv)
        for p in range(c):
            slot = table[p // BLOCK] * BLOCK + p % BLOCK
            if p < c - n:
                k_cache.view(-1, kv_heads, dim)[slot], v_cache.view(-1, kv_heads, dim)[slot] = fk[p], fv[p]
            else:
                slots.append(slot)
    width = max(map(len, tables))
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    num_decodes = sum(1 for n in query_lens if n == 1)
    assert all(n == 1 for n in query_lens[:num_decodes])
    max_decode = max(context_lens[:num_decodes], default=0)
    seq_lens = torch.tensor(context_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        num_decodes=num_decodes, slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=seq_lens, block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(query_lens), max_seq_len=max(context_lens), query_start_loc_list=qsl,
        seq_lens_list=context_lens, max_decode_len=max_decode,
        decode_mask=(torch.arange(-(-max_decode // BLOCK) * BLOCK) < seq_lens[:num_decodes, None])[:, None, None, :])
    q = torch.randn(qsl[-1], heads, dim, generator=gen)
    k = torch.cat([fk[c - n:] for fk, n, c in zip(full_k, query_lens, context_lens)])
    v = torch.cat([fv[c - n:] for fv, n, c in zip(full_v, query_lens, context_lens)])
    return q, k, v, k_cache, v_cache, meta, full_k, full_v


def _dense(q, full_k, full_v, query_lens, context_lens, dim: int = DIM):
    outs, start = [], 0
    for fk, fv, n, c in zip(full_k, full_v, query_lens, context_lens):
        qi = q[start:start + n].transpose(0, 1)
        mask = torch.ones(n, c, dtype=torch.bool).tril_(c - n)
        outs.append(F.scaled_dot_product_attention(qi, fk.transpose(0, 1), fv.transpose(0, 1), attn_mask=mask,
                                                   scale=dim ** -0.5, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


CPU_BACKENDS = [b for b in available_backends() if b != "flash"]


def test_cpu_kernel_is_available_here() -> None:
    # the C compiler is part of the set-up; losing the kernel silently would cost decode speed
    assert "cpu" in available_backends()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("query_lens,context_lens", [
    ([1, 1, 1], [1, 17, 300]),  # decodes only, one on a block boundary
    ([5, 40], [5, 40]),  # fresh prefills
    ([1, 1, 24, 3], [33, 2, 80, 3]),  # decodes, a chunk with cached context, a fresh prefill
])
def test_backend_matches_dense_attention(backend, query_lens, context_lens) -> None:
    q, k, v, k_cache, v_cache, meta, full_k, full_v = _batch(query_lens, context_lens)
    out = get_backend(backend, torch.device("cpu")).forward(q, k, v, k_cache, v_cache, meta, DIM ** -0.5)
    torch.testing.assert_close(out, _dense(q, full_k, full_v, query_lens, context_lens), atol=2e-5, rtol=1e-4)
    # the new tokens' K/V landed in their slots
    torch.testing.assert_close(k_cache.view(-1, KV_HEADS, DIM)[meta.slot_mapping], k)


@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 2, 32), (4, 4, 16), (8, 2, 64), (16, 2, 48)])
@pytest.mark.parametrize("query_lens,context_lens", [
    ([300], [300]),  # fresh, past the kernel's 256-key chunk, not a multiple of its 16 tokens
    ([1, 37, 17], [9, 600, 17]),  # a decode, a chunk far into its context, a fresh prefill
])
def test_cpu_prefill_kernel_matches_dense_attention(heads, kv_heads, dim, query_lens, context_lens,
                                                    monkeypatch) -> None:
    # the query-head groups of 1, 3, 4 and 8 take every shape of the kernel's register tiles
    q, k, v, k_cache, v_cache, meta, full_k, full_v = _batch(query_lens, context_lens, 1, heads, kv_heads, dim)
    backend = get_backend("cpu", torch.device("cpu"))
    monkeypatch.setattr(backend, "prefill", None)  # the torch path must not be what answers
    out = backend.forward(q, k, v, k_cache, v_cache, meta, dim ** -0.5)
    torch.testing.assert_close(out, _dense(q, full_k, full_v, query_lens, context_lens, dim), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 2, 32), (8, 2, 64), (9, 3, 64), (5, 1, 16), (4, 4, 80)])
@pytest.mark.parametrize("num_seqs", [2, 8])
def test_cpu_decode_kernel_matches_dense_attention(heads, kv_heads, dim, num_seqs) -> None:
    # 8 sequences: one work item a sequence, whose next 16 keys are one run of memory and are
    # prefetched spread over the work (groups up to 4, head_dim up to 64; a group of 5 and
    # head_dim 80 take the other scoring); 2: one item a kv head, prefetched token by token.
    # Contexts end on, before and after the 16-token chunks.
    contexts = [16, 1, 15, 17, 31, 32, 33, 100][:num_seqs]
    q, k, v, k_cache, v_cache, meta, full_k, full_v = _batch([1] * num_seqs, contexts, 2, heads, kv_heads, dim)
    out = get_backend("cpu", torch.device("cpu")).forward(q, k, v, k_cache, v_cache, meta, dim ** -0.5)
    torch.testing.assert_close(out, _dense(q, full_k, full_v, [1] * num_seqs, contexts, dim), atol=2e-5, rtol=1e-4)


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="torch"):
        get_backend("nope", torch.device("cpu"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_engine_greedy_is_the_same_on_every_cpu_backend(tiny_checkpoints, backend) -> None:
    from engine import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 7, 40, 130)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = LLM(str(tiny_checkpoints["llama"]), attention_backend=backend, max_num_batched_tokens=32,
               num_kv_blocks=16).generate(prompts, params)
    ref = LLM(str(tiny_checkpoints["llama"]), attention_backend="torch", num_kv_blocks=64).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_the_c_kernels_leave_the_process_float_environment_alone() -> None:
    """A library built with -ffast-math would flush denormals for the whole process as it loads
    (gcc's crtfastmath.o): torch's own ops, and the caller's, would change."""
    from engine.attention import paged_cpu
    from engine.layers import fused, gemm, qgemm

    tiny = torch.tensor([1e-40])
    assert (tiny * 1.0).item() != 0.0
    if paged_cpu._kernel() is None:
        pytest.skip("no C compiler")
    paged_cpu._prefill_kernel(), fused._lib(), fused._activation_lib(), gemm._lib(), qgemm._lib()
    backend = paged_cpu.PagedCPUAttention()
    k_cache, v_cache = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
    i32 = torch.int32
    meta = AttentionMetadata(  # one decode at position 20: blocks 2 then 1, its slot in block 1
        num_decodes=1, slot_mapping=torch.tensor([20]), query_start_loc=torch.tensor([0, 1], dtype=i32),
        seq_lens=torch.tensor([21], dtype=i32), block_tables=torch.tensor([[2, 1]], dtype=i32), max_query_len=1,
        max_seq_len=21, query_start_loc_list=[0, 1], seq_lens_list=[21], max_decode_len=21)
    q, k, v = torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    backend.forward(q, k, v, k_cache, v_cache, meta, 0.125)
    assert (tiny * 1.0).item() != 0.0 and (tiny + 0.0).item() == tiny.item()
