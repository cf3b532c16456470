"""serving.ingress: Ray Serve's ingress switches, set only where they take effect, refused where they cannot."""

from __future__ import annotations

import os
import sys
import types

import pytest

from dense_irl.cli import main
from dense_irl.errors import ConfigError
from dense_irl.serving.ingress import DRAIN_ENV, SWITCHES, use_ingress


@pytest.fixture
def fresh(monkeypatch):
    """No Ray around: no cluster address, ray.serve not imported; the environment restored afterwards."""
    for name in (*SWITCHES, DRAIN_ENV[0], "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "ray.serve", raising=False)
    return monkeypatch


def test_haproxy_is_the_default_where_serve_starts_ray(fresh):
    assert use_ingress(None) == "haproxy"
    assert all(os.environ[name] == "1" for name in SWITCHES)
    assert os.environ[DRAIN_ENV[0]] == DRAIN_ENV[1]


def test_proxy_clears_switches_left_in_the_environment(fresh):
    fresh.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    fresh.setenv("RAY_ADDRESS", "local")  # "start a local Ray" is not a cluster
    assert use_ingress("proxy") == "proxy"
    assert not any(name in os.environ for name in SWITCHES)


def test_a_running_ray_keeps_its_setting_and_an_explicit_choice_is_refused(fresh):
    fresh.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert "RAY_ADDRESS=10.0.0.1:6379" in use_ingress(None)
    assert not any(name in os.environ for name in SWITCHES)
    with pytest.raises(ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1"):
        use_ingress("haproxy")
    fresh.delenv("RAY_ADDRESS")
    fresh.setitem(sys.modules, "ray.serve", types.ModuleType("ray.serve"))
    with pytest.raises(ConfigError, match="already imported in this process"):
        use_ingress("proxy")
    with pytest.raises(ConfigError, match="must be one of"):
        use_ingress("nginx")


def test_serve_cli_names_an_ingress_that_cannot_apply(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert main(["serve", "--reward-model", str(tmp_path), "--ingress", "haproxy"]) == 2
    err = capsys.readouterr().err
    assert "--ingress haproxy cannot take effect" in err and "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in err
