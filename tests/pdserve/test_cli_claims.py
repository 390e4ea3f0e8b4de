"""README: "without keys nothing changes on loopback (and `pdserve serve --host` on any other address
warns)". Which hosts count as beyond loopback, and which keys silence the warning, through the
parser and the check `pdserve serve` runs before it starts anything (tests/e2e/test_cli_claims.py
runs the process itself: a loopback --host serves there without a warning, another one warns)."""
from __future__ import annotations

import pytest

from pdserve import cli


def warns(*argv: str) -> bool:
    return cli._open_to_others(cli._cluster_config(cli.build_parser().parse_args(["serve", *argv])))


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "fd00::2", "node1.example"])
def test_a_host_beyond_loopback_without_a_key_warns(host) -> None:
    assert warns("--host", host)


@pytest.mark.parametrize("host", [None, "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "localhost"])
def test_loopback_does_not_warn(host) -> None:
    assert not warns(*(["--host", host] if host else []))


def test_any_key_silences_the_warning(tmp_path, monkeypatch) -> None:
    assert not warns("--host", "0.0.0.0", "--api-key", "sk-a")
    keys = tmp_path / "keys"
    keys.write_text("sk-b\n")
    assert not warns("--host", "0.0.0.0", "--api-keys-file", str(keys))
    config = tmp_path / "cluster.yaml"
    config.write_text("router:\n  host: 0.0.0.0\n  api_keys: [sk-c]\n")
    assert not warns("--config", str(config))
    config.write_text("router:\n  host: 0.0.0.0\n")  # the config's host counts as --host does
    assert warns("--config", str(config))
    monkeypatch.setenv("PDSERVE_API_KEY", "sk-d")
    assert not warns("--config", str(config))
