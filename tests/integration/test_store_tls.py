"""The store over TLS (``rediss://``) with a private CA and a client certificate.

The CA, the server's and the client's certificates are made here with ``cryptography``; the
redis-server requires a client certificate (``tls-auth-clients yes``) and the ACL user.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bff.config import RedisSettings, RedisTls, Secret
from bff.errors import StoreUnavailable
from bff.store import open_store
from bff.store.redis import RedisStore
from tests.support.bff_procs import BffProcess, EchoUpstream, base_config, login, write_config
from tests.support.procs import HOST, OidcProvider, free_port
from tests.support.redis_procs import PASSWORD, USER, RedisNode
from tests.unit.store_contract import Advance, StoreContract


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("bff test CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(HOST)),
        x509.DNSName("localhost"),
    ]
    server = _cert("redis", server_key, (ca.subject, ca_key), san=san)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("bff", client_key, (ca.subject, ca_key))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("another CA", other_key, None, ca=True)
    _write(d / "ca", ca, None)
    _write(d / "server", server, server_key)
    _write(d / "client", client, client_key)
    _write(d / "other", other, None)
    return Pki(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
        d / "other.crt",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[tuple[RedisNode, int]]:
    tls_port = free_port()
    args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    with RedisNode(args) as node:  # the plain port is for the readiness ping only
        yield node, tls_port


def _settings(pki: Pki, *, ca: Path | None = None, client_cert: bool = True) -> RedisSettings:
    return RedisSettings(
        username=USER,
        password=Secret(PASSWORD),
        tls=RedisTls(
            ca_file=ca or pki.ca,
            cert_file=pki.client_cert if client_cert else None,
            key_file=pki.client_key if client_cert else None,
        ),
    )


class TestTlsStore(StoreContract):
    @pytest.fixture
    async def store(self, tls_redis: tuple[RedisNode, int], pki: Pki) -> AsyncIterator[RedisStore]:
        node, port = tls_redis
        with node.client() as r:
            r.flushall()
        store = open_store(f"rediss://{HOST}:{port}/0", timeout=2.0, redis=_settings(pki))
        assert isinstance(store, RedisStore)
        yield store
        await store.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


@pytest.mark.parametrize("case", ["no-client-certificate", "unknown-ca", "plain-text-client"])
async def test_a_client_the_server_or_the_ca_does_not_trust_gets_store_unavailable(
    tls_redis: tuple[RedisNode, int], pki: Pki, case: str
) -> None:
    _, port = tls_redis
    if case == "no-client-certificate":
        store = open_store(f"rediss://{HOST}:{port}/0", redis=_settings(pki, client_cert=False))
    elif case == "unknown-ca":
        store = open_store(f"rediss://{HOST}:{port}/0", redis=_settings(pki, ca=pki.other_ca))
    else:
        store = open_store(f"redis://{USER}:{PASSWORD}@{HOST}:{port}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await store.set("bff:{tls}:s", b"v", 10)
    finally:
        await store.close()


async def test_bff_run_logs_in_and_proxies_over_tls_with_a_client_certificate(
    tls_redis: tuple[RedisNode, int], pki: Pki, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    _, port = tls_redis
    with EchoUpstream() as upstream:
        proc = BffProcess(tmp_path / "bff.yaml")
        client = await oidc_op.register_client([f"{proc.url}/bff/callback"])
        config = base_config(
            public_url=proc.url,
            issuer=oidc_op.issuer,
            client=client,
            store=f"rediss://{HOST}:{port}/0",
            keys=["t" * 43],
            static=tmp_path / "static",
            upstreams=[{"path": "/api", "url": upstream.url, "token": "user"}],
        )
        config["session"]["redis"] = {
            "username": USER,
            "password": PASSWORD,
            "tls": {
                "ca_file": str(pki.ca),
                "cert_file": str(pki.client_cert),
                "key_file": str(pki.client_key),
            },
        }
        write_config(tmp_path, config)
        with proc:
            cookie = await login(proc.url, "tls-user")
            headers = {"Cookie": f"bff-session={cookie}", "X-CSRF": "1"}
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{proc.url}/api/x", headers=headers) as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["bearer"]
