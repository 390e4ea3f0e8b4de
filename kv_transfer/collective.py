"""The `collective` backend: torch.distributed send/recv between a prefill rank and a decode
rank (gloo on CPU, NCCL on CUDA; the same code; works across hosts).

Wire protocol per step and decode rank, all on one (src, dst) pair, in order:
  header  int64 [2]              num_rows, num_segments
  index   int64 [num_rows + 3 * num_segments]
          slots (decode-side cache slot of each row), then per segment of rows:
          transfer id, first position, number of rows
  layer l float [2, num_rows, kv_heads, head_dim] for l in 0..layers-1 (K then V), sent as
          soon as layer l is computed, so the transfer overlaps the remaining layers."""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from engine.kv_connector import KVSaver, StepLayout
from kv_transfer.plan import plan_step


def _isend(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None) -> dist.Work:
    return dist.isend(tensor, dst) if group is None else group.send([tensor], dst, 0)


def _recv(tensor: torch.Tensor, src: int | None, group: dist.ProcessGroup | None) -> int:
    """Receive into tensor from src (None: any source); returns the source rank."""
    if group is None:
        return dist.recv(tensor, src)
    work = group.recv_anysource([tensor], 0) if src is None else group.recv([tensor], src, 0)
    work.wait()
    return work.source_rank() if src is None else src


def kv_group(store_host: str, store_port: int, rank: int, world_size: int, prefix: str,
             timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A gloo group of its own for KV transfer (prefill and decode ranks of a cluster), apart from
    the default group a tensor-parallel replica uses; the store is the launcher's TCPStore."""
    import datetime

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world_size, timeout)


class CollectiveKVSaver(KVSaver):
    """Worker half on the prefill rank. group: the default torch.distributed group (None), or a
    group object of its own (kv_group)."""

    def __init__(self, peers: dict[str, tuple[int, int]], group: dist.ProcessGroup | None = None) -> None:
        self.peers = peers  # pool name -> (decode rank, decode block size)
        self.group = group
        self._plan: list[tuple[int, torch.Tensor | None]] = []
        self._inflight: list[tuple[dist.Work, torch.Tensor]] = []
        self.bytes_sent = 0

    def begin_step(self, layout: StepLayout) -> None:
        plans = plan_step(layout, lambda name: self.peers[name][1] if name in self.peers else None)
        num_rows = layout.query_start_loc[-1]
        self._plan = []
        for name, p in plans.items():
            dst = self.peers[name][0]
            self._send(torch.tensor([len(p.rows), len(p.segments) // 3]), dst)
            self._send(torch.tensor(p.slots + p.segments), dst)
            self._plan.append((dst, None if len(p.rows) == num_rows else torch.tensor(p.rows)))

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for dst, rows in self._plan:
            k_rows, v_rows = (k, v) if rows is None else (k.index_select(0, rows), v.index_select(0, rows))
            kv = torch.stack((k_rows, v_rows))  # [2, num_rows, kv_heads, head_dim]
            self._send(kv, dst)
            self.bytes_sent += kv.numel() * kv.element_size()

    def end_step(self) -> None:
        for work, _ in self._inflight:
            work.wait()
        self._inflight.clear()
        self._plan = []

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        self._inflight.append((_isend(tensor, dst, self.group), tensor))  # keep it alive until sent


class CollectiveKVReceiverThread(threading.Thread):
    """Worker half on the decode rank: receives steps from any prefill rank and writes them into
    the KV pool; records per transfer id how far the prompt has landed in every layer."""

    def __init__(self, pool: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(daemon=True, name="kv-receiver")
        self.pool = pool  # [layers, k|v, num_blocks, block_size, kv_heads, head_dim]
        self.group = group
        self.landed: dict[int, int] = {}  # live transfer id -> positions [0, landed) are in every layer
        self.layer_landed: dict[int, list[int]] = {}  # live transfer id -> per layer, positions [0, n) there
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.bytes_received = 0

    def run(self) -> None:
        layers, _, _, _, heads, dim = self.pool.shape
        flat = [(self.pool[layer, 0].view(-1, heads, dim), self.pool[layer, 1].view(-1, heads, dim))
                for layer in range(layers)]
        try:
            while True:
                header = torch.empty(2, dtype=torch.int64)
                src = _recv(header, None, self.group)  # from any prefill rank
                num_rows, num_segments = header.tolist()
                index = torch.empty(num_rows + 3 * num_segments, dtype=torch.int64)
                _recv(index, src, self.group)
                segments = index[num_rows:].view(-1, 3).tolist()
                keep = self._live_rows(segments)  # rows of aborted transfers must not touch reused blocks
                slots = index[:num_rows] if keep is None else index[:num_rows][keep]
                buf = torch.empty(2, num_rows, heads, dim, dtype=self.pool.dtype)
                for layer, (k_flat, v_flat) in enumerate(flat):
                    _recv(buf, src, self.group)
                    k_rows, v_rows = (buf[0], buf[1]) if keep is None else (buf[0][keep], buf[1][keep])
                    k_flat.index_copy_(0, slots, k_rows)
                    v_flat.index_copy_(0, slots, v_rows)
                    self.bytes_received += buf.numel() * buf.element_size()
                    with self.cond:
                        for tid, first, n in segments:
                            if (per_layer := self.layer_landed.get(tid)) is not None:
                                per_layer[layer] = max(per_layer[layer], first + n)
                        self.cond.notify_all()
                with self.cond:
                    for tid, first, n in segments:
                        if tid in self.landed:
                            self.landed[tid] = max(self.landed[tid], first + n)
                    self.cond.notify_all()
        except BaseException as e:  # the peer died or the group was torn down
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _live_rows(self, segments: list[list[int]]) -> torch.Tensor | None:
        with self.cond:
            if all(tid in self.landed for tid, _, _ in segments):
                return None
            return torch.tensor([tid in self.landed for tid, _, n in segments for _ in range(n)])

    def expect(self, transfer_id: int) -> None:
        with self.cond:
            self.landed[transfer_id] = 0
            self.layer_landed[transfer_id] = [0] * self.pool.shape[0]

    def wait_for_layer(self, transfer_id: int, layer: int, num_tokens: int, timeout: float) -> bool:
        """True once positions [0, num_tokens) of the transfer are in `layer` (a consumer may
        start on layer l while later layers are still arriving)."""
        def landed() -> bool:
            per_layer = self.layer_landed.get(transfer_id)
            return per_layer is not None and per_layer[layer] >= num_tokens
        with self.cond:
            return self.cond.wait_for(lambda: landed() or self.error is not None, timeout) and landed()

    def wait_for_request(self, transfer_id: int, num_tokens: int, timeout: float) -> bool:
        """True once positions [0, num_tokens) of the transfer are in every layer."""
        with self.cond:
            return self.cond.wait_for(
                lambda: self.landed.get(transfer_id, 0) >= num_tokens or self.error is not None, timeout) \
                and self.landed.get(transfer_id, 0) >= num_tokens

    def forget(self, transfer_id: int) -> None:
        with self.cond:
            self.landed.pop(transfer_id, None)
            self.layer_landed.pop(transfer_id, None)
