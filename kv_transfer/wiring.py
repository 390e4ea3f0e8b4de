"""Connect a cluster's prefill pool to its decode pool's KV, once all replicas are up: on the
`collective` backend every rank of every replica joins one KV group (decode replicas first), then
every prefill replica attaches every decode rank's pool slice, then the decode replicas drop the
names of their shared-memory pools (all mapped by then, so nothing outlives the actors)."""
from __future__ import annotations

from typing import Any


def connect_pools(prefill: list[Any], decode: list[Any], backend: str, prefill_tp: int, decode_tp: int,
                  prefix: str) -> list[dict[str, Any]]:
    """prefill, decode: the replicas' rank-0 actors (PrefillWorker, DecodeWorker). Returns each
    decode replica's info() as it stands once connected (its pool handles carry their KV ranks)."""
    import ray

    if backend == "collective":
        host, port = ray.get(decode[0].start_kv_store.remote())
        members = [(a, decode_tp) for a in decode] + [(a, prefill_tp) for a in prefill]
        firsts = [sum(n for _, n in members[:i]) for i in range(len(members))]
        world = sum(n for _, n in members)
        ray.get([a.join_kv_group.remote(host, port, first, world, prefix) for (a, _), first in zip(members, firsts)])
    infos = ray.get([a.info.remote() for a in decode])
    ray.get([a.attach.remote([h for info in infos for h in info["pools"]]) for a in prefill])
    ray.get([a.unlink_pool.remote() for a in decode])
    return infos
