"""Connect a cluster's prefill pool to its decode pool's KV: at start-up once all replicas are up,
and again for each replica that joins later (pdserve.supervisor: a replacement, a scale-up). On
the `collective` backend each (prefill, decode) pair of replicas forms a pair group of its own
(kv_transfer.collective), so a newcomer forms groups with the live replicas of the other pool and
the others go on; then every prefill replica attaches every decode rank's pool slice. A decode
replica that goes (it died, or left the pool) is dropped by every live prefill replica: the prompts
bound there fail (to be moved elsewhere), its mapping or pair group goes. The shared-memory pools
keep their names while the cluster runs, so a new replica can map them; each decode replica unlinks
its own at shutdown, and Cluster.stop whatever a dead one left."""
from __future__ import annotations

from typing import Any


def link(prefill: list[Any], decode: list[Any], backend: str, prefill_tp: int, decode_tp: int,
         prefix: str) -> list[dict[str, Any]]:
    """Connect every replica of `prefill` to every replica of `decode` (pair groups first, on the
    collective backend); returns the decode replicas' info()."""
    import ray

    infos = ray.get([a.info.remote() for a in decode])
    if backend == "collective":
        uids = [info["kv_uid"] for info in ray.get([a.info.remote() for a in prefill])]
        for d, d_info in zip(decode, infos):
            host, port = ray.get(d.start_kv_store.remote())
            for p, uid in zip(prefill, uids):  # one pair at a time: a rank joins one group at a time
                key = f"{prefix}/{uid}>{d_info['pool']}"
                ray.get([p.join_kv_pair.remote(host, port, d_info["pool"], decode_tp, key),
                         d.join_kv_pair.remote(host, port, uid, prefill_tp, key)])
    ray.get([a.attach.remote([h for info in infos for h in info["pools"]]) for a in prefill])
    return infos


def drop_prefill(decode: list[Any], uid: int | None, why: str) -> None:
    """A prefill replica (its kv_uid) is gone: every live decode replica stops receiving from it (on the
    collective backend its pair groups are aborted, so no receive of NCCL waits on it for ever)."""
    import ray

    if uid is not None:
        ray.get([a.drop_kv_pair.remote(uid, why) for a in decode])


def drop_decode(prefill: list[Any], pool: str) -> None:
    """A decode replica's pool goes (it died, or left the pool): every live prefill replica forgets it
    (the prompts bound there fail, to be moved elsewhere; its mapping or pair group goes) and its
    shared-memory files are removed."""
    import ray

    from kv_transfer.metadata import remove_pool

    ray.get([a.detach.remote(pool) for a in prefill])
    remove_pool(pool)
