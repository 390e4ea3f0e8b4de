"""The cluster configuration: the README's YAML is a valid config, and mistakes are named."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from engine.options import EngineOptions
from pdserve.cli import _cluster_config, build_parser, main
from pdserve.config import KV_BACKENDS, ClusterConfig, PoolConfig, RouterConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_config_is_the_default_config(tmp_path) -> None:
    block = re.search(r"### Configuration.*?```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    path = tmp_path / "cluster.yaml"
    path.write_text(block)
    config = ClusterConfig.from_yaml(str(path))
    assert config == ClusterConfig()  # the README documents the real defaults
    assert config.router.local_prefill_threshold == 16 and config.decode.num_kv_blocks == 512


def test_flags_override_the_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"decode": {"replicas": 3}, "router": {"port": 7000}}))
    import argparse

    args = argparse.Namespace(config=str(path), port=0, prefill_replicas=2, decode_tp=None)
    config = _cluster_config(args)
    assert (config.decode.replicas, config.prefill.replicas, config.router.port) == (3, 2, 0)


@pytest.mark.parametrize("bad,message", [
    ({"prefil": {}}, "unknown cluster config keys ['prefil']"),
    ({"decode": {"replica": 2}}, "unknown keys ['replica'] under 'decode'"),
    ({"decode": {"replicas": 0}}, "decode.replicas must be at least 1"),
    ({"prefill": {"replicas": -1}}, "replicas=-1 must be >= 0"),
    ({"kv_backend": "carrier-pigeon"}, "kv_backend='carrier-pigeon'"),
    ({"decode": {"block_size": 12}}, "block_size=12 must be a power of two"),
    ({"prefill": {"dtype": "fp8"}}, "dtype 'fp8' is not supported"),
    ({"prefill": {"device": "tpu"}}, "device='tpu'; choose 'cpu' or 'cuda'"),
    ({"router": {"prefill_policy": "random"}}, "prefill_policy='random'"),
    ({"decode": {"dtype": "bf16"}}, "prefill.dtype='float32' and decode.dtype='bf16'"),
    ({"router": {"dispatch_retune_s": -1}}, "dispatch_retune_s=-1 must be >= 0"),
])
def test_bad_config_names_the_mistake(bad, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ClusterConfig.from_dict(bad)


def test_one_dtype_spelled_two_ways_and_a_colocated_pool_of_its_own_dtype_are_fine() -> None:
    assert ClusterConfig.from_dict({"prefill": {"dtype": "bf16"}, "decode": {"dtype": "bfloat16"}})
    assert ClusterConfig.from_dict({"prefill": {"replicas": 0}, "decode": {"dtype": "float16"}})


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("router: {decode_policy: fastest}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "decode_policy='fastest'" in capsys.readouterr().err


def test_a_pool_is_the_engine_options_plus_placement() -> None:
    pool = PoolConfig()
    engine = {f.name for f in dataclasses.fields(EngineOptions)}
    assert set(pool.engine_kwargs()) == engine  # every engine option reaches the workers' engines
    assert engine < {f.name for f in dataclasses.fields(PoolConfig)}
    # a pool's own defaults: ranks share the host's cores
    assert (pool.num_threads, pool.max_num_batched_tokens, pool.num_kv_blocks, pool.max_num_seqs) == (1, 512, 256, 64)
    assert PoolConfig(expert_parallel=True, max_model_len=128).engine_kwargs()["max_model_len"] == 128


def test_serve_flags_for_every_pool_option_reach_the_cluster_config() -> None:
    args = build_parser().parse_args([
        "serve", "--prefill-tp", "2", "--decode-tensor-parallel-size", "4", "--prefill-replicas", "3",
        "--prefill-max-num-batched-tokens", "128", "--decode-num-kv-blocks", "64", "--decode-max-prefill-chunk", "32",
        "--no-decode-native-decoder", "--prefill-expert-parallel", "--decode-num-cpus", "0.5",
        "--prefill-dtype", "bfloat16", "--decode-dtype", "bf16", "--kv-backend", "collective", "--port", "0"])
    config = _cluster_config(args)
    prefill, decode = config.prefill, config.decode
    assert config.router.dispatch_retune_s == 5.0
    never = build_parser().parse_args(["serve", "--dispatch-retune-s", "0"])
    assert _cluster_config(never).router.dispatch_retune_s == 0
    assert (prefill.tensor_parallel_size, decode.tensor_parallel_size) == (2, 4)
    assert (prefill.replicas, prefill.max_num_batched_tokens, prefill.expert_parallel) == (3, 128, True)
    assert (decode.num_kv_blocks, decode.max_prefill_chunk, decode.native_decoder) == (64, 32, False)
    assert (decode.num_cpus, decode.dtype, config.kv_backend, config.router.port) == (0.5, "bf16", "collective", 0)
    assert prefill.native_decoder and decode.max_num_batched_tokens == 256  # unset flags keep the defaults

    dests = vars(build_parser().parse_args(["serve"]))
    for pool in ("prefill", "decode"):
        for f in dataclasses.fields(EngineOptions):
            assert f"{pool}_{f.name}" in dests, f"no --{pool}-{f.name.replace('_', '-')} flag"
    for backend in KV_BACKENDS:
        assert _cluster_config(build_parser().parse_args(["serve", "--kv-backend", backend])).kv_backend == backend


def test_a_bad_flag_value_is_reported_without_a_traceback(capsys) -> None:
    assert main(["serve", "--decode-block-size", "12"]) == 2
    assert "block_size=12 must be a power of two" in capsys.readouterr().err


def test_api_keys_come_from_the_file_the_flags_and_the_environment(tmp_path, monkeypatch) -> None:
    from pdserve.cli import _open_to_others

    path = tmp_path / "c.yaml"
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nfrom-file\n\n  spaced  \n")
    path.write_text(yaml.safe_dump({"router": {"api_keys": ["from-yaml"], "api_keys_file": str(keys)}}))
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--config", str(path), "--api-key", "flag1", "--api-key", "flag2"])
    config = _cluster_config(args)
    assert config.router.api_keys == ("from-yaml", "flag1", "flag2", "from-env")
    assert config.router.keys() == ("from-yaml", "flag1", "flag2", "from-env", "from-file", "spaced")
    monkeypatch.delenv("PDSERVE_API_KEY")
    bare = _cluster_config(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    assert bare.router.api_keys == () and _open_to_others(bare)
    assert not _open_to_others(bare.replace(**{"router.api_keys": ("k",)}))
    assert not _open_to_others(_cluster_config(build_parser().parse_args(["serve", "--host", "127.0.0.1"])))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        bare.replace(**{"router.api_keys_file": str(empty)}).router.keys()


@pytest.mark.parametrize("router, message", [
    ({"api_keys": "one-key"}, "a list of keys"),
    ({"api_keys": ["ok", ""]}, "non-empty string"),
    ({"api_keys": [" padded"]}, "without surrounding spaces"),
    ({"tls_cert": "cert.pem"}, "go together"),
])
def test_bad_keys_and_tls_settings_are_named(router, message) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig.from_dict({"router": router})


def test_tls_flags_go_together_and_a_missing_file_is_named(capsys) -> None:
    flags = ["serve", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/k.pem"]
    assert _cluster_config(build_parser().parse_args(flags)).router.tls  # both flags at once: no "go together" error
    assert main(flags) == 2
    assert "/nonexistent/cert.pem" in capsys.readouterr().err  # before any actor starts, without a traceback


def test_autoscale_flags_turn_it_on_over_the_files_settings(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"router": {"autoscale": {"every_s": 2, "decode": [1, 2]}}}))
    args = build_parser().parse_args(["serve", "--config", str(path), "--autoscale-decode", "1:3",
                                      "--autoscale-target-ongoing-requests", "4"])
    a = _cluster_config(args).router.autoscale
    assert (a.enabled, a.decode, a.prefill, a.every_s, a.target_ongoing_requests) == (True, (1, 3), (0, 4), 2, 4)
    assert not _cluster_config(build_parser().parse_args(["serve", "--config", str(path)])).router.autoscale.enabled
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--autoscale-decode", "3"])
    with pytest.raises(ValueError, match="router.profile.*target_ongoing_requests"):
        _cluster_config(build_parser().parse_args(["serve", "--autoscale-decode", "1:3"]))


def test_auto_kv_backend_is_shared_memory_on_one_host_and_collective_across_hosts() -> None:
    from kv_transfer import resolve_backend

    assert ClusterConfig().kv_backend == "auto" and "auto" in KV_BACKENDS
    assert resolve_backend("auto", one_host=True) == "ipc"
    assert resolve_backend("auto", one_host=False) == "collective"
    # GPU pools take NCCL even on one host: Ray shows each replica only its own GPUs (no CUDA IPC handle across them)
    assert resolve_backend("auto", one_host=True, gpus=True) == "collective"
    for backend in ("ipc", "collective"):  # a backend named is kept, wherever the pools are
        assert resolve_backend(backend, one_host=False, gpus=True) == resolve_backend(backend, one_host=True) == backend
    with pytest.raises(ValueError, match="kv_backend='nccl'"):
        resolve_backend("nccl", one_host=True)


def test_auto_dispatch_is_slo_aware_with_a_profile_and_threshold_without() -> None:
    assert RouterConfig().dispatch == "auto" and RouterConfig().policy == "threshold"
    assert RouterConfig(profile="p.json").policy == "slo_aware"
    assert RouterConfig(profile="p.json", dispatch="threshold").policy == "threshold"  # named: kept
    assert RouterConfig(profile="measure").policy == "slo_aware"
