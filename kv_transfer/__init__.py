"""Moving KV from the prefill pool into reserved decode blocks. See connector halves:
KVSender / KVReceiver (scheduler halves) and the savers of each backend (worker halves)."""
from kv_transfer.metadata import KVTarget, KVTransferError, LeaseExpired, PoolHandle, Reservation
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender, PrefillDone

__all__ = ["KVReceiver", "KVSender", "KVTarget", "KVTransferError", "LeaseExpired", "PoolHandle",
           "PrefillDone", "Reservation"]
