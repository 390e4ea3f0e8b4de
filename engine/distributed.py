"""The tensor-parallel group of one replica and the collectives the layers own.

A replica is `world_size` ranks that run every step in lockstep. Rank 0 schedules and samples;
it sends each step's plan to the others (`broadcast_object`). Inside the model the only
traffic is what the tensor-parallel cut needs: two all-reduces per dense block (after the
row-parallel o_proj and down_proj), one for the vocab-parallel embedding, one all-gather for
the logits, and for expert parallelism an all-to-all out to the experts and one back.

The same code runs over gloo on CPU and NCCL on CUDA. One group per process: the default
torch.distributed group."""
from __future__ import annotations

import datetime
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class CollectiveCounter:
    """Calls, bytes and seconds per collective on this rank (on in tests and the benchmark; off,
    the layers pay one attribute check). Seconds include waiting for the slowest rank."""
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    @contextmanager
    def record(self, op: str, t: torch.Tensor):
        start = time.perf_counter()
        yield
        self.seconds[op] += time.perf_counter() - start
        self.calls[op] += 1
        self.bytes[op] += t.numel() * t.element_size()

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()


class TPGroup:
    """One rank's view of its replica's group. world_size 1: every collective is the identity."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.counter: CollectiveCounter | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world_size > 1:
            with self._count("all_reduce", x):
                dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x (all of one shape) along `dim`."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        with self._count("all_gather", x):
            dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts[:j]), +send_counts[j]) of x go to rank j; rank j's rows for us come back
        in rank order."""
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        with self._count("all_to_all", x):
            dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
        return out

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """Each rank's per-destination counts in, the per-source counts it will receive out."""
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts)
        return recv

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's obj, on every rank (the step plan)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _count(self, op: str, x: torch.Tensor):
        return self.counter.record(op, x) if self.counter is not None else nullcontext()


_group = TPGroup()


def get_tp_group() -> TPGroup:
    return _group


def set_tp_group(group: TPGroup) -> None:
    global _group
    _group = group


def init_tp_group(rank: int, world_size: int, init_method: str, device: str = "cpu",
                  timeout_s: float = 30.0) -> TPGroup:
    """Join the replica's group (blocks until every rank has joined) and make it this process's."""
    if world_size > 1:
        host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
        bind_gloo_to(host)
        store = tcp_store(host, int(port), rank == 0, world_size, timeout_s)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store,
                                rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    group = TPGroup(rank, world_size)
    set_tp_group(group)
    return group


def tcp_store(host: str, port: int, is_master: bool, world_size: int | None = None,
              timeout_s: float = 300.0) -> dist.TCPStore:
    """A rendezvous store at host:port (port 0 on the master: a free one). The master listens on
    `host` only: torch's own TCPStore server binds every interface, so it is handed a socket bound
    here (on one machine everything stays on 127.0.0.1)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if not is_master:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    sock.listen()
    port = sock.getsockname()[1]
    return dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False, timeout=timeout,
                         master_listen_fd=sock.detach())  # the store owns the socket from here


def bind_gloo_to(host: str) -> None:
    """Gloo groups of this process listen on the loopback interface when their rendezvous is on
    loopback (gloo would otherwise pick the routable interface)."""
    if host.startswith("127.") or host in ("localhost", "::1"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TPGroup())


def kv_head_range(num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int]:
    """The KV heads a rank holds: an equal slice when the ranks divide the heads, else one head
    shared (replicated) by world_size / num_kv_heads consecutive ranks."""
    if world_size <= num_kv_heads:
        per = num_kv_heads // world_size
        return rank * per, (rank + 1) * per
    head = rank // (world_size // num_kv_heads)
    return head, head + 1


def valid_tp_degrees(num_heads: int, num_kv_heads: int, intermediate_size: int, limit: int = 64) -> list[int]:
    """Degrees that split the query heads and the MLP evenly, and split or replicate the KV heads evenly."""
    return [n for n in range(1, min(num_heads, limit) + 1)
            if num_heads % n == 0 and intermediate_size % n == 0
            and (num_kv_heads % n == 0 or n % num_kv_heads == 0)]
