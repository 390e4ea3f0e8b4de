"""The cluster configuration: the README's YAML is a valid config, and mistakes are named."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pdserve.cli import _cluster_config, main
from pdserve.config import ClusterConfig

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
    ({"router": {"prefill_policy": "random"}}, "prefill_policy='random'"),
])
def test_bad_config_names_the_mistake(bad, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ClusterConfig.from_dict(bad)


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("router: {decode_policy: fastest}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "decode_policy='fastest'" in capsys.readouterr().err
