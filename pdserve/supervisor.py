"""Supervision and resizing of the pools, on a thread of the process that started the cluster (it
uses Ray's blocking API and never blocks the router's loop).

- A replica whose actor died (or whose engine loop did, e.g. a tensor-parallel rank was lost) is
  replaced by a new one with the same config in the same placement group, wired into the KV
  transport, and handed back to the router, which puts it into placement again. Until then the
  router routes around it. A replica is replaced only once it is known dead: the router marks it
  unhealthy when a call or a stats poll fails, and the supervisor then asks it for its stats; an
  actor error or a dead engine means dead, no answer within `ping_timeout_s` means busy.
- scale(pool, n) grows a pool (new replicas, wired in) or shrinks it: its last replica drains (no
  new placements; the requests on it get drain_timeout_s to finish, the rest move elsewhere once
  it stops), then it stops and its placement group goes.

- autoscale(autoscaler) runs planner/autoscale.py's decisions every router.autoscale.every_s on a thread of
  its own, over what the router observed, and resizes the pools with scale() as they say.
- tune_dispatch(tuner) picks slo_aware's rule (planner.simulate.Tuner) every router.dispatch_retune_s from the
  traffic the router observed, and hands it to the router's dispatch.
The planner's simulations for both run in one process of their own (spawned: this one runs Ray's threads),
not on the GIL the router's loop needs.

Both KV backends: on `collective` a newcomer forms a pair group with each live replica of the other
pool (kv_transfer.wiring.link)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any

log = logging.getLogger("pdserve.supervisor")
START_TIMEOUT_S = 900.0  # a new replica's model load and peak probe; past it the start failed (tried again later)


class Supervisor:
    def __init__(self, server, pools, replace_dead: bool = True, every_s: float = 0.5,
                 ping_timeout_s: float = 5.0) -> None:
        self.server = server  # router.server.RouterServer: its router and event loop
        self.pools = pools  # pdserve.launch.Pools: starts replicas, holds their actors and placement groups
        self.replace_dead = replace_dead
        self.every_s, self.ping_timeout_s = every_s, ping_timeout_s
        self.failures: list[tuple[str, str]] = []  # (replica, why) of replacements that failed
        self._lock = threading.Lock()  # one change to the pools at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-supervisor", daemon=True)
        self.autoscaler = None  # planner.autoscale.Autoscaler, once autoscale() started it
        self.tuner = None  # planner.simulate.Tuner, once tune_dispatch() started it
        self._loops: list[threading.Thread] = []  # autoscaling, dispatch tuning
        self._executor = None  # the planner's process, once one of them needs it
        self.decisions: deque = deque(maxlen=1000)  # (time.monotonic(), observed rate, Decision) of each round
        self.rules: deque = deque(maxlen=1000)  # (time.monotonic(), observed rate, Rule) each time the rule changed
        # decode replica index -> the KV pool names it had that no live actor owns (its dead one, and those of
        # replacements that failed to start): the prefill replicas drop them once a replacement is up
        self._dead_pools: dict[int, set[str]] = {}

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for loop in self._loops:
            loop.join(timeout=60)
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

    def autoscale(self, autoscaler) -> Supervisor:
        """Resize the pools as `autoscaler` (planner.autoscale.Autoscaler) decides, until stop()."""
        if autoscaler.profile is not None and autoscaler.answers.executor is None:
            autoscaler.answers.executor = self._planner()
        self.autoscaler = autoscaler
        return self._loop(self._autoscale, "pdserve-autoscaler")

    def tune_dispatch(self, tuner) -> Supervisor:
        """Keep the router's slo_aware dispatch on the rule `tuner` (planner.simulate.Tuner) picks, until stop()."""
        if tuner.answers.executor is None:
            tuner.answers.executor = self._planner()
        self.tuner = tuner
        return self._loop(self._tune, "pdserve-dispatch-tuner")

    def _planner(self):
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
        return self._executor

    def _loop(self, target, name: str) -> Supervisor:
        loop = threading.Thread(target=target, name=name, daemon=True)
        self._loops.append(loop)
        loop.start()
        return self

    def _tune(self) -> None:
        router = self.server.router
        cfg = router.config
        while not self._stop.wait(cfg.dispatch_retune_s):
            try:
                window = self._on_loop(router.observed(cfg.dispatch_window_s))[0]
                rule = self.tuner.pick(window.rate, window.mix)
            except Exception as e:  # noqa: BLE001 - the loop goes on; the next round picks again
                log.warning("dispatch tuning: picking failed: %r", e)
                continue
            if rule is not None and rule != router.slo_aware.rule:
                log.warning("slo_aware dispatch: %s (%.2f req/s arriving, %d requests' lengths seen)", rule,
                            window.rate, len(window.mix))
                router.slo_aware = replace(router.slo_aware, rule=rule)  # one reference swapped: the loop reads it
                router.metrics.dispatch_rule(rule)
                self.rules.append((time.monotonic(), window.rate, rule))

    def _autoscale(self) -> None:
        from planner.autoscale import Observation
        from router.dispatch import Rule

        router, cfg = self.server.router, self.autoscaler.cfg
        while not self._stop.wait(cfg.every_s):
            try:
                window, ongoing, current = self._on_loop(router.observed(cfg.window_s))
                rule = router.slo_aware.rule if router.slo_aware is not None else Rule()
                decision = self.autoscaler.decide(time.monotonic(), Observation(window.rate, window.mix, ongoing,
                                                                                rule), current)
            except Exception as e:  # noqa: BLE001 - the loop goes on; the next round decides again
                log.warning("autoscaling: deciding failed: %r", e)
                continue
            self.decisions.append((time.monotonic(), window.rate, decision))
            router.metrics.autoscaled(window.rate, decision.wanted)
            for pool, n in decision.resize.items():
                log.warning("autoscaling %s from %d to %d replicas (%.2f req/s arriving, %s ongoing)", pool,
                            current[pool], n, window.rate, ongoing)
                try:
                    self.scale(pool, n, router.config.drain_timeout_s, cfg.placement_timeout_s)
                except Exception as e:  # noqa: BLE001 - e.g. Ray cannot place another replica yet
                    log.warning("autoscaling %s to %d failed: %r", pool, n, e)
                    self.failures.append((f"{pool} pool", repr(e)))

    def scale(self, role: str, n: int, drain_timeout_s: float, placement_timeout_s: float | None = None
              ) -> tuple[int, int, int]:
        """Resize pool `role` to n replicas; returns (replicas now, started, drained). New replicas' placement
        groups wait up to placement_timeout_s (default pdserve.launch.PLACEMENT_TIMEOUT_S) for Ray to place them
        (for Ray's autoscaler to add a node, on a Ray cluster), without holding up the replacement of dead ones."""
        replicas = getattr(self.server.router.placement, role)
        groups: list = []
        try:
            for _ in range(n - len(replicas)):
                groups.append(self.pools.place(role, placement_timeout_s))
            with self._lock:
                added, removed = self._resize(role, n, groups, drain_timeout_s)
        finally:  # all or none when placing; then those placed for replicas another resize made meanwhile,
            for group in groups:  # or for a start that failed
                self.pools.unplace(group)
        return len(replicas), added, removed

    def _resize(self, role: str, n: int, groups: list, drain_timeout_s: float) -> tuple[int, int]:
        import ray

        from kv_transfer.wiring import drop_decode, drop_prefill
        from router.validate import kv_tokens

        router = self.server.router
        replicas = getattr(router.placement, role)
        added = removed = 0
        while len(replicas) < n:
            actor, info = self._bring_up(role, len(replicas), groups.pop() if groups else None)
            self._on_loop(router.add_replica(role, actor, getattr(self.pools.config, role).tensor_parallel_size,
                                             info["num_kv_blocks"], kv_tokens(info), info["block_size"]))
            added += 1
            log.warning("%s/%d joined the pool", role, len(replicas) - 1)
        while len(replicas) > n:
            replica = self._leaving(role)
            left = self._on_loop(router.drain(replica, drain_timeout_s), timeout=drain_timeout_s + 30)
            if role == "decode":  # its pool (and those of its failed restarts): prompts bound there move elsewhere
                for pool in {self.pools.pool_names[replica.index], *self._dead_pools.pop(replica.index, ())}:
                    drop_decode([r.actor for r in router.placement.prefill if r.healthy], pool)
            else:  # its pair groups with the decode replicas
                drop_prefill([r.actor for r in router.placement.decode if r.healthy],
                             self.pools.kv_uids.pop(replica.index, None), "it left the pool")
            try:
                ray.get(replica.actor.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - dead already: removing it is all that is left
                pass
            self.pools.remove_last(role)
            self._on_loop(router.remove_replica(replica))
            removed += 1
            log.warning("%s left the pool (drained; %d requests moved elsewhere)", replica.name, left)
        return added, removed

    def _leaving(self, role: str):
        """The replica a shrinking pool gives up: one that cannot take requests (down, or dead and not yet
        replaced) before a healthy one, else the last. The pools and the router keep replicas by index and
        remove the last, so a leaving replica that is not the last first trades places with it (the last
        one takes its index and its name)."""
        router = self.server.router
        replicas = getattr(router.placement, role)
        last = len(replicas) - 1
        i = next((i for i, r in enumerate(replicas) if not r.serves), last)
        if i != last:
            self.pools.swap(role, i, last, *([self._dead_pools] if role == "decode" else []))
            self._on_loop(router.swap_replicas(role, i, last))
        return replicas[last]

    def _run(self) -> None:
        placement = self.server.router.placement
        while not self._stop.wait(self.every_s):
            if not self.replace_dead:
                continue
            for replica in list(placement.replicas):
                if self._stop.is_set():
                    return
                if not replica.healthy and not replica.draining and self._dead(replica):
                    with self._lock:
                        if replica not in getattr(placement, replica.role):
                            continue  # scaled away meanwhile
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

        from kv_transfer.wiring import drop_prefill

        t0 = time.monotonic()
        log.warning("%s is dead; starting a new one", replica.name)
        ray.kill(replica.actor)  # a live actor whose engine died: its ranks go with it
        if replica.role == "prefill":  # its pair groups with the decode replicas (collective backend)
            drop_prefill([r.actor for r in self.server.router.placement.decode if r.healthy],
                         self.pools.kv_uids.pop(replica.index, None), "it died")
        actor, info = self._bring_up(replica.role, replica.index)
        self._on_loop(self.server.router.replaced(replica, actor, info["num_kv_blocks"]))
        log.warning("%s is back after %.1f s (restart %d)", replica.name, time.monotonic() - t0, replica.restarts)

    def _bring_up(self, role: str, index: int, group=None) -> tuple[Any, dict[str, Any]]:
        """Start replica `index` of `role` (in place of a dead one, or a new one at the pool's end, in `group`)
        and wire it into the KV transport. A start that fails leaves nothing behind: the new actor is killed,
        and a new replica's placement group goes with it (a replacement keeps its predecessor's, to try again)."""
        import ray

        new = index == len(self.pools.groups[role])
        if role == "decode" and not new:  # the pool name of the dead replica, or of the last start that failed
            self._dead_pools.setdefault(index, set()).add(self.pools.pool_names[index])
        try:
            actor = self.pools.start(role, index, group)
            info = ray.get(actor.info.remote(), timeout=START_TIMEOUT_S)
            if role == "prefill":
                self.pools.kv_uids[index] = info["kv_uid"]
            ray.get(actor.measure_peaks.remote(), timeout=START_TIMEOUT_S)  # while the others serve: may read low
            self._wire(role, actor, self._dead_pools.get(index, set()) if role == "decode" else set())
        except BaseException:  # its pool may be attached here and there: the next try drops it with the rest
            self.pools.abandon(role, index, new)
            raise
        if role == "decode":
            self._dead_pools.pop(index, None)
        return actor, info

    def _wire(self, role: str, actor, dead_pools: set[str]) -> None:
        """A new decode replica is connected to every live prefill replica (which first drop the pools of
        its dead predecessors); a new prefill replica to every live decode replica."""
        from kv_transfer.wiring import drop_decode

        placement = self.server.router.placement
        prefill = [r.actor for r in placement.prefill if r.healthy]
        if role == "decode":
            for pool in dead_pools:
                drop_decode(prefill, pool)
            self.pools.link(prefill, [actor])
        else:
            self.pools.link([actor], [r.actor for r in placement.decode if r.healthy])

    def _on_loop(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(timeout=timeout)
