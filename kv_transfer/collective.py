"""The `collective` backend: torch.distributed send/recv between prefill ranks and decode ranks,
over NCCL between GPUs and gloo on CPUs (or, asked for, gloo between GPUs: each layer staged through
host memory). The transport is chosen in one place (Wire); the planning of what goes where, the
protocol, the receiving threads and the watchdog are the same code on both. Each pair of a
prefill replica and a decode replica forms a group of its own, its pair group: the decode
replica's ranks first (0..TP_d-1), then the prefill replica's. So the two pools may run different
TP degrees (each prefill rank sends each decode rank the KV heads both of them hold, re-sharding
in flight), a replica that joins (a replacement, a scale-up) forms groups with the live replicas
of the other pool while the rest go on, and one that dies breaks only its own pairs (neither gloo
nor NCCL groups take a new member; one group for the whole cluster would have to be formed again).
A decode rank receives from each prefill rank that owes it heads on a thread of its own (NCCL has
no receive from any source), into one record of what has landed, and counts a transfer as landed
once every rank of some sending replica that owes it heads has delivered.

A dead peer: on gloo a send or receive fails at once when the peer's process goes (its sockets
close). NCCL cannot time out a receive without tearing the communicator down, so a watchdog does it:
a pair group is dropped (Wire.abort: the communicator aborted, its blocked operations end) when the
cluster says its prefill replica is gone (drop_pair), or when a step that has begun stops arriving
for `stall_s`; a sender drops a decode pool whose sends have not completed for as long. The requests
that were crossing it are then lost to that pair (KVLost, moved or prefilled again by the router) and
a replacement forms a new pair group. On gloo the same watchdog marks the pair dropped; its blocked
receive ends when the peer's process does (gloo's abort does not interrupt it).

Wire protocol per step, prefill rank and decode rank, all within their pair group, in order:
  header  int64 [6]              num_rows, num_segments, first and end head in the decode rank's
                                 slice, the sending replica's id (its kv_uid, the same on each of
                                 its ranks), and how many of its ranks send this decode rank heads
  index   int64 [num_rows + 3 * num_segments]
          slots (decode-side cache slot of each row), then per segment of rows:
          transfer id, first position, number of rows
  layer l float [2, num_rows, heads, head_dim] for l in 0..layers-1 (K then V), sent as soon
          as layer l is computed, so the transfer overlaps the remaining layers."""
from __future__ import annotations

import contextlib
import datetime
import os
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
STALL_S = 30.0  # a step begun whose next message has not come (or a send not done) this long: the peer is gone
NEVER = datetime.timedelta(days=3650)  # a pair group's operations never time out: the watchdog ends them


@dataclass(frozen=True)
class Wire:
    """How the collective backend's messages travel; the one place where NCCL and gloo differ.
    nccl: messages are device tensors, sends run on NCCL's own stream (after the layer's compute on
    the current one, so they overlap the next layer's), each receiving thread works on a side stream
    and synchronizes it before a layer counts as landed (the decode step, which reads the pool once
    a transfer has landed, never sees a write in flight); a sender never makes its compute stream
    wait for a send (a dead peer would stall it), the watchdog looks at the sends instead.
    gloo: messages are host tensors (a GPU pool's layers staged through host memory), operations
    block the calling thread, and a step waits for its sends (a dead peer fails them at once)."""
    backend: str  # "nccl" or "gloo"
    device: torch.device  # where the KV lives

    @classmethod
    def for_device(cls, device: torch.device | str) -> Wire:
        """NCCL for a CUDA pool, gloo for a CPU one; PDSERVE_KV_WIRE=gloo keeps a CUDA pool on gloo (two
        processes on one GPU: NCCL refuses two ranks on one device)."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls("gloo", device)
        backend = os.environ.get("PDSERVE_KV_WIRE") or "nccl"
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"PDSERVE_KV_WIRE={backend!r}: the collective backend's wire is nccl or gloo")
        return cls(backend, device)

    @property
    def buffers(self) -> torch.device:
        """Where messages are sent from and received into."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @property
    def waits_for_sends(self) -> bool:
        return self.backend == "gloo"

    def group(self, store: dist.Store, rank: int, world_size: int) -> dist.ProcessGroup:
        if self.backend == "nccl":
            # an NCCL error (a peer gone) aborts the pair's communicators and leaves the process up: the pair is lost,
            # the replica goes on (torch's default, 3, ends the process)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = NEVER
            return dist.ProcessGroupNCCL(store, rank, world_size, options)
        return dist.ProcessGroupGloo(store, rank, world_size, NEVER)

    def outgoing(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as sent: where the wire's buffers are (no copy when it is there already)."""
        return tensor.to(self.buffers)

    def stream(self) -> contextlib.AbstractContextManager:
        """A receiving thread's stream (a side stream of its own on CUDA)."""
        return torch.cuda.stream(torch.cuda.Stream(self.device)) if self.device.type == "cuda" else \
            contextlib.nullcontext()

    def settle(self) -> None:
        """A receiving thread's writes into the pool are done (before they count as landed)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def abort(self, group: dist.ProcessGroup) -> None:
        """End a pair group's blocked operations (NCCL: abort the communicator). Gloo's abort does not
        interrupt a blocked receive (the peer's closed connection does), so it is left alone."""
        if self.backend == "nccl":
            with contextlib.suppress(Exception):
                group.abort()


def _isend(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup) -> dist.Work:
    return group.send([tensor], dst, 0)


def _recv(tensor: torch.Tensor, src: int, group: dist.ProcessGroup) -> None:
    """Receive into tensor from src (on CUDA: the current stream waits for it)."""
    group.recv([tensor], src, 0).wait()


def kv_group(store_host: str, store_port: int, rank: int, world_size: int, prefix: str, wire: Wire,
             rendezvous_timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A group of its own for KV transfer (the ranks of one prefill and one decode replica), apart
    from the default group a tensor-parallel replica uses; the store is the decode replica's TCPStore.
    Its operations never time out (a gloo receive that times out closes the group's connections, an
    NCCL one aborts the communicator, and a decode rank's receiver waits for as long as the pair is
    idle): dead peers are the watchdog's (module docstring)."""
    bind_gloo_to(store_host)
    store = tcp_store(store_host, store_port, is_master=False, timeout_s=rendezvous_timeout_s)
    return wire.group(dist.PrefixStore(prefix, store), rank, world_size)


def senders_to(num_kv_heads: int, heads: tuple[int, int], prefill_tp: int) -> list[int]:
    """The ranks of a prefill replica at TP prefill_tp that send a decode rank holding `heads` (a rank
    whose heads are replicated on a lower rank sends nothing)."""
    replicas = max(1, prefill_tp // num_kv_heads)
    return [r for r in range(0, prefill_tp, replicas)
            if (o := _overlap(kv_head_range(num_kv_heads, r, prefill_tp), heads))[0] < o[1]]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), min(a[1], b[1])


class CollectiveKVSaver(KVSaver):
    """Worker half on prefill rank `rank` of a replica at TP `world_size`. Each step it sends every
    decode rank that holds some of its KV heads those heads' rows (a rank whose heads are
    replicated on a lower rank sends nothing), over the pair group of that decode replica
    (join_pair; without one, the default torch.distributed group as rank 0: tests)."""

    def __init__(self, num_kv_heads: int, rank: int = 0, world_size: int = 1, stall_s: float = STALL_S) -> None:
        self.num_kv_heads, self.tp_rank, self.tp_size = num_kv_heads, rank, world_size
        self.heads = kv_head_range(num_kv_heads, rank, world_size)
        self.writes = rank % max(1, world_size // num_kv_heads) == 0
        self.wire = Wire.for_device("cpu")  # bind_local: the wire of the device the KV is on
        self.stall_s = stall_s
        self.uid = 0  # the sending replica's id (join_pair), the same on each of its ranks
        self.groups: dict[str, dist.ProcessGroup] = {}  # decode pool name -> its pair group
        # pool name -> per decode rank: (its rank in the pair group, its heads [start, end), block
        # size, how many ranks of this replica send it heads)
        self.peers: dict[str, list[tuple[int, tuple[int, int], int, int]]] = {}
        self._dsts: list[tuple[int, str, dist.ProcessGroup, torch.Tensor | None, slice | None,
                               torch.Tensor | None]] = []
        # sends not known done: (work, the tensor it sends, pool name, when posted)
        self._inflight: list[tuple[dist.Work, torch.Tensor, str, float]] = []
        self._unreachable: dict[str, str] = {}  # pool name -> why (a send to one of its ranks failed)
        self._lock = threading.Lock()  # detach (a follower's actor thread) against the step thread's sends
        self.bytes_sent = 0

    def bind_local(self, kv_cache: torch.Tensor) -> None:
        super().bind_local(kv_cache)
        self.wire = Wire.for_device(kv_cache.device)

    def join_pair(self, pool_name: str, group: dist.ProcessGroup, uid: int) -> None:
        """The pair group with decode replica `pool_name` is formed (attach its ranks next); uid: this
        replica's id. Called between steps, before any prompt is bound there."""
        self.groups[pool_name], self.uid = group, uid

    def reaches(self, pool: str) -> bool:
        return pool in self.peers

    def detach(self, pool_name: str) -> None:
        """Forget a decode replica (it died or left): its ranks and its pair group (aborted, so a send
        to a dead peer still pending on NCCL ends). Called between steps, once no prompt is bound there."""
        with self._lock:
            self.peers.pop(pool_name, None)
            group = self.groups.pop(pool_name, None)
            self._unreachable.pop(pool_name, None)
            self._inflight = [x for x in self._inflight if x[2] != pool_name]
        if group is not None:
            self.wire.abort(group)

    def attach(self, handle: PoolHandle) -> None:
        """Learn one decode rank of a decode replica (attaching it again is a no-op)."""
        if handle.kv_rank is None:
            raise ValueError(f"KV pool {handle.name!r} has no rank in a pair group (kv_rank)")
        peer = (handle.kv_rank, handle.head_range, handle.shape[3], self._senders_of(handle.head_range))
        if peer not in (peers := self.peers.setdefault(handle.pool_name, [])):
            peers.append(peer)

    def _senders_of(self, heads: tuple[int, int]) -> int:
        """How many ranks of this replica send a decode rank holding `heads`."""
        return len(senders_to(self.num_kv_heads, heads, self.tp_size))

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
        self._watch()
        if not self.writes:
            return
        device = self.wire.buffers
        for name, (rows, slots, segments, cached) in sends.items():
            # the pair group, taken once for the whole step (detach may drop it from another thread)
            group = self.groups.get(name) or (None if self.groups else dist.group.WORLD)
            if name in self._unreachable or group is None:
                continue
            kv_device = self.local_kv.device if self.local_kv is not None else device
            rows_t = None if rows is None else torch.tensor(rows, device=kv_device)
            cached_t = torch.tensor(cached, device=kv_device) if cached else None
            index = torch.tensor(slots + segments, device=device)
            for dst, heads, _, senders in self.peers[name]:
                lo, hi = _overlap(heads, self.heads)
                if lo >= hi:
                    continue
                self._send(torch.tensor([len(slots), len(segments) // 3, lo - heads[0], hi - heads[0],
                                         self.uid, senders], device=device), dst, name, group)
                self._send(index, dst, name, group)
                mine = None if (lo, hi) == self.heads else slice(lo - self.heads[0], hi - self.heads[0])
                self._dsts.append((dst, name, group, rows_t, mine, cached_t))

    def begin_step(self, layout: StepLayout) -> None:
        self.begin_planned(self.plan(layout))

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for dst, name, group, rows, heads, cached in self._dsts:
            k_rows, v_rows = self.rows(layer, 0, k, rows, cached), self.rows(layer, 1, v, rows, cached)
            if heads is not None:
                k_rows, v_rows = k_rows[:, heads], v_rows[:, heads]
            kv = torch.stack((k_rows, v_rows))  # [2, num_rows, heads, head_dim], contiguous
            self._send(self.wire.outgoing(kv), dst, name, group)
            self.bytes_sent += kv.numel() * kv.element_size()

    def end_step(self) -> None:
        if self.wire.waits_for_sends:
            with self._lock:
                sends, self._inflight = self._inflight, []
            for work, _, name, _ in sends:
                try:
                    work.wait()
                except RuntimeError as e:
                    self._unreachable.setdefault(name, str(e).splitlines()[0][:200])
        self._dsts = []

    def _watch(self) -> None:
        """Before a step: forget the sends that are done; a decode pool with a send pending for stall_s is
        unreachable from here (its peer is gone: the pair group is aborted, its prompts go elsewhere)."""
        now, pending, stuck = time.monotonic(), [], []
        with self._lock:
            for work, tensor, name, at in self._inflight:
                if work.is_completed() or name in self._unreachable:
                    continue
                if now - at > self.stall_s:
                    self._unreachable[name] = f"a KV send has not completed in {self.stall_s:g} s"
                    stuck += [g] if (g := self.groups.get(name)) is not None else []
                    continue
                pending.append((work, tensor, name, at))
            self._inflight = pending
        for group in stuck:
            self.wire.abort(group)

    def unreachable(self) -> dict[str, str]:
        return self._unreachable

    def _send(self, tensor: torch.Tensor, dst: int, pool: str, group: dist.ProcessGroup) -> None:
        """Send asynchronously; a peer that died makes its pool unreachable, not this replica fail."""
        if pool in self._unreachable:
            return
        try:  # keep the tensor alive until sent
            work = _isend(tensor, dst, group)
            with self._lock:
                self._inflight.append((work, tensor, pool, time.monotonic()))
        except RuntimeError as e:
            self._unreachable[pool] = str(e).splitlines()[0][:200]


@dataclass
class _Landed:
    """What of one transfer has landed on a decode rank: per sending replica (its id), per sending
    rank, per layer, positions [0, n)."""
    senders: dict[int, tuple[int, dict[int, list[int]]]] = field(default_factory=dict)

    def layer(self, layer: int) -> int:
        """Positions [0, n) in `layer` from every rank of some sending replica."""
        return max((min(per_layer[layer] for per_layer in ranks.values())
                    for owed, ranks in self.senders.values() if len(ranks) == owed), default=0)


class CollectiveKVReceiver:
    """Worker half on a decode rank: receives steps from the prefill ranks of each of its pair
    groups (a thread each, add_group) and writes them into its KV slice; records per transfer how
    far the prompt has landed in every layer, whichever sender it came from (a prompt prefilled
    again elsewhere lands from another replica). A transfer is known from its first rows; once
    forgotten (committed or aborted) its late rows are dropped."""

    def __init__(self, pool: torch.Tensor, stall_s: float = STALL_S) -> None:
        self.pool = pool  # [layers, k|v, num_blocks, block_size, kv_heads, head_dim]
        self.wire = Wire.for_device(pool.device)
        self.stall_s = stall_s
        self.transfers: dict[int, _Landed] = {}
        self.forgotten: dict[int, float] = {}  # transfer id -> when
        self.cond = threading.Condition()
        self.groups: dict[str, dist.ProcessGroup] = {}  # pair key -> its group, while it is receiving
        self.threads: dict[tuple[str, int], threading.Thread] = {}  # (pair key, source rank) -> its thread
        # (pair key, source rank) -> when its step's last message came, while a step is arriving
        self._arriving: dict[tuple[str, int], float] = {}
        self.broken: dict[str, str] = {}  # pair key -> why it stopped (a member died, or it was dropped)
        self._watchdog: threading.Thread | None = None
        self._stopped = False
        self.num_errors = 0  # receives that failed (a sender died mid-step)
        self.bytes_received = 0

    def add_group(self, key: str, group: dist.ProcessGroup | None = None, sources: list[int] | None = None) -> None:
        """Receive from the prefill ranks `sources` of a pair group (None: every other rank of it; group None:
        the default group, as it is now: tests), each on a thread of its own, until the group fails or
        is dropped."""
        group = group or dist.group.WORLD
        if sources is None:
            sources = [r for r in range(group.size()) if r != group.rank()]
        with self.cond:
            self.groups[key] = group
            self.broken.pop(key, None)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, daemon=True, name="kv-receiver-watchdog")
                self._watchdog.start()
        for src in sources:
            thread = threading.Thread(target=self._run, args=(key, group, src), daemon=True,
                                      name=f"kv-receiver-{key}-{src}")
            self.threads[key, src] = thread
            thread.start()

    def drop_pair(self, key: str, why: str) -> None:
        """The watchdog's act: stop receiving on a pair group (its prefill replica is gone, or a step of
        it stalled). Its group is aborted (Wire.abort); rows of it that still arrive are not written, and
        what its transfers had not delivered never lands here (the router moves them)."""
        with self.cond:
            group = self.groups.pop(key, None)
            if group is None:
                return
            self.broken[key] = why
            for arriving in [a for a in self._arriving if a[0] == key]:
                del self._arriving[arriving]
        self.wire.abort(group)

    def _watch(self) -> None:
        """Drop a pair whose step stopped arriving: a message due for stall_s."""
        while not self._stopped:
            time.sleep(min(1.0, self.stall_s / 4))
            now = time.monotonic()
            with self.cond:
                stalled = {key: src for (key, src), at in self._arriving.items() if now - at > self.stall_s}
            for key, src in stalled.items():
                self.drop_pair(key, f"rank {src} stopped sending mid-step for {self.stall_s:g} s")

    def _run(self, key: str, group: dist.ProcessGroup, src: int) -> None:
        """Receive steps from rank `src` until the group fails or is dropped. A pair group fails for good
        when a member dies (its prefill replica, or this replica, which then goes too): what the sender
        had not finished sending of a step is dropped, and the thread ends. Nothing waits for a message
        while holding the lock (on NCCL the wait is in settle or tolist, which the watchdog's abort ends)."""
        layers, _, _, _, heads, dim = self.pool.shape
        flat = [(self.pool[layer, 0].view(-1, heads, dim), self.pool[layer, 1].view(-1, heads, dim))
                for layer in range(layers)]
        with self.wire.stream():
            header = torch.empty(HEADER, dtype=torch.int64, device=self.wire.buffers)
            while True:
                try:
                    _recv(header, src, group)
                    values = header.tolist()  # on NCCL: until it has arrived
                    if self.groups.get(key) is not group:
                        return  # dropped while waiting: what came is not trusted
                    self._receive_step(key, src, values, flat, group)
                    if self.groups.get(key) is not group:
                        return
                except RuntimeError as e:
                    if not self._stopped and self.groups.get(key) is group:
                        self.num_errors += 1  # a member died: the pair is done, its other threads too
                        self.drop_pair(key, str(e).splitlines()[0][:200] if str(e) else repr(e))
                    return
                finally:
                    with self.cond:
                        self._arriving.pop((key, src), None)
                    if self.groups.get(key) is not group:
                        self.threads.pop((key, src), None)

    def stop(self) -> None:
        """The groups are about to be torn down: the failures that follow are not errors. On NCCL each group is
        aborted first (a receive that is always pending would hold its teardown for ever)."""
        self._stopped = True
        with self.cond:
            groups = list(self.groups.values())
        for group in groups:
            self.wire.abort(group)

    def _receive_step(self, key: str, src: int, header: list[int], flat: list[tuple[torch.Tensor, torch.Tensor]],
                      group: dist.ProcessGroup) -> None:
        num_rows, num_segments, lo, hi, sender, senders = header
        heads, dim = self.pool.shape[4:]
        arriving = (key, src)
        with self.cond:
            if self.groups.get(key) is not group:
                return
            self._arriving[arriving] = time.monotonic()
        index = torch.empty(num_rows + 3 * num_segments, dtype=torch.int64, device=self.wire.buffers)
        _recv(index, src, group)
        segments = index[num_rows:].view(-1, 3).tolist()  # on NCCL: until it has arrived
        if self.groups.get(key) is not group:
            return
        slots = index[:num_rows].to(self.pool.device)
        buf = torch.empty(2, num_rows, hi - lo, dim, dtype=self.pool.dtype, device=self.wire.buffers)
        for layer, (k_flat, v_flat) in enumerate(flat):
            _recv(buf, src, group)
            self.wire.settle()  # on NCCL: until the layer has arrived, outside the lock
            rows = buf.to(self.pool.device)  # no copy where the wire's buffers are the pool's device
            if (lo, hi) != (0, heads):
                k_flat, v_flat = k_flat[:, lo:hi], v_flat[:, lo:hi]
            # under the lock: once forget() returns, not one more row of that transfer is written
            with self.cond:
                if self.groups.get(key) is not group:
                    return  # dropped: the watchdog gave up on this pair
                self._arriving[arriving] = time.monotonic()
                landed = [self._landed(tid, sender, senders, src) for tid, _, _ in segments]
                if all(x is not None for x in landed):
                    k_flat.index_copy_(0, slots, rows[0])
                    v_flat.index_copy_(0, slots, rows[1])
                else:  # rows of forgotten transfers must not touch blocks that may be reused
                    keep = torch.tensor([x is not None for x, (_, _, n) in zip(landed, segments)
                                         for _ in range(n)], device=self.pool.device)
                    k_flat.index_copy_(0, slots[keep], rows[0][keep])
                    v_flat.index_copy_(0, slots[keep], rows[1][keep])
                self.wire.settle()  # the writes are done (data already here: short) before they count as landed
                for per_layer, (_, first, n) in zip(landed, segments):
                    if per_layer is not None:
                        per_layer[layer] = max(per_layer[layer], first + n)
                self.cond.notify_all()
                self.bytes_received += buf.numel() * buf.element_size()

    def _landed(self, tid: int, sender: int, senders: int, src: int) -> list[int] | None:
        """The per-layer counts of (transfer, sending replica, its rank); None for a forgotten transfer."""
        if tid in self.forgotten:
            return None
        t = self.transfers.setdefault(tid, _Landed())
        _, ranks = t.senders.setdefault(sender, (senders, {}))
        return ranks.setdefault(src, [0] * self.pool.shape[0])

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
