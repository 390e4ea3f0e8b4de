"""What moves, described as data: the contract between the two halves of a connector. Where a
request's KV goes is the router<->replica contract's Reservation (the router carries it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from replica.contract import KVLost

SHM_DIR = Path("/dev/shm")


def pool_path(name: str) -> Path:
    """Where a decode rank's slice of the KV pool lives in shared memory (ipc backend, CPU)."""
    return SHM_DIR / f"pdserve-kv-{name}"


def rank_pool_name(pool: str, rank: int) -> str:
    """The shared-memory name of one rank's slice of a decode replica's pool."""
    return pool if rank == 0 else f"{pool}.r{rank}"


def remove_pool(pool: str) -> None:
    """Unlink every rank's shared-memory file of a decode replica's pool (the memory goes with the
    last mapping)."""
    for path in [pool_path(pool), *SHM_DIR.glob(f"{pool_path(pool).name}.r*")]:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Lease:
    """The decode side's record of a Reservation: the blocks are freed when it runs out. Filled
    by KVReceiver."""
    request_id: str
    transfer_id: int
    num_tokens: int  # prompt tokens whose KV must land before the request may decode
    expires_at: float  # time.monotonic() after which, with no KV committed, the blocks are freed


def transfer_failed(request_id: str, reason: str, kind: type[KVLost] = KVLost) -> KVLost:
    """The error a side raises when a transfer failed or was abandoned (its blocks already freed
    there): KVLost, or LeaseEnded when the decode side's lease ran out."""
    return kind(f"KV transfer for request {request_id!r} failed: {reason}", request_id)


@dataclass(frozen=True)
class PoolHandle:
    """How a sender finds one rank's slice of a decode replica's KV pool: its memory (ipc) or its
    rank in its pair groups (collective). Filled by the decode side at start-up. A replica at TP n
    has n handles: one pool, n slices of its KV heads."""
    name: str  # unique per decode replica and rank
    shape: tuple[int, ...]  # [layers, k|v, num_blocks, block_size, kv_heads, head_dim]
    dtype: str  # torch dtype name, e.g. "float32"
    pool: str = ""  # the replica's pool, as Reservation.pool names it ("": the same as name)
    kv_heads: tuple[int, int] | None = None  # the model's KV heads this slice holds, [start, end) (None: all)
    cuda_ipc: tuple | None = None  # on CUDA: the pool's IPC handle (torch's rebuild_cuda_tensor arguments)
    kv_rank: int | None = None  # collective backend: its rank in each pair group (the decode ranks come first)

    @property
    def pool_name(self) -> str:
        return self.pool or self.name

    @property
    def head_range(self) -> tuple[int, int]:
        return self.kv_heads or (0, self.shape[4])
