"""BRIDGE_AMQP_HOSTS: the URLs a bridge (or the client) tries, and how the setting is checked."""

from __future__ import annotations

import random

import pytest

from bridge.config import ConfigError, Settings, load_settings
from bridge.transport.addresses import node_urls, parse_host
from bridge.transport.failover import FailoverConnection

URL = "amqps://user:p%40ss@lb.example:5671/prod?heartbeat=30"


def test_without_hosts_the_url_is_the_one_node() -> None:
    assert node_urls(URL, []) == [URL]


def test_each_host_keeps_the_urls_user_vhost_options_and_port() -> None:
    urls = sorted(node_urls(URL, ["r1", "r2:5700", "[fd00::7]"]))
    assert urls == [
        "amqps://user:p%40ss@[fd00::7]:5671/prod?heartbeat=30",
        "amqps://user:p%40ss@r1:5671/prod?heartbeat=30",
        "amqps://user:p%40ss@r2:5700/prod?heartbeat=30",
    ]


def test_a_url_without_a_port_leaves_the_port_to_its_scheme() -> None:
    assert node_urls("amqp://u:p@lb/", ["r1"]) == ["amqp://u:p@r1/"]


def test_the_order_is_shuffled_so_a_fleet_spreads_over_the_nodes() -> None:
    hosts = [f"r{n}" for n in range(3)]
    firsts = {node_urls(URL, hosts, random.Random(seed))[0] for seed in range(50)}
    assert len(firsts) == 3  # every node is some process's first
    assert node_urls(URL, hosts, random.Random(7)) == node_urls(URL, hosts, random.Random(7))


def test_one_process_uses_one_order() -> None:
    settings = Settings(amqp_hosts="r1,r2,r3,r4,r5")
    assert settings.amqp_urls == settings.amqp_urls
    assert sorted(settings.amqp_urls) == sorted(node_urls(settings.amqp_url.get_secret_value(), settings.amqp_hosts))


@pytest.mark.parametrize("host", ["r1:x", "r1:70000", "amqp://r1", "u@r1", ":5672", " "])
def test_a_host_that_is_not_host_port_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        parse_host(host)


def test_the_variable_is_named_when_a_host_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_AMQP_HOSTS", "r1,r2:port")
    with pytest.raises(ConfigError, match=r"BRIDGE_AMQP_HOSTS.*r2:port"):
        load_settings()


def test_a_failover_connection_needs_a_url() -> None:
    with pytest.raises(ValueError, match="no RabbitMQ URL"):
        FailoverConnection([])
