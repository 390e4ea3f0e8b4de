"""What moves, described as data: the contract between the two halves of a connector."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVTarget:
    """Where one request's KV goes. Filled by whoever placed the request (the router, or a test)
    from the decode side's reservation; carried on the prefill sequence as `seq.kv_target`."""
    pool: str  # name of the decode replica's KV pool, as the backend knows it
    request_id: str  # the request's id on the decode side
    block_ids: tuple[int, ...]  # decode-side blocks reserved for the prompt, in order
    transfer_id: int = 0  # the receiver's number for this transfer (unique per decode pool)
    deadline: float = float("inf")  # time.time() after which the sender must not write (the lease's end)


@dataclass(frozen=True)
class Reservation:
    """Decode-side blocks held for a prompt being prefilled elsewhere. Filled by KVReceiver."""
    request_id: str
    transfer_id: int
    num_tokens: int  # prompt tokens whose KV must land before the request may decode
    expires_at: float  # time.monotonic() after which, with no KV committed, the blocks are freed


class KVTransferError(RuntimeError):
    """A transfer failed or was abandoned; its blocks are already freed on the side that raised.
    The router may retry elsewhere or prefill on the decode replica."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"KV transfer for request {request_id!r} failed: {reason}")
        self.request_id = request_id
        self.reason = reason


class LeaseExpired(KVTransferError):
    pass


@dataclass(frozen=True)
class PoolHandle:
    """How a sender finds one rank's slice of a decode replica's KV pool: its memory (ipc) or its
    rank in the KV group (collective). Filled by the decode side at start-up. A replica at TP n
    has n handles: one pool, n slices of its KV heads."""
    name: str  # unique per decode replica and rank
    shape: tuple[int, ...]  # [layers, k|v, num_blocks, block_size, kv_heads, head_dim]
    dtype: str  # torch dtype name, e.g. "float32"
    pool: str = ""  # the replica's pool, as KVTarget.pool names it ("": the same as name)
    kv_heads: tuple[int, int] | None = None  # the model's KV heads this slice holds, [start, end) (None: all)
    cuda_ipc: tuple | None = None  # on CUDA: the pool's IPC handle (torch's rebuild_cuda_tensor arguments)
    kv_rank: int | None = None  # collective backend: the rank in the KV group that receives into this slice

    @property
    def pool_name(self) -> str:
        return self.pool or self.name

    @property
    def head_range(self) -> tuple[int, int]:
        return self.kv_heads or (0, self.shape[4])
