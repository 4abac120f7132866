"""Unit tests run without RabbitMQ or Cassandra: a test that asks for the servers, or opens a
connection to their ports, fails here (it belongs in tests/integration)."""

from __future__ import annotations

import socket
from typing import Any, NoReturn

import pytest

SERVER_PORTS = {5671, 5672, 9042, 9142}  # AMQP, AMQPS, CQL, CQL over TLS


@pytest.fixture(scope="session")
def servers() -> NoReturn:
    pytest.fail("a unit test asked for the servers fixture: move it to tests/integration", pytrace=False)


def _refuse_server_ports(sock: socket.socket, address: Any) -> None:
    if isinstance(address, tuple) and len(address) >= 2 and address[1] in SERVER_PORTS:
        sock.close()
        raise AssertionError(f"a unit test connected to {address[0]}:{address[1]}: move it to tests/integration")


@pytest.fixture(autouse=True)
def _no_server_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Covers this process (asyncio, aiohttp and the Cassandra driver all connect through
    socket.socket); subprocesses started by a test are given unreachable ports instead."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _refuse_server_ports(self, address)
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        _refuse_server_ports(self, address)
        return connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
