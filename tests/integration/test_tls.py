"""TLS to RabbitMQ and to Cassandra, against local TLS listeners (issue 13: TLS settings tested).

The listeners are TLS-terminating proxies in front of the local servers, with a CA and a server
certificate made here: the bridge's side of each connection is real TLS, with the certificate and
the address verified, exactly as against a broker or a node that terminates TLS itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import BRIDGE_USER, service_id, settings_from
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA (its PEM file) and a server TLS context for 127.0.0.1 / localhost signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = _cert(f"{name} test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", ca_key, ca_name, key, ca=False)
    ca_file, cert_file, key_file = root / f"{name}-ca.pem", root / f"{name}.pem", root / f"{name}-key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return ca_file, server


@pytest.fixture
async def tls_listeners(servers, tmp_path):  # type: ignore[no-untyped-def]
    amqp_ca, amqp_tls = make_pki(tmp_path, "amqp")
    cql_ca, cql_tls = make_pki(tmp_path, "cassandra")
    amqp = await TcpProxy(servers.amqp_host, servers.amqp_port).start(tls=amqp_tls)
    cql = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start(tls=cql_tls)
    yield {"amqp": amqp, "amqp_ca": amqp_ca, "cql": cql, "cql_ca": cql_ca}
    await amqp.stop()
    await cql.stop()


def _tls_settings(bridge_env, tls, *, amqp_ca: Path, cql_ca: Path):  # type: ignore[no-untyped-def]
    url = f"amqps://{BRIDGE_USER}:{BRIDGE_USER}@127.0.0.1:{tls['amqp'].port}/?cafile={quote(str(amqp_ca))}"
    return settings_from(
        bridge_env,
        amqp_url=url,
        cassandra_hosts="127.0.0.1",
        cassandra_port=tls["cql"].port,
        cassandra_tls_ca_file=str(cql_ca),
        cassandra_timeout=5.0,
    )


async def serve_one_task(engine: Any, workers: Any) -> None:
    """A task added, fetched and acked through the running bridge."""
    svc = service_id()
    await engine.add(svc, {"over": "tls"})
    w = await workers(svc)
    task = await w.fetch()
    assert task.value == {"over": "tls"}
    assert await task.ack("ok") is True


async def test_the_bridge_serves_over_tls_to_both_servers(bridge_env, tls_listeners, engine, workers):
    from bridge.app import Bridge

    b = Bridge(
        _tls_settings(bridge_env, tls_listeners, amqp_ca=tls_listeners["amqp_ca"], cql_ca=tls_listeners["cql_ca"])
    )
    await b.start()
    try:
        await serve_one_task(engine, workers)
    finally:
        await b.stop()


@pytest.mark.parametrize("wrong", ["amqp", "cassandra"])
async def test_a_certificate_from_another_ca_is_refused(bridge_env, tls_listeners, tmp_path, wrong):
    from bridge.app import Bridge

    (tmp_path / "other").mkdir()
    other_ca, _ = make_pki(tmp_path / "other", "other")
    cas = {"amqp_ca": tls_listeners["amqp_ca"], "cql_ca": tls_listeners["cql_ca"]}
    cas["amqp_ca" if wrong == "amqp" else "cql_ca"] = other_ca
    b = Bridge(_tls_settings(bridge_env, tls_listeners, **cas))
    with pytest.raises(Exception) as err:  # noqa: PT011 - the driver and aio-pika wrap it differently
        await b.start()
    text = repr(err.value) + repr(err.value.__cause__) + str(getattr(err.value, "errors", ""))
    # Python's ssl (aio-pika, cassandra-driver) or OpenSSL through the C++ driver (acsylla).
    refusals = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "Error verifying peer certificate")
    assert any(refusal in text for refusal in refusals), text
    await b.db.close()
