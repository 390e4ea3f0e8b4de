"""How fast each KV backend moves a prompt's KV on this machine, as the connectors move it during a
prefill: layer by layer into reserved blocks of a decode pool. Used by `pdserve profile` (the
planner's simulator charges the part of a transfer the layer-by-layer push cannot hide) and by
benchmarks.kv_transfer (beside the machine's memcpy).

    ipc         ShmKVSaver into a pool in /dev/shm (index_copy into reserved slots), one process (on CUDA:
                a pool another process made, opened through its IPC handle: tests/gpu/bench.py)
    collective  CollectiveKVSaver -> CollectiveKVReceiver over gloo on loopback, two processes (on CUDA:
                NCCL, a GPU each)"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.distributed import tcp_store
from engine.kv_connector import KVSaver, StepLayout
from kv_transfer.metadata import PoolHandle
from replica.contract import Reservation

REPS = 5
BLOCK = 16  # tokens a block of the pools made here


def layout(num_tokens: int, target: Reservation) -> StepLayout:
    """One prefill step of the first num_tokens tokens of a sequence, sending to target (a fresh
    sequence each call: a saver advances what it has sent of one)."""
    class _Seq:  # what a saver reads of a sequence
        kv_target, num_computed_tokens, request_id, kv_sent, block_table = target, 0, target.request_id, 0, []
    return StepLayout([_Seq()], [num_tokens], [0, num_tokens])


def random_kv(shape: tuple[int, ...], num_tokens: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of a pool of `shape` [layers, 2, blocks, block, heads, dim]: K and V of num_tokens tokens."""
    layers, _, _, _, heads, dim = shape
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(num_tokens, heads, dim, generator=gen).to(device),
             torch.randn(num_tokens, heads, dim, generator=gen).to(device)) for _ in range(layers)]


def send_all(saver: KVSaver, step: StepLayout, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    saver.begin_step(step)
    for layer, (k, v) in enumerate(kv):
        saver.save_kv_layer(layer, k, v)
    saver.end_step()


def _no_cache(shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The sender's own cache, which a saver reads for blocks its prefix cache gave (none here): one block."""
    return torch.zeros(shape[:2] + (1,) + shape[3:], device=device)


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds fn takes (on CUDA, until the work it queued is done)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def ipc_seconds(shape: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]], num_tokens: int,
                pool: torch.Tensor | None = None) -> float:
    """Best of REPS: the KV into reserved blocks of a /dev/shm pool (`pool`, attached, or one made here)."""
    from kv_transfer.shm import ShmKVSaver, attach_pool, shared_pool_allocator, unlink_pool

    name = f"measure-{uuid.uuid4().hex[:8]}"
    try:
        if pool is None:
            handles: list[PoolHandle] = []
            shared_pool_allocator(name, handles)(shape, torch.float32, torch.device("cpu")).zero_()
            pool = attach_pool(handles[0])
        saver = ShmKVSaver({name: pool})
        saver.bind_local(_no_cache(shape, pool.device))
        target = Reservation(name, "r", tuple(range(-(-num_tokens // shape[3]))), 1)
        send_all(saver, layout(num_tokens, target), kv)  # first touch outside the timing
        return min(timed(lambda: send_all(saver, layout(num_tokens, target), kv), pool.device) for _ in range(REPS))
    finally:
        unlink_pool(name)


def _collective_receiver(port: int, shape: tuple[int, ...], num_tokens: int, ready: mp.Queue, out: mp.Queue,
                         device: str = "cpu") -> None:
    from kv_transfer.collective import CollectiveKVReceiver, Wire

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(Wire.for_device(device).backend, store=tcp_store("127.0.0.1", port, False, 2), rank=1,
                            world_size=2)
    thread = CollectiveKVReceiver(torch.zeros(shape, device=device))
    thread.add_group("prefill")  # the default group: this process and the sender
    ready.put(True)
    times = []
    for tid in range(1, REPS + 2):
        thread.wait_for_request(tid, num_tokens, timeout=120)
        times.append(time.perf_counter())
    out.put(times)
    dist.barrier()
    thread.stop()  # on NCCL: aborts the group, whose next receive is always pending
    for receiving in list(thread.threads.values()):  # on gloo: ends when the sender's teardown closes the pair
        receiving.join(timeout=30)
    with contextlib.suppress(Exception):  # an aborted NCCL group may refuse the teardown too
        dist.destroy_process_group()


def collective_seconds(shape: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]], num_tokens: int,
                       devices: tuple[str, str] = ("cpu", "cpu")) -> float:
    """Best of REPS: the KV to a receiver in a process of its own, until it landed: over gloo on loopback
    between CPU pools, over NCCL between two GPUs (devices: the sender's and the receiver's; kv on the first)."""
    from kv_transfer.collective import CollectiveKVSaver, Wire

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = tcp_store("127.0.0.1", 0, True, 2)  # a port of the OS's choosing
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_collective_receiver, args=(store.port, shape, num_tokens, ready, out, devices[1]),
                        daemon=True)
    child.start()
    if devices[0].startswith("cuda"):
        torch.cuda.set_device(devices[0])
    dist.init_process_group(Wire.for_device(devices[0]).backend, store=store, rank=0, world_size=2)
    try:
        ready.get(timeout=120)
        saver = CollectiveKVSaver(shape[4])
        saver.bind_local(_no_cache(shape, devices[0]))
        saver.attach(PoolHandle("d", tuple(shape), "float32", kv_rank=1))
        blocks = tuple(range(shape[2]))
        starts = []
        for tid in range(1, REPS + 2):
            starts.append(time.perf_counter())
            send_all(saver, layout(num_tokens, Reservation("d", f"r{tid}", blocks, tid)), kv)
        ends = out.get(timeout=300)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        child.join(30)
    # perf_counter is CLOCK_MONOTONIC: comparable across processes on one machine
    return min(e - s for s, e in zip(starts[1:], ends[1:]))


def bandwidth(layers: int, kv_heads: int, head_dim: int, num_tokens: int = 512) -> dict[str, float]:
    """GB/s each backend moved a num_tokens prompt's fp32 KV at, for a model of these dimensions."""
    shape = (layers, 2, -(-num_tokens // BLOCK), BLOCK, kv_heads, head_dim)
    kv = random_kv(shape, num_tokens)
    num_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
    return {"ipc": num_bytes / ipc_seconds(shape, kv, num_tokens) / 1e9,
            "collective": num_bytes / collective_seconds(shape, kv, num_tokens) / 1e9}
