"""The store over TLS with a private CA and a client certificate: one node (``rediss://``),
Sentinel (``rediss+sentinel://``) and Cluster (``rediss+cluster://``).

The CA, the servers' and the client's certificates are made with ``cryptography``
(``tests/support/tls.py``); every server requires a client certificate (``tls-auth-clients
yes``) and the ACL user.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from bff.config import RedisSettings, RedisTls, Secret
from bff.errors import StoreUnavailable
from bff.store import open_store
from bff.store.redis import RedisStore
from tests.support.bff_procs import BffProcess, EchoUpstream, base_config, login, write_config
from tests.support.procs import HOST, OidcProvider, free_port
from tests.support.redis_procs import (
    PASSWORD,
    SENTINEL_PASSWORD,
    USER,
    RedisClusterGroup,
    RedisNode,
    SentinelGroup,
)
from tests.support.tls import Pki, make_pki
from tests.unit.store_contract import Advance, StoreContract


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


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


# -------------------------------------------------------------------------------------------------
# Sentinel over TLS: bff talks TLS to the sentinels and to the master they name


@pytest.fixture(scope="module")
def tls_sentinels(pki: Pki) -> Iterator[SentinelGroup]:
    with SentinelGroup(pki) as group:
        yield group


def _sentinel_settings(pki: Pki, *, client_cert: bool = True) -> RedisSettings:
    return dataclasses.replace(
        _settings(pki, client_cert=client_cert),
        username=None,  # the URL names the data nodes' user
        password=None,
        sentinel_username="default",
        sentinel_password=Secret(SENTINEL_PASSWORD),
    )


class TestTlsSentinelStore(StoreContract):
    @pytest.fixture
    async def store(self, tls_sentinels: SentinelGroup, pki: Pki) -> AsyncIterator[RedisStore]:
        assert tls_sentinels.url.startswith("rediss+sentinel://")
        with tls_sentinels.current_master().client() as r:
            r.flushall()
        store = open_store(tls_sentinels.url, timeout=2.0, redis=_sentinel_settings(pki))
        assert isinstance(store, RedisStore)
        yield store
        await store.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_sentinels_over_tls_refuse_a_client_without_a_certificate(
    tls_sentinels: SentinelGroup, pki: Pki
) -> None:
    store = open_store(tls_sentinels.url, redis=_sentinel_settings(pki, client_cert=False))
    try:
        with pytest.raises(StoreUnavailable):
            await store.set("bff:{tls}:s", b"v", 10)
    finally:
        await store.close()


# -------------------------------------------------------------------------------------------------
# Cluster over TLS: the nodes gossip, replicate and answer over TLS, and name TLS ports to bff


@pytest.fixture(scope="module")
def tls_cluster(pki: Pki) -> Iterator[RedisClusterGroup]:
    with RedisClusterGroup(pki=pki) as group:
        yield group


class TestTlsClusterStore(StoreContract):
    @pytest.fixture
    async def store(self, tls_cluster: RedisClusterGroup, pki: Pki) -> AsyncIterator[RedisStore]:
        assert tls_cluster.url.startswith("rediss+cluster://")
        tls_cluster.flush()
        store = open_store(tls_cluster.url, timeout=2.0, redis=_settings(pki))
        assert isinstance(store, RedisStore)
        # redis-py 8's cluster client spends ~150 ms discovering the cluster on its first
        # command, longer than the contract's short TTLs: connect before the clock matters.
        await store.ping()
        yield store
        await store.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_a_tls_cluster_refuses_a_client_without_a_certificate(
    tls_cluster: RedisClusterGroup, pki: Pki
) -> None:
    store = open_store(tls_cluster.url, redis=_settings(pki, client_cert=False))
    try:
        with pytest.raises(StoreUnavailable):
            await store.set("bff:{tls}:s", b"v", 10)
    finally:
        await store.close()
