"""Prefill engine -> shared-memory KV pool -> decode engine, in one process: the decode side's
continuation equals one engine doing both, and no failure leaks a block on either side."""
from __future__ import annotations

import random
import time
import uuid

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.sequence import Sequence
from kv_transfer import KVReceiver, KVSender
from kv_transfer.metadata import PoolHandle
from kv_transfer.shm import ShmKVSaver, attach_pool, pool_path, shared_pool_allocator, unlink_pool
from replica.contract import KVLost, LeaseEnded

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def pool_name():
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    unlink_pool(name)


def make_pair(model: str, pool_name: str, lease_s: float = 30.0, decode_blocks: int = 64, **prefill_kw):
    handles: list[PoolHandle] = []
    decode = LLMEngine.from_model(model, num_kv_blocks=decode_blocks, block_size=8,
                                  kv_allocator=shared_pool_allocator(pool_name, handles))
    prefill = LLMEngine.from_model(model, num_kv_blocks=64, **prefill_kw)
    saver = ShmKVSaver()
    saver.attach(handles[0])
    return KVSender(prefill, saver), KVReceiver(decode, pool_name, lease_s), prefill, decode


def run_disaggregated(sender: KVSender, receiver: KVReceiver, prompts, params) -> dict[str, list[int]]:
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        target = receiver.reserve(prompt, params, rid)
        assert target is not None
        sender.add(prompt, params, target)
    outputs = {}
    while sender.engine.has_unfinished():
        for done in sender.step():
            receiver.commit(done.target.request_id, done.first_token, done.logprobs)
    while receiver.engine.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in receiver.engine.step())
    return [outputs[rid] for rid in ids]


def generate_on(engine: LLMEngine, prompts, params) -> list[list[int]]:
    """One engine doing both phases (requests without a kv_target are not sent anywhere)."""
    ids = [engine.add_request(p, params).request_id for p in prompts]
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in engine.step())
    return [outputs[i] for i in ids]


def prompts_of(lengths, vocab=512, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_decode_after_shm_transfer_equals_one_engine(tiny_checkpoints, pool_name, arch) -> None:
    model = str(tiny_checkpoints[arch])
    prompts = prompts_of([1, 5, 40, 130])
    sender, receiver, prefill, decode = make_pair(model, pool_name, max_num_batched_tokens=32)  # chunked
    free_p, free_d = prefill.block_manager.num_free_blocks, decode.block_manager.num_free_blocks
    got = run_disaggregated(sender, receiver, prompts, GREEDY)
    want = [o.token_ids for o in LLM(model, num_kv_blocks=64).generate(prompts, GREEDY)]
    assert got == want
    assert sender.saver.bytes_sent > 0
    assert prefill.block_manager.num_free_blocks == free_p and decode.block_manager.num_free_blocks == free_d


def test_seeded_sampling_survives_the_split(tiny_checkpoints, pool_name) -> None:
    model = str(tiny_checkpoints["qwen2"])
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    prompts = prompts_of([3, 33])
    sender, receiver, _, _ = make_pair(model, pool_name)
    got = run_disaggregated(sender, receiver, prompts, params)
    assert got == [o.token_ids for o in LLM(model, num_kv_blocks=64).generate(prompts, params)]


def test_default_model_through_shm(pool_name) -> None:
    # shm copies run on the prefill engine's thread, so where this CPU has the C decoder stack a prefill step runs
    # whole and sends each layer's K/V after it, from its cache: the decode pool must get what the per-layer Python
    # forward sends, bit for bit, and the continuation equal one engine's
    handles: list[PoolHandle] = []
    decode = LLMEngine.from_model("default", num_kv_blocks=64, block_size=8, enable_prefix_caching=False,
                                  kv_allocator=shared_pool_allocator(pool_name, handles))
    receiver = KVReceiver(decode, pool_name, 30.0)
    prompt = decode.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(temperature=0, max_tokens=12)
    kv, got = {}, {}
    for native in (True, False):
        prefill = LLMEngine.from_model("default", num_kv_blocks=64, max_num_batched_tokens=16, native_decoder=native)
        saver = ShmKVSaver()
        saver.attach(handles[0])
        sender = KVSender(prefill, saver)
        assert prefill.runner.model.model.runs_native() is (native and prefill.runner.native_unsupported is None)
        target = receiver.reserve(prompt, params, f"r{native}")
        blocks = list(decode.requests[target.request_id].block_table)
        sender.add(prompt, params, target)
        while prefill.has_unfinished():
            for done in sender.step():
                kv[native] = decode.runner.kv_cache[:, :, blocks].clone()
                receiver.commit(done.target.request_id, done.first_token, done.logprobs)
        while decode.has_unfinished():
            got.update((o.request_id, o.token_ids) for o in decode.step())
        assert got[f"r{native}"] == generate_on(prefill, [prompt], params)[0]
    assert kv[True].abs().sum() > 0 and torch.equal(kv[True], kv[False])
    assert got["rTrue"] == got["rFalse"] and "Paris" in decode.tokenizer.decode(got["rTrue"])


def test_lease_expiry_frees_the_reservation(tiny_checkpoints, pool_name) -> None:
    sender, receiver, _, decode = make_pair(str(tiny_checkpoints["llama"]), pool_name, lease_s=5)
    free = decode.block_manager.num_free_blocks
    target = receiver.reserve(prompts_of([50])[0], GREEDY, "late")
    assert decode.block_manager.num_free_blocks == free - len(target.block_ids)
    assert receiver.expire(now=0.0) == []  # not yet
    expired = receiver.expire(now=float("inf"))
    assert [e.request_id for e in expired] == ["late"] and isinstance(expired[0], LeaseEnded)
    assert "late" in str(expired[0])
    assert decode.block_manager.num_free_blocks == free
    with pytest.raises(KVLost, match="late"):
        receiver.commit("late", 1)  # KV that arrives after the lease is refused
    assert decode.block_manager.num_free_blocks == free


def test_abort_mid_transfer_frees_both_sides(tiny_checkpoints, pool_name) -> None:
    sender, receiver, prefill, decode = make_pair(str(tiny_checkpoints["llama"]), pool_name,
                                                  max_num_batched_tokens=16)
    free_p, free_d = prefill.block_manager.num_free_blocks, decode.block_manager.num_free_blocks
    prompt = prompts_of([100])[0]
    sender.add(prompt, GREEDY, receiver.reserve(prompt, GREEDY, "gone"))
    sender.step()  # one 16-token chunk of 100 has moved
    assert prefill.block_manager.num_free_blocks < free_p
    assert sender.abort("gone") and receiver.abort("gone")
    assert prefill.block_manager.num_free_blocks == free_p and decode.block_manager.num_free_blocks == free_d
    assert not prefill.has_unfinished() and not decode.has_unfinished()


def test_reserve_when_full_returns_none(tiny_checkpoints, pool_name) -> None:
    _, receiver, _, decode = make_pair(str(tiny_checkpoints["llama"]), pool_name)
    assert receiver.reserve(prompts_of([8 * 60])[0], GREEDY, "a") is not None  # 60 of 64 blocks
    assert receiver.reserve(prompts_of([8 * 10])[0], GREEDY, "b") is None
    assert decode.block_manager.num_free_blocks == 4


def test_pool_is_in_shared_memory_and_visible_to_a_mapping(tiny_checkpoints, pool_name) -> None:
    handles: list[PoolHandle] = []
    engine = LLMEngine.from_model(str(tiny_checkpoints["llama"]), num_kv_blocks=8,
                                  kv_allocator=shared_pool_allocator(pool_name, handles))
    assert pool_path(pool_name).stat().st_size == engine.runner.kv_cache.numel() * 4
    view = attach_pool(handles[0])
    view[1, 0, 3, 2] = 7.0
    assert float(engine.runner.kv_cache[1, 0, 3, 2].max()) == 7.0


def test_missing_pool_names_it() -> None:
    with pytest.raises(ValueError, match="nope"):
        attach_pool(PoolHandle("nope", (1,), "float32"))


def test_a_sender_stops_writing_at_the_lease_end_before_the_receiver_frees(tiny_checkpoints, pool_name) -> None:
    sender, receiver, prefill, decode = make_pair(str(tiny_checkpoints["llama"]), pool_name, lease_s=5,
                                                  max_num_batched_tokens=16)
    free_p, free_d = prefill.block_manager.num_free_blocks, decode.block_manager.num_free_blocks
    prompt = prompts_of([100])[0]
    target = receiver.reserve(prompt, GREEDY, "slow")
    sender.add(prompt, GREEDY, target)
    sender.step()  # one chunk written
    assert sender.expire(now=target.deadline - 1) == []
    expired = sender.expire(now=target.deadline)  # the lease is over: stop before the next step
    assert [e.request_id for e in expired] == ["slow"] and isinstance(expired[0], LeaseEnded)
    assert prefill.block_manager.num_free_blocks == free_p and not prefill.has_unfinished()
    # the decode side keeps the blocks for a grace period past the deadline, then frees them
    assert receiver.expire(now=time.monotonic() + 5 + receiver.grace_s / 2) == []
    assert [e.request_id for e in receiver.expire(now=time.monotonic() + 5 + receiver.grace_s + 1)] == ["slow"]
    assert decode.block_manager.num_free_blocks == free_d


def kv_bytes_per_token(engine: LLMEngine) -> int:
    layers, _, _, _, heads, dim = engine.runner.kv_cache.shape
    return layers * 2 * heads * dim * engine.runner.kv_cache.element_size()


def send_and_decode(sender: KVSender, receiver: KVReceiver, prompt, target) -> dict[str, list[int]]:
    """Prefill the prompt into its reservation, commit it, and decode everything on the decode side."""
    sender.add(prompt, GREEDY, target)
    while sender.engine.has_unfinished():
        for done in sender.step():
            receiver.commit(done.target.request_id, done.first_token, done.logprobs)
    outputs = {}
    while receiver.engine.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in receiver.engine.step())
    return outputs


@pytest.mark.parametrize("forgets", [None, "prefill", "decode"])
def test_the_next_turn_sends_only_what_the_decode_cache_lacks(tiny_checkpoints, pool_name, forgets) -> None:
    """Turn 2 resends turn 1's prompt and answer. The decode replica shares the blocks it holds of them
    (its block size 8, the prefill side's 16); the prefill side computes past what its own cache holds and
    sends what the decode side lacks: the rows it computed, and the rows its cache gave it (from its cache,
    in the step of its first chunk). The answer equals one engine's with the cache off. forgets: that
    side's cache is emptied between the turns."""
    model = str(tiny_checkpoints["llama"])
    sender, receiver, prefill, decode = make_pair(model, pool_name, max_num_batched_tokens=32)
    first = prompts_of([45], seed=5)[0]
    [answer] = run_disaggregated(sender, receiver, [first], GREEDY)
    second = first + answer + prompts_of([11], seed=6)[0]  # 80 tokens
    if forgets is not None:
        (prefill if forgets == "prefill" else decode).block_manager.reset_prefix_cache()
    sent = sender.saver.bytes_sent
    target = receiver.reserve(second, GREEDY, "turn2")
    # decode holds prompt + answer but the last answer token's KV (never computed): 68 of them, 8 blocks of 8
    held = 0 if forgets == "decode" else 64
    assert target.num_cached_tokens == held and target.block_ids[:5] == tuple(decode.requests["turn2"].block_table[:5])
    outputs = send_and_decode(sender, receiver, second, target)
    want = LLM(model, num_kv_blocks=64, enable_prefix_caching=False).generate([second], GREEDY)[0].token_ids
    assert outputs["turn2"] == want
    assert sender.saver.bytes_sent - sent == (len(second) - held) * kv_bytes_per_token(prefill)
    # the prefill side took what it had: its turn-1 prompt, two blocks of 16
    assert prefill.scheduler.prefix_cache_hits == (0 if forgets == "prefill" else 32)
    assert not receiver.reservations and decode.block_manager.num_free_blocks == 64
    assert prefill.block_manager.num_free_blocks == 64


def test_a_lease_holds_its_cached_blocks_while_others_evict_the_cache(tiny_checkpoints, pool_name) -> None:
    """Between the reservation and the KV's landing, other requests need every free block of the decode
    side: the cached blocks the lease shares are not among them, and the answer is still exact."""
    model = str(tiny_checkpoints["llama"])
    sender, receiver, prefill, decode = make_pair(model, pool_name)
    first = prompts_of([45], seed=5)[0]
    [answer] = run_disaggregated(sender, receiver, [first], GREEDY)
    second = first + answer + prompts_of([11], seed=6)[0]
    target = receiver.reserve(second, GREEDY, "turn2")
    assert target.num_cached_tokens == 64
    shared = decode.requests["turn2"].block_table[:8]
    # 54 blocks are free: these take all of them, turn 1's cached blocks too
    others = generate_on(decode, prompts_of([60] * 3, seed=7), SamplingParams(temperature=0, max_tokens=84,
                                                                              ignore_eos=True))
    assert len(others) == 3 and all(decode.block_manager.ref_counts[b] == 1 for b in shared)
    outputs = send_and_decode(sender, receiver, second, target)
    want = LLM(model, num_kv_blocks=64, enable_prefix_caching=False).generate([second], GREEDY)[0].token_ids
    assert outputs["turn2"] == want and decode.block_manager.num_free_blocks == 64


def test_a_short_uncached_tail_is_prefilled_on_the_decode_side(tiny_checkpoints, pool_name) -> None:
    model = str(tiny_checkpoints["llama"])
    sender, receiver, prefill, decode = make_pair(model, pool_name)
    first = prompts_of([45], seed=5)[0]
    [answer] = run_disaggregated(sender, receiver, [first], GREEDY)
    second = first + answer + [7, 8, 9]
    target = receiver.reserve(second, GREEDY, "turn2", local_below=32)  # 5 tokens past the cached 64
    assert target.local and not target.block_ids and not receiver.reservations
    outputs = {}
    while decode.has_unfinished():
        outputs.update((o.request_id, (o.token_ids, o.num_cached_tokens)) for o in decode.step())
    want = LLM(model, num_kv_blocks=64, enable_prefix_caching=False).generate([second], GREEDY)[0].token_ids
    assert outputs["turn2"] == (want, 64)
    # a prompt the decode side has not seen is reserved whatever local_below, when it is long enough
    assert not receiver.reserve(prompts_of([40], seed=9)[0], GREEDY, "new", local_below=32).local
    receiver.abort("new")
    assert decode.block_manager.num_free_blocks == 64


def test_each_rank_of_a_decode_replica_gets_its_own_handle() -> None:
    from kv_transfer.metadata import PoolHandle
    from kv_transfer.shm import rank_pool_handles

    cpu = rank_pool_handles("d0", PoolHandle("d0", (2, 2, 4, 8, 4, 16), "float32"), 4, 2)
    assert [(h.name, h.kv_heads, h.cuda_ipc) for h in cpu] == [("d0", (0, 2), None), ("d0.r1", (2, 4), None)]
    # on CUDA each rank's slice is its own device memory: the handle each rank made (opaque here)
    first = PoolHandle("d0", (2, 2, 4, 8, 4, 16), "float32", cuda_ipc=("rank0",))
    cuda = rank_pool_handles("d0", first, 4, 2, [("rank0",), ("rank1",)])
    assert [(h.name, h.kv_heads, h.cuda_ipc) for h in cuda] == [("d0", (0, 2), ("rank0",)),
                                                                 ("d0.r1", (2, 4), ("rank1",))]
    with pytest.raises(ValueError, match="'d0' is on CUDA at TP 2: it needs each rank's IPC handle, got 1"):
        rank_pool_handles("d0", first, 4, 2, [("rank0",)])


def test_prompts_landed_in_every_block_each_needing_one_more_still_finish(tiny_checkpoints, pool_name) -> None:
    """4 decode blocks of 8; two 16-token prompts prefilled elsewhere fill them exactly, so each one's next
    token needs a fifth block and nothing runs that could free one (the replica used to step nothing,
    forever): the newer gives its KV up and is recomputed on the decode side after the older is done."""
    sender, receiver, prefill, decode = make_pair(str(tiny_checkpoints["llama"]), pool_name, decode_blocks=4)
    prompts = prompts_of([16, 16], seed=3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        sender.add(prompt, params, receiver.reserve(prompt, params, f"r{i}"))
    while prefill.has_unfinished():
        for done in sender.step():
            receiver.commit(done.target.request_id, done.first_token, done.logprobs)
    assert decode.block_manager.num_free_blocks == 0
    outputs = {}
    for _ in range(50):
        outputs.update((o.request_id, o.token_ids) for o in decode.step())
    assert [outputs.get(f"r{i}") for i in range(2)] == generate_on(prefill, prompts, params)
    assert decode.scheduler.num_preemptions == 1 and decode.block_manager.num_free_blocks == 4


def test_a_prompt_for_a_pool_not_attached_is_refused_and_the_engine_goes_on(tiny_checkpoints, pool_name) -> None:
    """A reservation made on a decode replica just before this prefill replica dropped it: the prompt is
    refused (KVLost, which the router retries elsewhere) rather than queued to fail the engine's next step
    and with it every prompt there."""
    import dataclasses

    sender, receiver, prefill, _ = make_pair(str(tiny_checkpoints["llama"]), pool_name)
    prompt = prompts_of([20])[0]
    gone = dataclasses.replace(receiver.reserve(prompt, GREEDY, "r0"), pool="a-pool-dropped-here")
    with pytest.raises(KVLost, match="'a-pool-dropped-here' is not attached"):
        sender.add(prompt, GREEDY, gone)
    receiver.abort("r0")
    assert run_disaggregated(sender, receiver, [prompt], GREEDY) == generate_on(prefill, [prompt], GREEDY)


def test_save_from_cache_writes_what_the_layer_by_layer_path_writes() -> None:
    # random steps of prompts bound for two decode pools (block sizes 8 and 16), some with a decode-side cached
    # prefix, some with what this side's prefix cache gave it sent from its cache, some not sent anywhere, into
    # whole pools and into pools whose heads two decode ranks split: both paths write the same
    from engine.kv_connector import StepLayout
    from replica.contract import Reservation

    rng = random.Random(5)
    layers, heads, dim, local_bs, shapes = 3, 4, 8, 4, {"a": 8, "b": 16}
    sent = from_cache = 0
    for trial in range(40):
        local = torch.randn(layers, 2, 64, local_bs, heads, dim)
        ranges = [(0, 2), (2, 4)] if trial % 2 else [None]  # the decode ranks' heads (None: one rank, all)
        savers = []
        for _ in range(2):
            saver = ShmKVSaver(heads=(0, heads))  # a prefill replica at TP 1 holds every head
            saver.pools = {name: [(torch.zeros(layers, 2, 32, bs, heads // len(ranges), dim), r) for r in ranges]
                           for name, bs in shapes.items()}
            saver.bind_local(local)
            savers.append(saver)
        seqs, sizes, free_local = [], [], rng.sample(range(64), 64)
        for i in range(rng.randint(1, 4)):
            prompt = rng.randint(2, 40)
            s = Sequence([1] * prompt, SamplingParams(max_tokens=1), seed=0, request_id=str(i))
            s.block_table = [free_local.pop() for _ in range(-(-prompt // local_bs))]
            s.num_computed_tokens = rng.randint(0, prompt - 1)  # this side's prefix cache, or earlier chunks
            if rng.random() < 0.8:
                pool = rng.choice("ab")
                bs = shapes[pool]
                s.kv_target = Reservation(pool, str(i), tuple(rng.sample(range(32), -(-prompt // bs))),
                                          num_cached_tokens=rng.choice([0, bs * (prompt > bs)]))
            seqs.append(s)
            sizes.append(rng.randint(1, prompt - s.num_computed_tokens))
        qsl = [0]
        for n in sizes:
            qsl.append(qsl[-1] + n)
        slots = torch.tensor([s.block_table[p // local_bs] * local_bs + p % local_bs for s, n in zip(seqs, sizes)
                              for p in range(s.num_computed_tokens, s.num_computed_tokens + n)])
        for saver in savers:
            for s in seqs:
                s.kv_sent = 0  # as if each saver were the first to plan the step
            saver.begin_step(StepLayout(seqs, sizes, qsl))
        for layer in range(layers):  # the layer-by-layer path: the step's rows, as the model hands them over
            k, v = (local[layer, kv].view(-1, heads, dim).index_select(0, slots) for kv in (0, 1))
            savers[0].save_kv_layer(layer, k, v)
        savers[1].save_from_cache(slots)
        for name in shapes:
            for (one, _), (other, _) in zip(savers[0].pools[name], savers[1].pools[name]):
                assert torch.equal(one, other), (trial, name)
        assert savers[0].bytes_sent == savers[1].bytes_sent
        sent += savers[0].bytes_sent > 0
        from_cache += any(s.kv_target and s.num_computed_tokens > s.kv_target.num_cached_tokens for s in seqs)
    assert sent > 20 and from_cache > 10  # the trials really sent, from the step and from this side's cache
