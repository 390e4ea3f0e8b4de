"""The KV side of a replica's ranks, for both roles. Every rank of a prefill replica sends its
own KV heads; every rank of a decode replica holds (and, on the collective backend, receives)
its own slice of them. A role says what each rank needs when it is built (a KV allocator, a
saver); a RankKV is one rank's endpoint afterwards; PrefillKV and DecodeKV are rank 0's view of
the whole replica, which its worker calls. The follower ranks (replica/ranks.py) know only the
role and the endpoint's operations, by name."""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.distributed import kv_head_range
from engine.kv_connector import KVSaver
from engine.model_runner import KVAllocator, ModelRunner
from kv_transfer import BACKENDS
from kv_transfer.collective import CollectiveKVReceiver, CollectiveKVSaver, Wire, kv_group, senders_to
from kv_transfer.metadata import PoolHandle
from kv_transfer.receiver import KVLanding, KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.shm import (
    ShmKVSaver,
    cuda_ipc_handle,
    rank_pool_handles,
    rank_pool_name,
    shared_pool_allocator,
    unlink_pool,
)


class RankKV:
    """One rank's KV endpoint (rank 0's or a follower's). Its operations are what a follower
    runs when rank 0 asks: `attach`, `detach`, `join_pair`, `drop_pair`, `cuda_ipc`, `wait`, `forget`."""

    def __init__(self, runner: ModelRunner, receiver: CollectiveKVReceiver | None = None) -> None:
        self.runner = runner
        self.receiver = receiver  # a decode rank on the collective backend

    def attach(self, handles: list[dict[str, Any]]) -> None:
        """Prefill rank: reach decode pools (PoolHandle fields) with this rank's saver. Called
        before any step that sends to them, so a step never sees the saver's pools change."""
        for h in handles:
            self.runner.kv_saver.attach(PoolHandle(**h))

    def detach(self, pool_name: str) -> None:
        """Prefill rank: forget a decode pool whose replica was replaced (no prompt is bound there)."""
        self.runner.kv_saver.detach(pool_name)

    def join_pair(self, host: str, port: int, rank: int, world_size: int, prefix: str, key: str, uid: int) -> None:
        """Join a pair group (collective backend) as `rank` (blocks until every member has): a prefill
        rank sends there to decode pool `key` once its ranks are attached (uid: the sending replica's
        id); a decode rank receives there from prefill replica `key` on a thread of its own."""
        group = kv_group(host, port, rank, world_size, prefix, Wire.for_device(self.runner.device))
        if self.receiver is not None:  # the prefill ranks that owe this rank heads, after the decode ranks
            tp, num_kv_heads = self.runner.tp, self.runner.config.model_config.num_key_value_heads
            heads = kv_head_range(num_kv_heads, tp.rank, tp.world_size)
            sources = [tp.world_size + r for r in senders_to(num_kv_heads, heads, world_size - tp.world_size)]
            self.receiver.add_group(key, group, sources)
        else:
            self.runner.kv_saver.join_pair(key, group, uid)

    def drop_pair(self, key: str, why: str) -> None:
        """Decode rank: stop receiving from prefill replica `key` (it is gone; kv_transfer.collective's
        watchdog)."""
        if self.receiver is not None:
            self.receiver.drop_pair(key, why)

    def cuda_ipc(self) -> tuple:
        """Decode rank on CUDA (ipc backend): the IPC handle of this rank's slice of the pool."""
        return cuda_ipc_handle(self.runner.kv_cache)

    def wait(self, transfer_id: int, num_tokens: int, timeout: float) -> bool:
        """Decode rank: True once positions [0, num_tokens) of the transfer are in every layer."""
        return self.receiver.wait_for_request(transfer_id, num_tokens, timeout)

    def forget(self, transfer_id: int) -> None:
        """Decode rank: the transfer is committed or aborted; once this returns nothing more of it lands."""
        self.receiver.forget(transfer_id)


@dataclass(frozen=True)
class RankRole:
    """What each rank of a replica needs for KV over `backend`, as it is built (kv_allocator,
    kv_saver: None for the engine's own) and after (endpoint). The roles below override the defaults."""
    backend: str  # "ipc" or "collective"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"kv_backend={self.backend!r}; available: {BACKENDS}")

    def kv_allocator(self, rank: int) -> KVAllocator | None:
        return None

    def kv_saver(self, num_kv_heads: int, rank: int, world_size: int) -> KVSaver | None:
        return None

    def endpoint(self, runner: ModelRunner) -> RankKV:
        return RankKV(runner)


@dataclass(frozen=True)
class PrefillRole(RankRole):
    """Each rank of a prefill replica sends its KV heads."""

    def kv_saver(self, num_kv_heads: int, rank: int, world_size: int) -> KVSaver:
        if self.backend == "ipc":
            return ShmKVSaver.for_rank(num_kv_heads, rank, world_size)
        return CollectiveKVSaver(num_kv_heads, rank, world_size)


@dataclass(frozen=True)
class DecodeRole(RankRole):
    """Each rank of a decode replica holds its slice of the KV pool: on `ipc` where the prefill
    ranks can map it (shared memory, or CUDA IPC); on `collective` the engine's own pool, which the
    rank's receiver writes into."""
    pool: str = ""  # the replica's pool name

    def kv_allocator(self, rank: int) -> KVAllocator | None:
        return shared_pool_allocator(rank_pool_name(self.pool, rank)) if self.backend == "ipc" else None

    def endpoint(self, runner: ModelRunner) -> RankKV:
        return RankKV(runner, CollectiveKVReceiver(runner.kv_cache) if self.backend == "collective" else None)


async def join_pair(local: RankKV, followers: list[Any], host: str, port: int, rank: int, world_size: int,
                    prefix: str, key: str, uid: int = 0) -> None:
    """Rank 0 and its followers (Ray actors) join a pair group as ranks rank.. rank+TP-1; returns
    once every member has (the group forms only when all have joined)."""
    args = (world_size, prefix, key, uid)
    joins = [a.kv.remote("join_pair", host, port, rank + i, *args) for i, a in enumerate(followers, 1)]
    await asyncio.get_running_loop().run_in_executor(None, local.join_pair, host, port, rank, *args)
    await asyncio.gather(*joins)


class RanksLanding:
    """KVLanding of a tensor-parallel decode replica on the collective backend: every rank receives
    its own heads, so a transfer has landed when it has on each of them (rank 0's receiver thread
    here, the followers' over Ray)."""

    def __init__(self, local: CollectiveKVReceiver, followers: list[Any]) -> None:
        self.local, self.followers = local, followers
        self._everywhere: set[int] = set()  # transfers seen landed on every rank

    def wait_for_request(self, transfer_id: int, num_tokens: int, timeout: float) -> bool:
        import ray

        if transfer_id in self._everywhere:
            return True
        waits = [a.kv.remote("wait", transfer_id, num_tokens, timeout) for a in self.followers]
        here = self.local.wait_for_request(transfer_id, num_tokens, timeout)
        if landed := all(ray.get(waits, timeout=timeout + 10)) and here:
            self._everywhere.add(transfer_id)
        return landed

    def forget(self, transfer_id: int) -> None:
        """After a commit the followers may forget at leisure; after an abort they must have before
        the blocks are reused, so then this waits."""
        import ray

        self.local.forget(transfer_id)
        refs = [a.kv.remote("forget", transfer_id) for a in self.followers]
        if transfer_id in self._everywhere:
            self._everywhere.discard(transfer_id)
        else:
            ray.get(refs, timeout=30)


class PrefillKV:
    """Rank 0 of a prefill replica: the role its followers are built with, then (bind) the
    sender that runs its prompts and writes their KV into decode reservations."""

    def __init__(self, backend: str) -> None:
        import secrets

        self.role = PrefillRole(backend)
        self.sender: KVSender | None = None
        self.local: RankKV | None = None
        self.uid = secrets.randbits(62)  # the replica's id in its pair groups: a replacement has a new one

    def bind(self, engine) -> KVSender:
        """The engine is built (followers included): give rank 0 its saver and the sender."""
        tp = engine.config.options.tensor_parallel_size
        self.sender = KVSender(engine, self.role.kv_saver(engine.config.model_config.num_key_value_heads, 0, tp))
        self.local = self.role.endpoint(engine.runner)
        return self.sender


class DecodeKV:
    """Rank 0 of a decode replica: its KV pool (allocated where prefill replicas can write it),
    the handles that publish every rank's slice, and (bind) the receiver of reservations."""

    def __init__(self, pool: str, backend: str) -> None:
        self.role = DecodeRole(backend, pool)
        self.pool, self.backend = pool, backend
        self._rank0: list[PoolHandle] = []  # rank 0's pool handle, filled by the allocator
        self.handles: list[dict[str, Any]] = []  # every rank's PoolHandle fields, filled by bind
        self.receiver: KVReceiver | None = None
        self.local: RankKV | None = None
        self._store = None  # the rendezvous store of this replica's pair groups (collective)

    def allocator(self) -> KVAllocator | None:
        """Rank 0's KV allocator for the engine (None: the engine's own)."""
        return shared_pool_allocator(self.pool, self._rank0) if self.backend == "ipc" else None

    def bind(self, engine, lease_s: float, followers: list[Any]) -> KVReceiver:
        """The engine is built (followers: its rank actors). On the collective backend commits wait
        for every rank's receiver, and each handle carries its rank in the replica's pair groups
        (the decode ranks come first in each), so senders know where to send."""
        if self.backend == "collective":
            kv = engine.runner.kv_cache
            self._rank0.append(PoolHandle(self.pool, tuple(kv.shape), str(kv.dtype).removeprefix("torch.")))
        tp = engine.config.options.tensor_parallel_size
        ipc = None
        if self._rank0[0].cuda_ipc is not None:  # each rank's slice is its own device memory: its own handle
            import ray

            ipc = [self._rank0[0].cuda_ipc, *ray.get([a.kv.remote("cuda_ipc") for a in followers])]
        self.handles = [dataclasses.asdict(h) for h in rank_pool_handles(
            self.pool, self._rank0[0], engine.config.model_config.num_key_value_heads, tp, ipc)]
        self.local = self.role.endpoint(engine.runner)
        landing: KVLanding | None = None
        if self.backend == "collective":
            landing = RanksLanding(self.local.receiver, followers) if followers else self.local.receiver
            for i, h in enumerate(self.handles):
                h["kv_rank"] = i
        self.receiver = KVReceiver(engine, self.pool, lease_s, landing=landing)
        return self.receiver

    def start_store(self) -> tuple[str, int]:
        """Host the rendezvous store of this replica's pair groups (collective backend) on its node;
        the one already started, when there is one."""
        import ray

        from engine.distributed import tcp_store

        if self._store is None:
            self._store = tcp_store(ray.util.get_node_ip_address(), 0, is_master=True)
        return self._store.host, self._store.port

    def unlink(self) -> None:
        """At shutdown: drop the pool's names (the memory goes when the last mapping does)."""
        if self.backend == "ipc":
            for h in self.handles:
                unlink_pool(h["name"])
