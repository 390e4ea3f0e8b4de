"""The `collective` backend: torch.distributed send/recv between prefill ranks and decode ranks
over gloo (TCP, so it works across hosts; on CUDA each layer is staged through host memory:
an NCCL data plane would skip that, but NCCL wants a GPU per rank to be tested). Every rank of
every replica is a member of the cluster's KV group, so the two pools may run different TP
degrees: each prefill rank sends each decode rank the KV heads both of them hold (re-sharding
in flight), and a decode rank counts a transfer as landed once every prefill rank that owes it
heads has delivered.

Wire protocol per step, prefill rank and decode rank, all on one (src, dst) pair, in order:
  header  int64 [6]              num_rows, num_segments, first and end head in the decode rank's
                                 slice, source group (the sending replica's first KV rank), and
                                 how many ranks of that group send this decode rank heads
  index   int64 [num_rows + 3 * num_segments]
          slots (decode-side cache slot of each row), then per segment of rows:
          transfer id, first position, number of rows
  layer l float [2, num_rows, heads, head_dim] for l in 0..layers-1 (K then V), sent as soon
          as layer l is computed, so the transfer overlaps the remaining layers."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.distributed import bind_gloo_to, kv_head_range, tcp_store
from engine.kv_connector import KVSaver, StepLayout
from kv_transfer.metadata import PoolHandle
from kv_transfer.plan import all_rows, plan_step

HEADER = 6
FORGOTTEN_KEEP_S = 600.0  # how long rows of a forgotten transfer are still recognised (and dropped)


def _isend(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup) -> dist.Work:
    return group.send([tensor], dst, 0)


def _recv(tensor: torch.Tensor, src: int | None, group: dist.ProcessGroup) -> int:
    """Receive into tensor from src (None: any source); returns the source rank."""
    work = group.recv_anysource([tensor], 0) if src is None else group.recv([tensor], src, 0)
    work.wait()
    return work.source_rank() if src is None else src


def kv_group(store_host: str, store_port: int, rank: int, world_size: int, prefix: str,
             rendezvous_timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A gloo group of its own for KV transfer (every rank of every replica of a cluster), apart
    from the default group a tensor-parallel replica uses; the store is a decode replica's TCPStore.
    Its operations never time out: a gloo receive that times out closes the group's connections,
    and a decode rank's receiver waits for as long as the cluster is idle (a dead peer fails a
    send or receive at once)."""
    import datetime

    bind_gloo_to(store_host)
    store = tcp_store(store_host, store_port, is_master=False, timeout_s=rendezvous_timeout_s)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world_size, datetime.timedelta(days=3650))


def join_kv_group(runner, host: str, port: int, rank: int, world_size: int, prefix: str
                  ) -> CollectiveKVReceiverThread | None:
    """Join the KV group as `rank` (blocks until every member has). A prefill rank (its runner has a
    CollectiveKVSaver) sends from then on; a decode rank starts receiving into its KV slice."""
    group = kv_group(host, port, rank, world_size, prefix)
    if isinstance(runner.kv_saver, CollectiveKVSaver):
        runner.kv_saver.join(group, rank)
        return None
    thread = CollectiveKVReceiverThread(runner.kv_cache, group)
    thread.start()
    return thread


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), min(a[1], b[1])


class CollectiveKVSaver(KVSaver):
    """Worker half on prefill rank `rank` of a replica at TP `world_size`. Each step it sends every
    decode rank that holds some of its KV heads those heads' rows (a rank whose heads are
    replicated on a lower rank sends nothing)."""

    def __init__(self, num_kv_heads: int, rank: int = 0, world_size: int = 1,
                 group: dist.ProcessGroup | None = None, kv_rank: int = 0) -> None:
        self.num_kv_heads, self.tp_rank, self.tp_size = num_kv_heads, rank, world_size
        self.heads = kv_head_range(num_kv_heads, rank, world_size)
        self.writes = rank % max(1, world_size // num_kv_heads) == 0
        self.group, self.kv_rank = group, kv_rank  # group None: the default torch.distributed group (tests)
        # pool name -> per decode rank: (its rank in the group, its heads [start, end), block size,
        # how many ranks of this replica send it heads)
        self.peers: dict[str, list[tuple[int, tuple[int, int], int, int]]] = {}
        self._dsts: list[tuple[int, str, torch.Tensor | None, slice | None, torch.Tensor | None]] = []
        self._inflight: list[tuple[dist.Work, torch.Tensor, str]] = []
        self._unreachable: dict[str, str] = {}  # pool name -> why (a send to one of its ranks failed)
        self.bytes_sent = 0

    def join(self, group: dist.ProcessGroup, kv_rank: int) -> None:
        self.group, self.kv_rank = group, kv_rank

    def attach(self, handle: PoolHandle) -> None:
        """Learn one decode rank of a decode replica (attaching it again is a no-op)."""
        if handle.kv_rank is None:
            raise ValueError(f"KV pool {handle.name!r} has no rank in the KV group; was the group joined?")
        peer = (handle.kv_rank, handle.head_range, handle.shape[3], self._senders_of(handle.head_range))
        if peer not in (peers := self.peers.setdefault(handle.pool_name, [])):
            peers.append(peer)

    def _senders_of(self, heads: tuple[int, int]) -> int:
        """How many ranks of this replica send a decode rank holding `heads`."""
        replicas = max(1, self.tp_size // self.num_kv_heads)
        return sum(1 for r in range(0, self.tp_size, replicas)
                   if (o := _overlap(kv_head_range(self.num_kv_heads, r, self.tp_size), heads))[0] < o[1])

    def plan(self, layout: StepLayout) -> dict[str, tuple[list[int] | None, list[int], list[int], list[int]]]:
        """Rank 0: per destination pool, the rows of the flat batch (None: all) then of the cached slots
        (kv_transfer.plan.PoolPlan), their slots, the segments (transfer id, first position, rows) they
        belong to, and the cached slots."""
        plans = plan_step(layout, lambda name: self.peers[name][0][2] if name in self.peers else None,
                          self.local_kv.shape[3])
        num_rows = layout.query_start_loc[-1]
        return {name: (all_rows(p, num_rows), p.slots, p.segments, p.cached) for name, p in plans.items()}

    def begin_planned(self, sends: dict[str, tuple[list[int] | None, list[int], list[int], list[int]]]) -> None:
        """Every rank: send each decode rank the header and index of its share of rank 0's plan."""
        self._dsts = []
        if not self.writes:
            return
        source_group = self.kv_rank - self.tp_rank
        for name, (rows, slots, segments, cached) in sends.items():
            if name in self._unreachable:
                continue
            rows_t, index = (None if rows is None else torch.tensor(rows)), torch.tensor(slots + segments)
            cached_t = torch.tensor(cached) if cached else None
            for dst, heads, _, senders in self.peers[name]:
                lo, hi = _overlap(heads, self.heads)
                if lo >= hi:
                    continue
                self._send(torch.tensor([len(slots), len(segments) // 3, lo - heads[0], hi - heads[0],
                                         source_group, senders]), dst, name)
                self._send(index, dst, name)
                mine = None if (lo, hi) == self.heads else slice(lo - self.heads[0], hi - self.heads[0])
                self._dsts.append((dst, name, rows_t, mine, cached_t))

    def begin_step(self, layout: StepLayout) -> None:
        self.begin_planned(self.plan(layout))

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for dst, name, rows, heads, cached in self._dsts:
            k_rows, v_rows = self.rows(layer, 0, k, rows, cached), self.rows(layer, 1, v, rows, cached)
            if heads is not None:
                k_rows, v_rows = k_rows[:, heads], v_rows[:, heads]
            kv = torch.stack((k_rows, v_rows))  # [2, num_rows, heads, head_dim], contiguous
            self._send(kv.cpu(), dst, name)  # gloo sends host memory: a CUDA layer is staged through it
            self.bytes_sent += kv.numel() * kv.element_size()

    def end_step(self) -> None:
        for work, _, name in self._inflight:
            try:
                work.wait()
            except RuntimeError as e:
                self._unreachable.setdefault(name, str(e).splitlines()[0][:200])
        self._inflight.clear()
        self._dsts = []

    def unreachable(self) -> dict[str, str]:
        return self._unreachable

    def _send(self, tensor: torch.Tensor, dst: int, pool: str) -> None:
        """Send asynchronously; a peer that died makes its pool unreachable, not this replica fail."""
        if pool in self._unreachable:
            return
        try:  # keep the tensor alive until sent
            self._inflight.append((_isend(tensor, dst, self.group or dist.group.WORLD), tensor, pool))
        except RuntimeError as e:
            self._unreachable[pool] = str(e).splitlines()[0][:200]


@dataclass
class _Landed:
    """What of one transfer has landed on a decode rank: per sending replica (source group), per
    sending rank, per layer, positions [0, n)."""
    groups: dict[int, tuple[int, dict[int, list[int]]]] = field(default_factory=dict)

    def layer(self, layer: int) -> int:
        """Positions [0, n) in `layer` from every rank of some sending replica."""
        return max((min(per_layer[layer] for per_layer in srcs.values())
                    for senders, srcs in self.groups.values() if len(srcs) == senders), default=0)


class CollectiveKVReceiverThread(threading.Thread):
    """Worker half on a decode rank: receives steps from any prefill rank and writes them into its
    KV slice; records per transfer how far the prompt has landed in every layer. A transfer is
    known from its first rows; once forgotten (committed or aborted) its late rows are dropped."""

    def __init__(self, pool: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(daemon=True, name="kv-receiver")
        self.pool = pool  # [layers, k|v, num_blocks, block_size, kv_heads, head_dim]
        self.group = group or dist.group.WORLD  # None: the default group, as it is now (tests)
        self.transfers: dict[int, _Landed] = {}
        self.forgotten: dict[int, float] = {}  # transfer id -> when
        self.cond = threading.Condition()
        self._stopped = False
        self.num_errors = 0  # receives that failed (a sender died mid-step)
        self.bytes_received = 0

    def run(self) -> None:
        """Receive steps until the process ends. A sender that dies loses only what it had not
        finished sending; the other senders go on."""
        layers, _, _, _, heads, dim = self.pool.shape
        flat = [(self.pool[layer, 0].view(-1, heads, dim), self.pool[layer, 1].view(-1, heads, dim))
                for layer in range(layers)]
        header = torch.empty(HEADER, dtype=torch.int64)
        failing = 0  # receives failed in a row
        while True:
            try:
                src = _recv(header, None, self.group)  # from any prefill rank
                self._receive_step(src, header.tolist(), flat)
                failing = 0
            except RuntimeError:  # the sender died mid-step: what it sent of the step is dropped
                if self._stopped:
                    return
                self.num_errors += 1
                failing += 1
                time.sleep(min(1.0, 0.01 * 2 ** failing))  # a group that stays broken is not polled hot

    def stop(self) -> None:
        """End the thread when its group is torn down (a receive pending until then stays so)."""
        self._stopped = True

    def _receive_step(self, src: int, header: list[int], flat: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        num_rows, num_segments, lo, hi, source_group, senders = header
        heads, dim = self.pool.shape[4:]
        index = torch.empty(num_rows + 3 * num_segments, dtype=torch.int64)
        _recv(index, src, self.group)
        slots, segments = index[:num_rows].to(self.pool.device), index[num_rows:].view(-1, 3).tolist()
        buf = torch.empty(2, num_rows, hi - lo, dim, dtype=self.pool.dtype)  # host memory, for gloo
        for layer, (k_flat, v_flat) in enumerate(flat):
            _recv(buf, src, self.group)
            rows = buf.to(self.pool.device)  # no copy on CPU
            if (lo, hi) != (0, heads):
                k_flat, v_flat = k_flat[:, lo:hi], v_flat[:, lo:hi]
            # under the lock: once forget() returns, not one more row of that transfer is written
            with self.cond:
                landed = [self._landed(tid, source_group, senders, src) for tid, _, _ in segments]
                if all(x is not None for x in landed):
                    k_flat.index_copy_(0, slots, rows[0])
                    v_flat.index_copy_(0, slots, rows[1])
                else:  # rows of forgotten transfers must not touch blocks that may be reused
                    keep = torch.tensor([x is not None for x, (_, _, n) in zip(landed, segments)
                                         for _ in range(n)], device=self.pool.device)
                    k_flat.index_copy_(0, slots[keep], rows[0][keep])
                    v_flat.index_copy_(0, slots[keep], rows[1][keep])
                for per_layer, (_, first, n) in zip(landed, segments):
                    if per_layer is not None:
                        per_layer[layer] = max(per_layer[layer], first + n)
                self.cond.notify_all()
            self.bytes_received += buf.numel() * buf.element_size()

    def _landed(self, tid: int, source_group: int, senders: int, src: int) -> list[int] | None:
        """The per-layer counts of (transfer, sending rank); None for a forgotten transfer."""
        if tid in self.forgotten:
            return None
        t = self.transfers.setdefault(tid, _Landed())
        _, srcs = t.groups.setdefault(source_group, (senders, {}))
        return srcs.setdefault(src, [0] * self.pool.shape[0])

    def expect(self, transfer_id: int) -> None:
        """Nothing to do: a transfer is known from its first rows."""

    def wait_for_layer(self, transfer_id: int, layer: int, num_tokens: int, timeout: float) -> bool:
        """True once positions [0, num_tokens) of the transfer are in `layer` (a consumer may
        start on layer l while later layers are still arriving)."""
        return self._wait(transfer_id, layer, num_tokens, timeout)

    def wait_for_request(self, transfer_id: int, num_tokens: int, timeout: float) -> bool:
        """True once positions [0, num_tokens) of the transfer are in every layer (the last layer
        of a step lands last)."""
        return self._wait(transfer_id, self.pool.shape[0] - 1, num_tokens, timeout)

    def landed(self, transfer_id: int) -> list[int]:
        """Per layer, positions [0, n) of the transfer that are here."""
        with self.cond:
            t = self.transfers.get(transfer_id)
            return [t.layer(layer) if t else 0 for layer in range(self.pool.shape[0])]

    def _wait(self, transfer_id: int, layer: int, num_tokens: int, timeout: float) -> bool:
        def done() -> bool:
            t = self.transfers.get(transfer_id)
            return t is not None and t.layer(layer) >= num_tokens
        with self.cond:
            return self.cond.wait_for(done, timeout)

    def forget(self, transfer_id: int) -> None:
        """The transfer is committed or aborted: drop its counts, and any row of it still to come."""
        now = time.monotonic()
        with self.cond:
            self.transfers.pop(transfer_id, None)
            self.forgotten[transfer_id] = now
            if len(self.forgotten) > 1024:
                self.forgotten = {t: at for t, at in self.forgotten.items() if now - at < FORGOTTEN_KEEP_S}
