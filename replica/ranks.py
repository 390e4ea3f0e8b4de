"""Ranks 1..n-1 of a tensor-parallel replica, as Ray actors. Each joins the replica's
torch.distributed group, loads only its own slice of the weights, allocates its own slice of
the KV cache, and then runs whatever steps rank 0 plans (ModelRunner.follow) on a thread.
Rank 0 is the process that owns the engine: an offline `LLM`, or a pool's worker actor."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any

FOLLOWER_TIMEOUT_S = 3600.0  # a follower waits this long for rank 0's next step; a dead peer fails at once


class RankWorker:
    """role (optional): what the replica's KV connector needs on every rank
    (kv_transfer.ranks.PrefillRole / DecodeRole): kv_allocator(rank) and
    kv_saver(num_kv_heads, rank, world_size), either may return None, and endpoint(runner), the
    rank's KV operations that rank 0 calls through `kv`."""

    def __init__(self, config, rank: int, world_size: int, init_method: str, device: str = "cpu",
                 num_threads: int = 1, role: Any = None) -> None:
        self.rank = rank
        self.error: str | None = None
        built: Future = Future()
        # built and run on one thread: one OpenMP team (engine.loop.EngineLoop says why)
        self._thread = threading.Thread(target=self._follow, name=f"rank{rank}", daemon=True, args=(
            built, config, world_size, init_method, device, num_threads, role))
        self._thread.start()
        built.result()

    def _build(self, config, world_size: int, init_method: str, device: str, num_threads: int, role: Any) -> None:
        import torch

        from engine.distributed import init_tp_group
        from engine.loader import open_model
        from engine.model_runner import ModelRunner

        torch.set_num_threads(num_threads)
        rank = self.rank
        init_tp_group(rank, world_size, init_method, device, timeout_s=FOLLOWER_TIMEOUT_S)
        allocator = role.kv_allocator(rank) if role is not None else None
        self.runner = ModelRunner(config, open_model(config.model, load_tokenizer=False).weights, device, allocator)
        if role is not None and (saver := role.kv_saver(config.model_config.num_key_value_heads, rank,
                                                        world_size)) is not None:
            self.runner.set_kv_saver(saver)
        self.endpoint = role.endpoint(self.runner) if role is not None else None

    def _follow(self, built: Future, *build_args: Any) -> None:
        try:
            self._build(*build_args)
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(None)
        try:
            self.runner.follow()
        except BaseException as e:  # rank 0 died or the group broke: nothing more to run
            self.error = repr(e)
        finally:
            from engine.distributed import destroy_tp_group

            destroy_tp_group()

    def status(self) -> dict[str, Any]:
        return dict(rank=self.rank, pid=os.getpid(), running=self._thread.is_alive(), error=self.error)

    def kv(self, op: str, *args: Any) -> Any:
        """Run one of this rank's KV operations (kv_transfer.ranks.RankKV: attach, detach, join_group,
        wait, forget) for rank 0."""
        if self.endpoint is None:
            raise RuntimeError(f"rank {self.rank} has no KV role; {op!r} cannot run here")
        return getattr(self.endpoint, op)(*args)


def loopback_ray() -> None:
    """Make a local Ray started from this process bind 127.0.0.1 only. Ray reads the switch at
    import, so the module constant is set too, in case ray was imported before this ran; the
    environment carries it to the processes Ray starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def ensure_ray() -> None:
    """A local Ray bound to 127.0.0.1 unless this process is already connected to one."""
    import ray

    if not ray.is_initialized():
        loopback_ray()
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")


class Followers:
    """Ranks 1..n-1 of a replica: their actors, and the placement group if they got their own."""

    def __init__(self, actors: list[Any], own_placement_group: Any | None) -> None:
        self.actors = actors
        self._pg = own_placement_group

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until every rank has built its model and KV cache; raise if one failed."""
        import ray

        for status in ray.get([a.status.remote() for a in self.actors], timeout=timeout_s):
            if status["error"]:
                raise RuntimeError(f"rank {status['rank']} failed: {status['error']}")

    def call(self, method: str, *args: Any) -> list[Any]:
        """Call a method on every rank and wait for the results."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        if self._pg is not None:
            remove_placement_group(self._pg)
        self.actors, self._pg = [], None


def start_followers(config, init_method: str, device: str = "cpu", num_cpus: float = 1.0,
                    num_threads: int | None = None, role: Any = None) -> Followers:
    """Start ranks 1..n-1 for `config` (an EngineConfig with tensor_parallel_size n). Inside a
    placement group (a pool's replica) they take its bundles 1..n-1; else they get their own.
    Raises ValueError when the Ray cluster cannot place them."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = config.options.tensor_parallel_size
    num_threads = num_threads or config.options.num_threads or 1
    ensure_ray()
    pg = get_current_placement_group()
    if pg is None:
        free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
        if free < (n - 1) * num_cpus:
            raise ValueError(
                f"tensor_parallel_size={n} needs {n - 1} more ranks of {num_cpus:g} CPU each beside this process; "
                f"the Ray cluster has {free:g} of {total:g} CPUs free. Lower tensor_parallel_size or add nodes")
        pg = placement_group([{"CPU": num_cpus}] * (n - 1), strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=30)
        if not ready:
            raise ValueError(f"the Ray cluster could not place {n - 1} ranks of {num_cpus:g} CPU within 30 s")
        offset, own = 0, pg
    else:
        offset, own = 1, None  # bundle 0 is rank 0's
    # on CUDA each rank gets a GPU of its own from Ray (it then sees it as cuda:0)
    actor, gpus = ray.remote(RankWorker), 1 if device.startswith("cuda") else 0
    # threaded: a decode rank's kv_wait blocks while kv_forget and status must still answer
    return Followers([actor.options(
        num_cpus=num_cpus, num_gpus=gpus, max_concurrency=4,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=offset + r - 1),
    ).remote(config, r, n, init_method, device, num_threads, role) for r in range(1, n)], own)
