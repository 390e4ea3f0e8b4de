"""The prefix cache's block keys, a leaf package with only the standard library (like detok): the
engine files its full blocks under them, and the router (which has no torch and no engine)
computes the same keys for a prompt to find the replica that holds its prefix."""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence as Seq

BlockHash = bytes
ROOT = bytes(16)  # the parent of a sequence's first block


def hash_block(parent: BlockHash, token_ids: Seq[int], extra: bytes = b"") -> BlockHash:
    """A full block's key: its parent block's key, its token ids, and extra keys (room for a model or
    LoRA id), so the same tokens after another prefix never match. A cryptographic hash: a prompt
    cannot be crafted to collide with another request's block and read its KV."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("i", token_ids).tobytes())
    h.update(extra)
    return h.digest()


def prompt_block_hashes(token_ids: Seq[int], block_size: int) -> list[BlockHash]:
    """The keys of the full blocks a prompt could take from a prefix cache: at most all but its last
    token (that one is always computed, for its logits), as BlockManager.match_prefix looks them up."""
    hashes, parent = [], ROOT
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes
