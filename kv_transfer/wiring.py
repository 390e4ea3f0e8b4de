"""Connect a cluster's prefill pool to its decode pool's KV, once all replicas are up: on the
`collective` backend every rank of every replica joins one KV group (decode replicas first), then
every prefill replica attaches every decode rank's pool slice. A replica that replaces a dead one
(pdserve.supervisor, `ipc` backend) is wired in alone: a new decode replica's pool is attached by
every prefill replica (which drop the dead one's), a new prefill replica attaches every decode
pool. The shared-memory pools keep their names while the cluster runs, so a new replica can map
them; each decode replica unlinks its own at shutdown, and Cluster.stop whatever a dead one left."""
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
    return infos


def rewire_decode(prefill: list[Any], info: dict[str, Any], dead_pool: str | None = None) -> None:
    """A new decode replica (its info()) joins, in place of the one whose pool was `dead_pool` if
    any: every live prefill replica forgets the dead pool (the prompts bound there fail) and maps
    the new one."""
    import ray

    if dead_pool is not None:
        drop_decode(prefill, dead_pool)
    ray.get([a.attach.remote(info["pools"]) for a in prefill])


def drop_decode(prefill: list[Any], pool: str) -> None:
    """A decode replica's pool goes (it died, or left the pool): every live prefill replica forgets it
    (the prompts bound there fail, to be moved elsewhere) and its shared-memory files are removed."""
    import ray

    from kv_transfer.metadata import remove_pool

    ray.get([a.detach.remote(pool) for a in prefill])
    remove_pool(pool)


def wire_prefill(actor: Any, decode: list[Any]) -> None:
    """A new prefill replica maps every live decode replica's pool."""
    import ray

    infos = ray.get([d.info.remote() for d in decode])
    ray.get(actor.attach.remote([h for info in infos for h in info["pools"]]))
