"""Supervision: a replica whose actor died (or whose engine loop did, e.g. a tensor-parallel rank
was lost) is replaced by a new one with the same config in the same placement group, wired into
the KV transport, and handed back to the router, which puts it into placement again. Until then
the router routes around it. Runs on its own thread of the process that started the cluster: it
uses Ray's blocking API and never blocks the router's loop.

A replica is replaced only once it is known dead: the router marks it unhealthy when a call or a
stats poll fails, and the supervisor then asks it for its stats; an actor error or a dead engine
means dead, no answer within `ping_timeout_s` means busy (left alone)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pdserve.supervisor")


class Supervisor:
    """respawn[role](index) builds a replica's new rank-0 actor and returns (actor, info) once it is
    built; on_replaced(role, index, actor) is told of each replacement (the Cluster's actor lists)."""

    def __init__(self, server, respawn: dict[str, Callable[[int], tuple[Any, dict[str, Any]]]],
                 pool_names: list[str], on_replaced: Callable[[str, int, Any], None],
                 every_s: float = 0.5, ping_timeout_s: float = 5.0) -> None:
        self.server = server  # router.server.RouterServer: its router and event loop
        self.respawn = respawn
        self.pool_names = pool_names  # each decode replica's current KV pool name, by index
        self.on_replaced = on_replaced
        self.every_s, self.ping_timeout_s = every_s, ping_timeout_s
        self.failures: list[tuple[str, str]] = []  # (replica, why) of replacements that failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        placement = self.server.router.placement
        while not self._stop.wait(self.every_s):
            for replica in list(placement.replicas):
                if self._stop.is_set():
                    return
                if not replica.healthy and self._dead(replica):
                    try:
                        self._replace(replica)
                    except Exception as e:  # noqa: BLE001 - tried again on the next round
                        log.warning("replacing %s failed: %r", replica.name, e)
                        self.failures.append((replica.name, repr(e)))

    def _dead(self, replica) -> bool:
        import ray

        try:
            ray.get(replica.actor.stats.remote(), timeout=self.ping_timeout_s)
            return False
        except ray.exceptions.GetTimeoutError:
            return False  # busy, not dead
        except Exception:  # noqa: BLE001 - the actor died (RayActorError) or its engine did (ReplicaDead)
            return True

    def _replace(self, replica) -> None:
        import ray

        from kv_transfer.wiring import rewire_decode, wire_prefill

        router = self.server.router
        t0 = time.monotonic()
        log.warning("%s is dead; starting a new one", replica.name)
        ray.kill(replica.actor)  # a live actor whose engine died: its ranks go with it
        actor, info = self.respawn[replica.role](replica.index)
        live = [r.actor for r in (router.placement.prefill if replica.role == "decode" else router.placement.decode)
                if r.healthy]
        if replica.role == "decode":
            rewire_decode(live, info, self.pool_names[replica.index])
            self.pool_names[replica.index] = info["pool"]
        else:
            wire_prefill(actor, live)
        asyncio.run_coroutine_threadsafe(router.replaced(replica, actor, info["num_kv_blocks"]),
                                         self.server.loop).result(timeout=30)
        self.on_replaced(replica.role, replica.index, actor)
        log.warning("%s is back after %.1f s (restart %d)", replica.name, time.monotonic() - t0, replica.restarts)
