"""Start a cluster: Ray (local and bound to 127.0.0.1, or an existing one), the decode and
prefill pools as Ray actors in placement groups, then the router's gRPC server. No torch here:
the engines are imported inside the actors."""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.config import ClusterConfig, PoolConfig
from replica.ranks import loopback_ray

PLACEMENT_TIMEOUT_S = 60.0
# where Prometheus finds each running cluster's /metrics (deploy/prometheus/prometheus.yml reads it);
# not /tmp/pdserve/...: a directory named like the package would shadow it for scripts run from /tmp
PROMETHEUS_SD_DIR = Path(os.environ.get("PDSERVE_PROMETHEUS_SD_DIR", "/tmp/pdserve-prometheus"))


@dataclass
class Cluster:
    """A running cluster. `address` is what clients dial; `stop()` tears it all down."""
    config: ClusterConfig
    server: Any  # router.server.RouterServer
    pools: Pools  # the replicas' actors and placement groups, as they change
    owns_ray: bool = False
    sd_file: Path | None = None
    supervisor: Any = None  # pdserve.supervisor.Supervisor (ipc backend): replaces dead replicas, scales pools
    restore_cpus: tuple[int, ...] | None = None  # with service_cpus: this process's cores before, given back at stop

    @property
    def prefill(self) -> list[Any]:
        """Each prefill replica's rank-0 actor handle."""
        return self.pools.actors["prefill"]

    @property
    def decode(self) -> list[Any]:
        return self.pools.actors["decode"]

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def http_address(self) -> str | None:
        """Where the OpenAI-compatible API answers (its base URL is http://ADDRESS/v1); None when off."""
        from router.server import host_port

        return host_port(self.server.host, self.server.http_port) if self.server.http_port else None

    @property
    def openai_base_url(self) -> str | None:
        """The OpenAI-compatible API's base URL (https with router.tls_cert); None when off."""
        scheme = "https" if self.config.router.tls else "http"
        return f"{scheme}://{self.http_address}/v1" if self.http_address else None

    @property
    def router(self):
        return self.server.router

    def scale(self, pool: str, replicas: int, drain_timeout_s: float | None = None) -> tuple[int, int, int]:
        """Resize a pool while serving (as the Scale RPC): (replicas now, started, drained)."""
        if self.supervisor is None:
            raise RuntimeError("this cluster cannot scale: it has no supervisor")
        if pool not in ("prefill", "decode") or replicas < (pool == "decode"):
            raise ValueError(f"scale {pool!r} to {replicas}: 'prefill' (>= 0 replicas) or 'decode' (>= 1)")
        timeout = self.config.router.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        return self.supervisor.scale(pool, replicas, timeout)

    def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking requests (health NOT_SERVING, new ones UNAVAILABLE) and wait up to timeout_s
        (router.drain_timeout_s) for those admitted to finish; returns how many had not."""
        import asyncio

        timeout = self.config.router.drain_timeout_s if timeout_s is None else timeout_s
        return asyncio.run_coroutine_threadsafe(self.router.drain_all(timeout), self.server.loop).result(
            timeout=timeout + 30)

    def stop(self) -> None:
        """Router first (no new work), then the actors, their placement groups and KV pool files."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.sd_file is not None:
            self.sd_file.unlink(missing_ok=True)
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.server is not None:
            self.server.stop()
        actors = [*self.prefill, *self.decode]
        for actor in actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception:
                pass  # already dead: killing it below is all that is left
            ray.kill(actor)
        for pg in [*self.pools.groups["prefill"], *self.pools.groups["decode"]]:
            remove_placement_group(pg)
        for path in Path("/dev/shm").glob(f"pdserve-kv-{self.pools.prefix}*"):  # what dead decode replicas left
            path.unlink(missing_ok=True)
        if self.owns_ray:
            ray.shutdown()
        if self.restore_cpus is not None:
            from replica.affinity import pin_process

            pin_process(self.restore_cpus, "the cores before service_cpus")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ray_settings(config: ClusterConfig) -> None:
    """Settings Ray reads when it is imported, so: before anything imports it."""
    if config.ray_address:
        # Ray turns token auth on for the clusters it starts; a client joining one needs it on too
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN")
                                                  or (Path.home() / ".ray" / "auth_token").exists()):
            os.environ["RAY_AUTH_MODE"] = "token"
        if config.ray_address.startswith("127."):  # a cluster on this machine's loopback: keep it there
            loopback_ray()


def init_ray(config: ClusterConfig, num_cpus: float | None = None) -> bool:
    """Connect to Ray; returns True when this call started a local Ray (then stop() shuts it down)."""
    _ray_settings(config)
    import ray

    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, namespace=config.name, log_to_driver=True)
        return False
    need = sum(p.replicas * p.tensor_parallel_size * p.num_cpus for p in (config.prefill, config.decode))
    loopback_ray()
    ray.init(num_cpus=max(num_cpus or os.cpu_count() or 1, need), include_dashboard=False,
             namespace=config.name, _node_ip_address="127.0.0.1")
    return True


def _profile_into(config: ClusterConfig, path: str) -> None:
    from planner.profile import profile_config

    with open(path, "w") as f:
        f.write(profile_config(config, reps=3, quick=True, log=lambda msg: None).to_json())


def _profile_key(config: ClusterConfig) -> str:
    """What a measured profile depends on: the model, the pools' engine options, this host (its CPU and cores),
    torch's version and the engine's code."""
    import hashlib
    import importlib.metadata
    import json

    from planner.profile import host_facts  # torch-free

    host = {k: v for k, v in host_facts().items() if k != "measured"}
    pools = [getattr(config, role).engine_kwargs() for role in ("prefill", "decode") if getattr(config, role).replicas]
    facts = {"model": config.model, "pools": pools, "host": host, "torch": importlib.metadata.version("torch")}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    engine = Path(__file__).resolve().parents[1] / "engine"
    for source in sorted(p for p in engine.rglob("*") if p.suffix in (".py", ".c", ".h")):
        digest.update(source.relative_to(engine).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def measure_profile(config: ClusterConfig) -> tuple[Path, bool]:
    """router.profile "measure": a quick `pdserve profile` of the config's pool configurations (no service costs),
    in a process of its own (this one, the router's, never imports torch). Kept in $XDG_CACHE_HOME/pdserve/profiles
    (~/.cache) under what it depends on (_profile_key), so a restart of the same pools on the same host and code
    reuses it. Returns (the JSON's path, whether it was reused)."""
    import multiprocessing as mp

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdserve" / "profiles"
    path = cache / f"{_profile_key(config)}.json"
    if path.exists():
        return path, True
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    child = mp.get_context("spawn").Process(target=_profile_into, args=(config, str(tmp)))  # it starts its own
    child.start()
    child.join()
    if child.exitcode != 0 or not tmp.exists():
        raise RuntimeError(f"router.profile='measure': profiling the pools failed (exit code {child.exitcode})")
    tmp.rename(path)  # whole, or not there
    return path, False


def start_cluster(config: ClusterConfig, progress: Callable[[str], None] | None = print) -> Cluster:
    _ray_settings(config)
    import ray

    from decode_worker import DecodeWorker
    from prefill_worker import PrefillWorker
    from router.placement import Replica
    from router.router import Router
    from router.server import RouterServer, host_port
    from router.tokenizer import Tokenizer
    from router.validate import Limits, kv_tokens

    r = config.router
    r.keys()  # a key file or TLS file that is missing fails here, before any actor starts
    for path in (r.tls_cert, r.tls_key) if r.tls else ():
        Path(path).read_bytes()
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if progress is not None:
            progress(f"[{time.monotonic() - t0:5.1f}s] {msg}")

    if r.profile == "measure":  # a short profile of the pools' configurations, while the cores are free
        path, reused = measure_profile(config)
        say(f"{'reusing the' if reused else 'measured a'} profile of the pools: {path}")
        config = config.replace(**{"router.profile": str(path)})
        r = config.router
    slo_aware = autoscaler = tuner = None  # a profile that is missing or lacks a pool fails here too
    if r.profile and (r.policy == "slo_aware" or r.autoscale.enabled):
        from planner.cost import Profile

        profile = Profile.load(r.profile)
    if r.policy == "slo_aware":
        from router.dispatch import SloAware

        slo_aware = SloAware.from_profile(profile, config.prefill, config.decode, r.ttft_slo_s, r.tpot_slo_s)
        if r.dispatch_retune_s > 0 and config.prefill.replicas:
            from planner.simulate import Tuner

            tuner = Tuner(config, profile)
    if r.autoscale.enabled:
        from planner.autoscale import Autoscaler

        autoscaler = Autoscaler(config, profile if r.profile else None)
    restore_cpus = None
    if config.service_cpus is not None:  # before a local Ray starts: its daemons and workers inherit the mask
        from replica.affinity import parse_cpus, pin_process

        restore_cpus = tuple(os.sched_getaffinity(0))
        pin_process(parse_cpus(config.service_cpus, "service_cpus"), "service_cpus")
    try:
        owns_ray = init_ray(config)
    except BaseException:
        if restore_cpus is not None:
            pin_process(restore_cpus, "the cores before service_cpus")
        raise
    # one host: a local Ray (no ray_address to join) of one node; a joined cluster may place pools on any node
    one_host = not config.ray_address and sum(1 for node in ray.nodes() if node["Alive"]) == 1
    config = dataclasses.replace(config, kv_backend=config.kv_backend_on(one_host))
    say(f"Ray {'started on 127.0.0.1' if owns_ray else 'connected'}: "
        f"{ray.cluster_resources().get('CPU', 0):g} CPUs; KV over {config.kv_backend}")
    tag = uuid.uuid4().hex[:8]
    _remove_orphan_pools()
    _remove_stale_targets()
    if owns_ray:
        _stop_orphan_ray_agents()
    pools = Pools(config, f"{config.name}-{tag}-", {"prefill": PrefillWorker, "decode": DecodeWorker})
    cluster = Cluster(config, None, pools, owns_ray, restore_cpus=restore_cpus)
    try:
        for role in ("decode", "prefill"):
            for i in range(getattr(config, role).replicas):
                pools.start(role, i)
        prefill, decode = cluster.prefill, cluster.decode
        say(f"loading {config.model!r}: {len(prefill)} prefill and {len(decode)} decode replica(s)")
        infos = ray.get([a.info.remote() for a in (*decode, *prefill)])
        for a in (*decode, *prefill):  # one at a time, with nothing else running: MFU/MBU's denominators
            ray.get(a.measure_peaks.remote())
        p_info = infos[len(decode):]
        pools.kv_uids.update((i, info["kv_uid"]) for i, info in enumerate(p_info))
        say("pools up (" + "; ".join(f"{role}: {info[0]['kernels']}" for role, info in
                                     (("prefill", p_info), ("decode", infos)) if info) + ")")
        say("connecting the prefill pool to the decode pool's KV")
        d_info = pools.link(prefill, decode)
        tok = ray.get((prefill or decode)[0].tokenizer_files.remote())
        name = "default" if config.model in (None, "default") else Path(config.model).name
        limits = Limits(vocab_size=d_info[0]["vocab_size"], max_model_len=d_info[0]["max_model_len"],
                        max_request_bytes=config.router.max_request_bytes, max_logprobs=config.router.max_logprobs,
                        max_stop_strings=config.router.max_stop_strings, model_names=(name,),
                        decode_kv_tokens=kv_tokens(d_info[0]),
                        prefill_kv_tokens=kv_tokens(p_info[0]) if p_info else None,
                        eos_token_ids=tuple(d_info[0]["eos_token_ids"]))

        def make_router() -> Router:
            return Router(
                [Replica("prefill", i, a, config.prefill.tensor_parallel_size, block_size=info["block_size"])
                 for i, (a, info) in enumerate(zip(prefill, p_info))],
                [Replica("decode", i, a, config.decode.tensor_parallel_size, free_blocks=info["num_kv_blocks"],
                         block_size=info["block_size"]) for i, (a, info) in enumerate(zip(decode, d_info))],
                Tokenizer(tok) if tok else None, limits, config.router, config.kv_backend, name, slo_aware)

        cluster.server = RouterServer(make_router, r.host, r.port, r.max_request_bytes, r.metrics_port,
                                      r.http_port, (r.tls_cert, r.tls_key) if r.tls else None).start()
    except BaseException:
        cluster.stop()
        raise
    metrics = ""
    if cluster.server.metrics_port:
        cluster.sd_file = _publish_metrics_target(config, tag, r.host, cluster.server.metrics_port)
        metrics = f"; metrics on http://{host_port(r.host, cluster.server.metrics_port)}/metrics"
    from pdserve.supervisor import Supervisor

    cluster.supervisor = Supervisor(cluster.server, pools, replace_dead=config.replace_dead_replicas).start()
    cluster.server.router.scaler = cluster.supervisor.scale
    if autoscaler is not None:
        a = r.autoscale
        cluster.supervisor.autoscale(autoscaler)
        say(f"autoscaling prefill {list(a.prefill)}, decode {list(a.decode)} replicas every {a.every_s:g} s "
            f"({'the planner' if autoscaler.profile else 'load'} decides)")
    if tuner is not None:
        cluster.supervisor.tune_dispatch(tuner)
        say(f"slo_aware dispatch: its rule tuned to the traffic every {r.dispatch_retune_s:g} s")
    say(f"serving {name!r} on {cluster.address}{' (TLS)' if r.tls else ''}{metrics}")
    if cluster.openai_base_url:
        say(f"OpenAI-compatible API on {cluster.openai_base_url}")
    return cluster


def _publish_metrics_target(config: ClusterConfig, tag: str, host: str, port: int) -> Path:
    """A Prometheus file_sd entry for this cluster's /metrics."""
    import json

    import ray

    from router.server import host_port

    if host in ("0.0.0.0", "::"):  # reachable on the node's own address
        host = ray.util.get_node_ip_address()
    PROMETHEUS_SD_DIR.mkdir(parents=True, exist_ok=True)
    path = PROMETHEUS_SD_DIR / f"{config.name}-{tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [host_port(host, port)], "labels": {"cluster": config.name}}]))
    tmp.rename(path)  # Prometheus never reads half a file
    return path


class Pools:
    """Each pool's rank-0 actors and placement groups (a bundle per TP rank), and how a replica is
    started: at start-up, in place of a dead one (in its predecessor's placement group), or to grow
    a pool. A decode replica's KV pool gets a fresh name each start."""

    def __init__(self, config: ClusterConfig, prefix: str, classes: dict[str, type]) -> None:
        self.config, self.prefix, self.classes = config, prefix, classes
        self.actors: dict[str, list[Any]] = {"prefill": [], "decode": []}
        self.groups: dict[str, list[Any]] = {"prefill": [], "decode": []}
        self.pool_names: list[str] = []  # each decode replica's KV pool name, by index
        self.kv_uids: dict[int, int] = {}  # each prefill replica's id in its pair groups (its info's kv_uid), by index
        self._starts = itertools.count()

    def place(self, role: str, timeout_s: float | None = None):
        """A placement group for a new replica of `role`, placed (waiting up to timeout_s, by default
        PLACEMENT_TIMEOUT_S)."""
        return _placement_group(self.classes[role], getattr(self.config, role), timeout_s or PLACEMENT_TIMEOUT_S)

    @staticmethod
    def unplace(group) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)

    def start(self, role: str, index: int, group=None):
        """Start replica `index` of `role` (a new one when index is the pool's size, in `group` if given, a
        placement group from place()) and return its rank-0 actor; it is built once its info() answers."""
        c, pool = self.config, getattr(self.config, role)
        if index == len(self.groups[role]):
            self.groups[role].append(group or self.place(role))
            self.actors[role].append(None)
            if role == "decode":
                self.pool_names.append("")
        if role == "decode":
            self.pool_names[index] = f"{self.prefix}decode{next(self._starts)}"
            args = (c.model, pool.engine_kwargs(), self.pool_names[index], c.kv_lease_s, pool.peaks(), c.kv_backend)
        else:
            args = (c.model, pool.engine_kwargs(), pool.peaks(), c.kv_backend)
        self.actors[role][index] = _actor(self.classes[role], pool, self.groups[role][index], *args,
                                          **self.cpus(role, index))
        return self.actors[role][index]

    def cpus(self, role: str, index: int) -> dict[str, tuple[int, ...]]:
        """Replica `index` of `role`'s cores, where the config names them: its engine's (its run of the pool's
        cpus) and its other threads' (service_cpus), as the worker's keywords."""
        from replica.affinity import parse_cpus, replica_cpus

        pool, out = getattr(self.config, role), {}
        if pool.cpus is not None:
            out["cpus"] = replica_cpus(parse_cpus(pool.cpus, f"{role}.cpus"), index, pool.num_threads or 1)
        if self.config.service_cpus is not None:
            out["service_cpus"] = parse_cpus(self.config.service_cpus, "service_cpus")
        return out

    def link(self, prefill: list[Any], decode: list[Any]) -> list[dict[str, Any]]:
        """Connect these prefill replicas to these decode replicas' KV (kv_transfer.wiring.link: all of
        them at start-up, a newcomer and the live replicas of the other pool later); returns the
        decode replicas' info()."""
        from kv_transfer.wiring import link

        c = self.config
        return link(prefill, decode, c.kv_backend, c.prefill.tensor_parallel_size, c.decode.tensor_parallel_size,
                    f"{self.prefix}kv")

    def abandon(self, role: str, index: int, new: bool) -> None:
        """Replica `index` failed to start: kill its actor; a new one (the pool's last) also gives up its
        placement group, a replacement keeps its predecessor's for the next try."""
        if new:
            self.remove_last(role)
        else:
            _kill(self.actors[role][index])

    def swap(self, role: str, i: int, j: int, *by_index: dict) -> None:
        """Replicas i and j of `role` trade indexes (with their actors, placement groups and KV names, and what
        the dicts by_index, the caller's, hold for each)."""
        for entries in (self.actors[role], self.groups[role], *([self.pool_names] if role == "decode" else [])):
            entries[i], entries[j] = entries[j], entries[i]
        for entries in (*([self.kv_uids] if role == "prefill" else []), *by_index):
            at_i, at_j = entries.pop(i, None), entries.pop(j, None)
            entries.update({k: v for k, v in ((j, at_i), (i, at_j)) if v is not None})

    def remove_last(self, role: str) -> None:
        """The pool's last replica has drained and stopped (or failed to start): drop its actor and placement
        group."""
        _kill(self.actors[role].pop())
        self.unplace(self.groups[role].pop())
        if role == "decode":
            self.pool_names.pop()


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - gone already
        pass


def _remove_orphan_pools(min_age_s: float = 60.0) -> None:
    """KV pools in shared memory that no process maps any more: left by a cluster that was killed
    (SIGKILL skips every clean-up). Younger files may belong to a cluster starting right now."""
    from glob import glob

    pools = {p for p in glob("/dev/shm/pdserve-kv-*") if time.time() - os.path.getmtime(p) > min_age_s}
    if not pools:
        return
    for maps in glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                pools -= {line.split(None, 5)[-1].strip() for line in f if "/dev/shm/pdserve-kv-" in line}
        except OSError:
            continue  # gone, or not ours to read
    for path in pools:
        Path(path).unlink(missing_ok=True)


def _remove_stale_targets() -> None:
    """Prometheus discovery files whose /metrics no longer answers: left by a cluster that was killed
    (a running one publishes its file only once its /metrics listens)."""
    import json
    import socket

    for path in PROMETHEUS_SD_DIR.glob("*.json"):
        try:
            targets = [t for entry in json.loads(path.read_text()) for t in entry["targets"]]
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not a file of ours, or being written
        alive = False
        for target in targets:
            host, _, port = target.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=0.5).close()
                alive = True
            except (OSError, ValueError):
                pass
        if targets and not alive:
            path.unlink(missing_ok=True)


def _stop_orphan_ray_agents() -> None:
    """Ray's dashboard and runtime-env agents (this user's) whose raylet is gone: a `pdserve serve`
    that was SIGKILLed leaves them running, reparented away from their raylet."""
    import signal
    from glob import glob

    def read(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    for proc in glob("/proc/[0-9]*"):
        name = read(f"{proc}/cmdline").split("\0", 1)[0]
        if not (name.startswith("ray::") and name.endswith("Agent")):
            continue
        try:
            if os.stat(proc).st_uid != os.getuid():
                continue
        except OSError:
            continue
        stat = read(f"{proc}/stat")
        ppid = stat.rsplit(")", 1)[-1].split()[1] if ")" in stat else ""
        if ppid and read(f"/proc/{ppid}/comm").strip() != "raylet":
            try:
                os.kill(int(proc.rsplit("/", 1)[1]), signal.SIGKILL)  # their SIGTERM handler waits on the raylet
            except OSError:
                pass


def _placement_group(cls, pool: PoolConfig, timeout_s: float = PLACEMENT_TIMEOUT_S):
    """One replica's placement group: a bundle per TP rank. A replica that replaces a dead one
    reuses its predecessor's. While it waits, its pending bundles are what Ray's autoscaler adds
    nodes for; one not placed within timeout_s is removed (so no node comes up for it later)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
    pg = placement_group([bundle] * pool.tensor_parallel_size, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"the Ray cluster cannot place a {cls.__name__} replica within {timeout_s:g} s: "
            f"{pool.tensor_parallel_size} x {bundle} needed, {ray.available_resources()} available; lower "
            "replicas, tensor_parallel_size or num_cpus (or let Ray's autoscaler add a node: README, Autoscaling)")
    return pg


def _actor(cls, pool: PoolConfig, pg, *args, **kwargs):
    """A replica's rank-0 actor, in its placement group's first bundle."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(cls).options(
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=pool.resources or None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
    ).remote(*args, **kwargs)
