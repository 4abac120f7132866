"""TLS to Cassandra with the default driver (acsylla), verified as documented (each test failed
before its fix): a node's certificate must name its address, and without a CA file the system's
CAs are trusted."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import settings_from
from tests.faults import TcpProxy
from tests.integration.test_tls import serve_one_task

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

START_LIMIT_S = 40.0


# -- a small PKI --------------------------------------------------------------------------------
class Pki:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} hunt CA")])
        now = datetime.datetime.now(datetime.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(self.ca_name)
            .issuer_name(self.ca_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file = root / f"{name}-ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        self,
        label: str,
        *,
        sans: list[str] | None = None,
        expired: bool = False,
        client: bool = False,
    ) -> tuple[Path, Path]:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        if expired:
            before, after = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            before, after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
        names: list[x509.GeneralName] = []
        for s in sans if sans is not None else ["localhost", "127.0.0.1"]:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
            .issuer_name(self.ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(before)
            .not_valid_after(after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if names and not client:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file, key_file = self.root / f"{self.name}-{label}.pem", self.root / f"{self.name}-{label}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_file, key_file

    def server_context(self, *, require_client_cert: bool = False, **leaf: Any) -> ssl.SSLContext:
        cert_file, key_file = self.leaf("server", **leaf)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca_file)
        return ctx


@pytest.fixture
async def proxies() -> Any:
    started: list[TcpProxy] = []

    async def make(host: str, port: int, tls: ssl.SSLContext | None) -> TcpProxy:
        p = await TcpProxy(host, port).start(tls=tls)
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()


async def _start_expecting_failure(settings: Any) -> BaseException:
    from bridge.app import Bridge

    b = Bridge(settings)
    try:
        await asyncio.wait_for(b.start(), timeout=START_LIMIT_S)
    except TimeoutError:
        await _cleanup(b)
        pytest.fail(f"the bridge neither started nor failed within {START_LIMIT_S}s")
    except Exception as exc:
        await _cleanup(b)
        return exc
    await b.stop()
    pytest.fail("the bridge started")


async def _cleanup(b: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(b.transport.close(), 10)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(b.db.close(), 10)


def _text(exc: BaseException) -> str:
    parts = []
    e: BaseException | None = exc
    while e is not None and len(parts) < 6:
        parts.append(repr(e) + str(getattr(e, "errors", "")))
        e = e.__cause__ or e.__context__
    return " | ".join(parts)


async def _serve_one(settings: Any, engine: Any, workers: Any) -> None:
    from bridge.app import Bridge

    b = Bridge(settings)
    await asyncio.wait_for(b.start(), timeout=START_LIMIT_S)
    try:
        await serve_one_task(engine, workers)
    finally:
        await b.stop()


# -- Cassandra TLS (the default driver, acsylla) ----------------------------------------------------
def _cql_tls(bridge_env: dict[str, str], proxy: TcpProxy, **tls: Any) -> Any:
    return settings_from(
        bridge_env, cassandra_hosts="127.0.0.1", cassandra_port=proxy.port, cassandra_timeout=5.0, **tls
    )


async def test_cassandra_node_certificate_naming_another_address_is_refused(bridge_env, servers, proxies, tmp_path):
    """docs/security.md: "the node's certificate and address are verified". The certificate is
    from the trusted CA but names 10.9.9.9 only, and the bridge connects to 127.0.0.1: it was
    accepted (acsylla 1.2 gives PEER_IDENTITY the value of PEER_CERT), so any certificate the CA
    signed (another service's) passed for any node (a man in the middle)."""
    pki = Pki(tmp_path, "cql")
    proxy = await proxies(
        servers.cassandra_hosts[0], servers.cassandra_port, pki.server_context(sans=["10.9.9.9", "other.example"])
    )
    exc = await _start_expecting_failure(_cql_tls(bridge_env, proxy, cassandra_tls_ca_file=str(pki.ca_file)))
    assert "certificate" in _text(exc).lower(), _text(exc)


async def test_cassandra_tls_without_ca_file_trusts_the_system_cas(
    bridge_env, servers, proxies, tmp_path, monkeypatch, engine, workers
):
    """README / config: BRIDGE_CASSANDRA_TLS_CA_FILE defaults to "the system's CAs". The node's
    CA is the system's trust store here (SSL_CERT_FILE, which OpenSSL's default paths honour: the
    datastax driver and the AMQP side accept the node); with the default driver nothing is trusted
    and every node is refused ("unable to verify the first certificate")."""
    pki = Pki(tmp_path, "sys")
    proxy = await proxies(servers.cassandra_hosts[0], servers.cassandra_port, pki.server_context())
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    await _serve_one(_cql_tls(bridge_env, proxy, cassandra_tls=True), engine, workers)
