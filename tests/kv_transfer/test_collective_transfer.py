"""The collective backend across two processes (gloo on loopback): a prefill rank streams each
layer's K/V to a decode rank, whose continuation equals one engine doing both."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time

import pytest
import torch.distributed as dist

from engine import LLMEngine, SamplingParams
from engine.distributed import tcp_store
from kv_transfer import KVReceiver, KVSender
from kv_transfer.collective import CollectiveKVReceiver, CollectiveKVSaver
from kv_transfer.metadata import PoolHandle
from replica.contract import KVLost
from tests.kv_transfer.test_shm_transfer import generate_on, prompts_of

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback only


def _prefill_rank(model: str, port: int, jobs: mp.Queue, results: mp.Queue, budget: int, device: str) -> None:
    import torch

    from kv_transfer.collective import Wire

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    store = tcp_store("127.0.0.1", port, False, 2)
    dist.init_process_group(Wire.for_device(device).backend, store=store, rank=0, world_size=2)
    engine = LLMEngine.from_model(model, num_kv_blocks=64, max_num_batched_tokens=budget, device=device)
    saver = CollectiveKVSaver(engine.config.model_config.num_key_value_heads)
    saver.attach(PoolHandle(**jobs.get()))
    sender = KVSender(engine, saver)
    while (job := jobs.get()) is not None:
        for prompt, params, target in job:
            sender.add(prompt, params, target)
        while engine.has_unfinished():
            results.put(sender.step())
    dist.destroy_process_group()


def start_pair(model: str, device: str = "cpu", decode_device: str | None = None):
    """(decode engine, receiver, receiver thread, jobs, results, child process): the decode engine in
    this process (on decode_device, by default `device`), a prefill engine sending to it from a child on
    `device`; their wire is the one the devices take (kv_transfer.collective.Wire: gloo on CPU, NCCL on GPUs)."""
    import torch

    from kv_transfer.collective import Wire

    decode_device = decode_device or device
    ctx = mp.get_context("spawn")
    # the store binds a port of the OS's choosing here, so no other process can take it first
    store = tcp_store("127.0.0.1", 0, True, 2)
    jobs, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_prefill_rank, args=(model, store.port, jobs, results, 16, device), daemon=True)
    child.start()
    if decode_device.startswith("cuda"):
        torch.cuda.set_device(decode_device)
    dist.init_process_group(Wire.for_device(decode_device).backend, store=store, rank=1, world_size=2)
    decode = LLMEngine.from_model(model, num_kv_blocks=64, block_size=8, device=decode_device)
    thread = CollectiveKVReceiver(decode.runner.kv_cache)
    thread.add_group("prefill")  # the default group: this process and the child
    receiver = KVReceiver(decode, "d0", landing=thread, commit_timeout_s=20)
    kv = decode.runner.kv_cache
    jobs.put(dict(name="d0", shape=tuple(kv.shape), dtype="float32", kv_rank=1))
    return decode, receiver, thread, jobs, results, child


def stop_pair(pair) -> None:
    _, _, thread, jobs, _, child = pair
    if child.is_alive():
        jobs.put(None)
        child.join(30)
    thread.stop()  # on NCCL: aborts the group, whose next receive is always pending
    with contextlib.suppress(Exception):  # an aborted NCCL group may refuse the teardown too
        dist.destroy_process_group()


@pytest.fixture
def pair(tiny_checkpoints):
    pair = start_pair(str(tiny_checkpoints["llama"]))
    yield pair
    stop_pair(pair)


def check_transfer_equals_one_engine(pair) -> None:
    decode, receiver, thread, jobs, results, _ = pair
    prompts = prompts_of([1, 9, 40, 77])
    free = decode.block_manager.num_free_blocks
    want = generate_on(decode, prompts, GREEDY)
    targets = [receiver.reserve(p, GREEDY, f"r{i}") for i, p in enumerate(prompts)]
    jobs.put([(p, GREEDY, t) for p, t in zip(prompts, targets)])
    committed = 0
    while committed < len(prompts):
        for done in results.get(timeout=60):
            receiver.commit(done.target.request_id, done.first_token, done.logprobs)
            committed += 1
    outputs = {}
    while decode.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in decode.step())
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == want
    assert thread.bytes_received > 0 and thread.num_errors == 0
    assert decode.block_manager.num_free_blocks == free


def test_collective_transfer_equals_one_engine(pair) -> None:
    check_transfer_equals_one_engine(pair)


def test_sender_killed_mid_transfer_frees_the_reservation(pair) -> None:
    decode, receiver, thread, jobs, results, child = pair
    free = decode.block_manager.num_free_blocks
    prompt = prompts_of([120])[0]
    target = receiver.reserve(prompt, GREEDY, "doomed")
    jobs.put([(prompt, GREEDY, target)])
    results.get(timeout=60)  # the first 16-token chunk has been sent
    child.kill()
    child.join(10)
    layers = decode.runner.kv_cache.shape[0]
    # per layer: the first chunk is in every layer; layers land in order; the prompt never completes
    assert all(thread.wait_for_layer(target.transfer_id, layer, 16, timeout=10) for layer in range(layers))
    landed = thread.landed(target.transfer_id)
    assert landed == sorted(landed, reverse=True) and all(n % 16 == 0 for n in landed)
    assert not thread.wait_for_layer(target.transfer_id, layers - 1, len(prompt), timeout=0.2)
    with pytest.raises(KVLost, match="doomed"):
        receiver.commit("doomed", 1)  # the sender claims done, but the KV never landed
    assert decode.block_manager.num_free_blocks == free
    assert not decode.has_unfinished()


def test_rows_of_an_aborted_transfer_never_land(pair) -> None:
    """Abort on the decode side first, then the sender (which has not heard) sends the whole prompt:
    its rows arrive and are dropped, so blocks freed by the abort are never written."""
    decode, receiver, thread, jobs, results, _ = pair
    prompt = prompts_of([40])[0]
    target = receiver.reserve(prompt, GREEDY, "gone")
    assert receiver.abort("gone")
    jobs.put([(prompt, GREEDY, target)])
    assert [len(results.get(timeout=60)) for _ in range(3)] == [0, 0, 1]  # chunks of 16, 16, 8
    layers, _, _, _, heads, dim = decode.runner.kv_cache.shape
    every_row = len(prompt) * layers * 2 * heads * dim * 4
    deadline = time.monotonic() + 30
    while thread.bytes_received < every_row and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread.bytes_received == every_row and thread.num_errors == 0
    assert thread.landed(target.transfer_id) == [0] * layers
    assert decode.runner.kv_cache[:, :, list(target.block_ids)].abs().sum() == 0


def test_only_rows_past_the_decode_cache_are_sent(pair) -> None:
    """The decode engine ran turn 1 itself; turn 2's reservation shares those blocks and its transfer
    starts past them: it lands (counted from there), and decodes as one engine with the cache off does."""
    decode, receiver, thread, jobs, results, _ = pair
    first = prompts_of([45], seed=5)[0]
    [answer] = generate_on(decode, [first], GREEDY)
    second = first + answer + prompts_of([11], seed=6)[0]
    target = receiver.reserve(second, GREEDY, "turn2")
    assert target.num_cached_tokens == 56  # 60 tokens' KV computed: 7 blocks of 8
    jobs.put([(second, GREEDY, target)])
    done = []
    while not done:
        done = results.get(timeout=60)
    receiver.commit("turn2", done[0].first_token, done[0].logprobs)
    outputs = {}
    while decode.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in decode.step())
    decode.block_manager.reset_prefix_cache()
    assert outputs["turn2"] == generate_on(decode, [second], GREEDY)[0]
    layers, _, _, _, heads, dim = decode.runner.kv_cache.shape
    assert thread.bytes_received == (len(second) - 56) * layers * 2 * heads * dim * 4


def test_rows_from_the_senders_cache_land_as_computed_ones_do(pair) -> None:
    """The prefill side holds a prompt's first blocks, the decode side nothing: those rows are sent from the
    prefill side's cache in the step of its first chunk, and the transfer lands whole."""
    decode, receiver, thread, jobs, results, _ = pair

    def transfer(prompt, rid):
        target = receiver.reserve(prompt, GREEDY, rid)
        jobs.put([(prompt, GREEDY, target)])
        done = []
        while not done:
            done = results.get(timeout=60)
        receiver.commit(rid, done[0].first_token, done[0].logprobs)
        outputs = {}
        while decode.has_unfinished():
            outputs.update((o.request_id, o.token_ids) for o in decode.step())
        return target, outputs[rid]

    first = prompts_of([45], seed=5)[0]
    transfer(first, "one")
    decode.block_manager.reset_prefix_cache()
    received = thread.bytes_received
    second = first + prompts_of([20], seed=6)[0]
    target, got = transfer(second, "two")
    assert target.num_cached_tokens == 0
    decode.block_manager.reset_prefix_cache()
    assert got == generate_on(decode, [second], GREEDY)[0]
    layers, _, _, _, heads, dim = decode.runner.kv_cache.shape
    assert thread.bytes_received - received == len(second) * layers * 2 * heads * dim * 4


def test_default_model_over_the_collective() -> None:
    """SmolLM2 at TP 1 on both sides, chunked prefill (16-token chunks) on the sending side."""
    pair = start_pair("default")
    try:
        check_transfer_equals_one_engine(pair)
    finally:
        stop_pair(pair)
