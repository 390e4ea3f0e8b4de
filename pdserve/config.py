"""Cluster configuration: one model, two pools, one router. Plain dataclasses (no torch), read
from YAML and overridden by command-line flags. A pool's engine options are engine.options.EngineOptions
and the KV backends kv_transfer.BACKENDS (both standard library only), so the router's process and
the CLI import this without torch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from engine.options import DTYPES, EngineOptions
from kv_transfer import CHOICES as KV_BACKENDS
from kv_transfer import resolve_backend
from replica.affinity import parse_cpus


@dataclass(frozen=True)
class PoolConfig(EngineOptions):
    """One pool: its replicas' engine options (EngineOptions' fields, the same keys in YAML) and how Ray
    places them. Each replica is `tensor_parallel_size` Ray actors."""
    # a pool's engine defaults, where they differ from an offline engine's: ranks share the host's cores
    num_threads: int | None = 1  # torch threads per rank: keep it <= num_cpus so ranks don't oversubscribe cores
    max_num_batched_tokens: int = 512  # token budget per step
    max_num_seqs: int = 64  # most sequences in one step
    num_kv_blocks: int | None = 256  # KV blocks per rank
    # placement
    replicas: int = 1
    num_cpus: float = 1.0  # Ray CPUs per rank
    num_gpus: float = 0.0  # Ray GPUs per rank (1 on GPU nodes)
    resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per rank, e.g. {"prefill": 1}
    peak_flops: float | None = None  # per replica, the MFU denominator (None: measured at start-up)
    peak_bandwidth: float | None = None  # bytes/s per replica, the MBU denominator (None: measured at start-up)
    # the cores this pool's engine threads run on, a Linux CPU list ("0-3", "0,2"): replica i takes the i-th run
    # of num_threads of them (replica/affinity.py); None: wherever the OS puts them
    cpus: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cpus is not None:
            parse_cpus(self.cpus, "cpus")
        if self.replicas < 0:
            raise ValueError(f"replicas={self.replicas} must be >= 0")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus={self.num_cpus} must be positive")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device='cuda' needs num_gpus > 0 (Ray GPUs per rank)")

    def peaks(self) -> dict[str, float] | None:
        if self.peak_flops is None or self.peak_bandwidth is None:
            return None
        return {"peak_flops": self.peak_flops, "peak_bandwidth": self.peak_bandwidth}

    def engine_kwargs(self) -> dict[str, Any]:
        """The engine options alone (every EngineOptions field), for LLMEngine.from_model(model, **kwargs)."""
        return {f.name: getattr(self, f.name) for f in fields(EngineOptions)}


@dataclass(frozen=True)
class AutoscaleConfig:
    """router.autoscale: the pools follow the load. Every every_s the autoscaler reads the router's last window_s
    (arrival rate, prompt and output lengths, requests on each pool) and wants, per pool, the most of: the fewest
    replicas the planner's simulator (router.profile) says keep `attainment` of requests within the SLOs at
    headroom x the observed rate, and ongoing requests / target_ongoing_requests. A pool grows once it has wanted
    more for upscale_delay_s and shrinks (its last replicas drain) once it has wanted fewer for downscale_delay_s."""
    enabled: bool = False
    prefill: tuple[int, int] = (0, 4)  # (min, max) replicas
    decode: tuple[int, int] = (1, 4)
    every_s: float = 5.0
    window_s: float = 30.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    headroom: float = 1.25  # plan for this multiple of the observed arrival rate
    attainment: float = 0.9  # the share of requests within both SLOs (router.ttft_slo_s, tpot_slo_s) to plan for
    target_ongoing_requests: float | None = None  # per replica; None: the planner alone decides (needs a profile)
    placement_timeout_s: float = 600.0  # a new replica waits this long to be placed (Ray's autoscaler adding a node)

    def __post_init__(self) -> None:
        for pool, least in (("prefill", 0), ("decode", 1)):
            bounds = tuple(getattr(self, pool))
            object.__setattr__(self, pool, bounds)  # YAML gives a list
            if len(bounds) != 2 or not least <= bounds[0] <= bounds[1] <= 64:
                raise ValueError(f"router.autoscale.{pool}={list(bounds)}: give [min, max] replicas with "
                                 f"{least} <= min <= max <= 64")
        if min(self.every_s, self.window_s) <= 0 or min(self.upscale_delay_s, self.downscale_delay_s) < 0:
            raise ValueError("router.autoscale: every_s and window_s must be positive, the delays >= 0")
        if self.placement_timeout_s <= 0:
            raise ValueError("router.autoscale.placement_timeout_s must be positive")
        if self.headroom <= 0 or not 0 < self.attainment <= 1:
            raise ValueError("router.autoscale: headroom must be positive and attainment in (0, 1]")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ValueError("router.autoscale.target_ongoing_requests must be positive (or unset)")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API (0: a free port; None: off)
    max_ongoing_requests: int = 64  # requests placed on the pools at once; the rest wait in the queue
    max_queued_requests: int = 256  # past this, RESOURCE_EXHAUSTED
    local_prefill_threshold: int = 16  # prompts shorter than this many tokens prefill on the decode replica
    # where a prompt prefills: "threshold" (local_prefill_threshold), "slo_aware" (per request, the path the
    # profile's step models and the live load predict keeps more requests within ttft_slo_s and tpot_slo_s), or
    # "auto": slo_aware when there is a profile, else threshold (the `policy` the router runs)
    dispatch: str = "auto"
    # a `pdserve profile` JSON: what slo_aware (and the autoscaler) predicts with; "measure": a short one measured
    # at start-up, on the pools' own configurations, before the replicas start
    profile: str | None = None
    # slo_aware: every dispatch_retune_s the simulator picks the rule under its predictions (a size threshold, or
    # the least delay) that keeps the most requests within the SLOs for the last dispatch_window_s of traffic
    # (planner.simulate.Tuner); 0: never (the least delay)
    dispatch_retune_s: float = 5.0
    dispatch_window_s: float = 30.0
    prefill_policy: str = "prefix_aware"  # or least_tokens, round_robin (router/placement.py)
    decode_policy: str = "prefix_aware"  # or most_free_blocks, round_robin
    max_request_bytes: int = 1 << 20  # a request larger than this is refused with INVALID_ARGUMENT
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_migrations: int = 2  # times a request may be continued elsewhere after its replica died (0: never)
    migration_wait_s: float = 30.0  # how long a request to continue waits for a decode replica to be up
    drain_timeout_s: float = 30.0  # a leaving replica (scale down) or the whole cluster (SIGTERM) gets this long
    metrics_port: int | None = 9400  # Prometheus /metrics on host:metrics_port (0: a free port; None: off)
    ttft_slo_s: float = 1.0  # the SLO targets that pdserve_slo_* metrics count against
    tpot_slo_s: float = 0.2
    # API keys: with any set, both front doors require one (HTTP `Authorization: Bearer KEY`, gRPC metadata
    # `authorization: Bearer KEY`) and a request belongs to its key. `pdserve serve` adds $PDSERVE_API_KEY.
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None  # one key per line (blank lines and # comments skipped)
    tls_cert: str | None = None  # PEM files: gRPC and HTTP both serve TLS with them
    tls_key: str | None = None
    autoscale: AutoscaleConfig = AutoscaleConfig()

    def __post_init__(self) -> None:
        from router.placement import DECODE_POLICIES, PREFILL_POLICIES  # the registries (no torch)

        if isinstance(self.api_keys, str):
            raise ValueError("router.api_keys is a list of keys (or set api_keys_file)")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))  # YAML gives a list
        if any(not isinstance(k, str) or not k.strip() or k != k.strip() for k in self.api_keys):
            raise ValueError("router.api_keys: every key must be a non-empty string without surrounding spaces")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("router.tls_cert and router.tls_key go together: give both PEM files or neither")

        if self.prefill_policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill_policy={self.prefill_policy!r}; choose one of {tuple(PREFILL_POLICIES)}")
        if self.decode_policy not in DECODE_POLICIES:
            raise ValueError(f"decode_policy={self.decode_policy!r}; choose one of {tuple(DECODE_POLICIES)}")
        from router.dispatch import DISPATCH

        if self.dispatch not in DISPATCH:
            raise ValueError(f"dispatch={self.dispatch!r}; choose one of {DISPATCH}")
        if self.dispatch == "slo_aware" and not self.profile:  # auto without one is threshold
            raise ValueError("router.dispatch='slo_aware' predicts with a profile: set router.profile to a JSON "
                             "written by `pdserve profile`")
        if self.dispatch_retune_s < 0 or self.dispatch_window_s <= 0:
            raise ValueError(f"dispatch_retune_s={self.dispatch_retune_s} must be >= 0 (0: never) and "
                             f"dispatch_window_s={self.dispatch_window_s} > 0")
        if self.max_ongoing_requests < 1 or self.max_queued_requests < 0:
            raise ValueError("max_ongoing_requests must be >= 1 and max_queued_requests >= 0")
        if isinstance(self.autoscale, dict):
            object.__setattr__(self, "autoscale", _sub(AutoscaleConfig, self.autoscale, "router.autoscale",
                                                       AutoscaleConfig()))
        a = self.autoscale
        if a.enabled and not self.profile and a.target_ongoing_requests is None:
            raise ValueError("router.autoscale decides with the planner (set router.profile to a JSON written by "
                             "`pdserve profile`) or by load (set router.autoscale.target_ongoing_requests)")

    @property
    def policy(self) -> str:
        """The dispatch the router runs: slo_aware when asked for, or (auto) when there is a profile; else
        threshold."""
        return "slo_aware" if self.dispatch == "slo_aware" or (self.dispatch == "auto" and self.profile) else \
            "threshold"

    def keys(self) -> tuple[str, ...]:
        """Every API key: api_keys, then api_keys_file's lines."""
        if self.api_keys_file is None:
            return self.api_keys
        with open(self.api_keys_file) as f:
            extra = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not extra:
            raise ValueError(f"router.api_keys_file {self.api_keys_file!r} holds no key")
        return self.api_keys + tuple(extra)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "default"  # "default" (SmolLM2-135M-Instruct), a Hugging Face folder, or a .gguf file
    name: str = "pdserve"  # Ray namespace and the prefix of actor and KV pool names
    ray_address: str | None = None  # None: start a local Ray bound to 127.0.0.1; "auto": join the running one
    # "auto": ipc on a local Ray (one node), collective on a joined Ray cluster; "ipc": same host (shared memory
    # on CPU, CUDA IPC on GPU); "collective": any hosts (NCCL between GPUs, gloo on CPU)
    kv_backend: str = "auto"
    kv_lease_s: float = 30.0  # a decode reservation that gets no KV this long is freed
    replace_dead_replicas: bool = True  # a replica whose actor or engine dies is replaced (both KV backends)
    # the cores of everything but the engines, a Linux CPU list: the router's process (and a local Ray it starts:
    # its daemons and workers inherit it) and each replica's threads but its engine's; None: wherever the OS puts
    # them. With the pools' `cpus`, it keeps the service off the engines' cores (README: CPU placement)
    service_cpus: str | None = None
    prefill: PoolConfig = PoolConfig(max_num_batched_tokens=512, num_kv_blocks=256)
    decode: PoolConfig = PoolConfig(max_num_batched_tokens=256, num_kv_blocks=512)
    router: RouterConfig = RouterConfig()

    def __post_init__(self) -> None:
        if self.decode.replicas < 1:
            raise ValueError("decode.replicas must be at least 1 (with prefill.replicas 0 the decode replicas "
                             "prefill too: a colocated cluster)")
        if self.kv_backend not in KV_BACKENDS:
            raise ValueError(f"kv_backend={self.kv_backend!r}; available: {KV_BACKENDS}")
        if self.service_cpus is not None:
            parse_cpus(self.service_cpus, "service_cpus")
        p, d = (DTYPES.get(str(pool.dtype), pool.dtype) for pool in (self.prefill, self.decode))
        a = self.router.autoscale
        if a.enabled:
            for pool in ("prefill", "decode"):
                low, high = getattr(a, pool)
                if not low <= getattr(self, pool).replicas <= high:
                    raise ValueError(f"{pool}.replicas={getattr(self, pool).replicas} is outside "
                                     f"router.autoscale.{pool}={[low, high]}")
        if self.prefill.replicas and p != d:  # the KV moves between them as it is: one dtype for both
            raise ValueError(f"prefill.dtype={self.prefill.dtype!r} and decode.dtype={self.decode.dtype!r}: the "
                             "prefill pool writes KV into the decode pool's cache, so both pools need one dtype")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterConfig:
        d = dict(d)
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ValueError(f"unknown cluster config keys {sorted(unknown)}; known: {sorted(known)}")
        for key, kind in (("prefill", PoolConfig), ("decode", PoolConfig), ("router", RouterConfig)):
            if key in d:
                d[key] = _sub(kind, d[key], key, getattr(cls(), key))
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> ClusterConfig:
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def kv_backend_on(self, one_host: bool) -> str:
        """The KV backend a cluster of this config runs (kv_transfer.resolve_backend: auto as the pools' device
        and hosts say)."""
        gpus = any(pool.replicas and pool.device == "cuda" for pool in (self.prefill, self.decode))
        return resolve_backend(self.kv_backend, one_host, gpus)

    def replace(self, **changes: Any) -> ClusterConfig:
        """Dotted keys reach into the pools and the router: replace(**{"prefill.replicas": 2})."""
        top = {k: v for k, v in changes.items() if "." not in k}
        parts: dict[str, dict[str, Any]] = {}
        for k, v in changes.items():
            if "." in k:
                part, key = k.split(".", 1)
                parts.setdefault(part, {})[key] = v
        for part, values in parts.items():  # all of a part's keys at once: some go together (tls_cert, tls_key)
            top[part] = dataclasses.replace(top.get(part, getattr(self, part)), **values)
        return dataclasses.replace(self, **top)


def _sub(kind, value: dict[str, Any], where: str, base):
    known = {f.name for f in fields(kind)}
    if unknown := set(value) - known:
        raise ValueError(f"unknown keys {sorted(unknown)} under {where!r}; known: {sorted(known)}")
    return dataclasses.replace(base, **value)
