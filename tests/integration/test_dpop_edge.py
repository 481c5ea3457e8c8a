"""DPoP in edge mode: the shipped nginx and Caddy configs (``deploy/edge/``) pass bff's proof on
with the token, and never the browser's. A real ``bff run`` behind the real edge, the real OP with
DPoP on, and the validating upstream of ``tests/support/dpop_upstream.py``."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.bff_procs import COOKIE_NAME, BffProcess, base_config, login, write_config
from tests.support.dpop_upstream import DpopUpstream
from tests.support.edge_procs import Edge, edge_missing, make_edge
from tests.support.procs import OidcProvider, RedisServer

pytestmark = pytest.mark.parametrize("kind", ["nginx", "caddy"])


@pytest.fixture
async def stack(
    kind: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Edge, DpopUpstream]]:
    missing = edge_missing(kind)
    if missing is not None:
        pytest.skip(missing)
    if shutil.which("node") is None:
        pytest.skip("node not found on PATH")
    workdir = tmp_path_factory.mktemp(f"dpop-edge-{kind}")
    edge = make_edge(kind)
    with OidcProvider(access_ttl=60, dpop=True) as op:
        rs = await op.register_client(grant_types=("client_credentials",), scope="api:read")
        upstream = DpopUpstream(
            introspection=f"{op.issuer}/token/introspection",
            client=(rs["client_id"], rs["client_secret"]),
        )
        await upstream.start()
        client = await op.register_client(
            [f"{edge.url}/bff/callback"], dpop_bound_access_tokens=True
        )
        config = base_config(
            public_url=edge.url,
            issuer=op.issuer,
            client=client,
            store=redis_server.url,
            keys=[secrets.token_urlsafe(32)],
            static=workdir / "static",
            # The edge maps /api/x to the API's /x: bff's route names the same URL (htu).
            upstreams=[{"path": "/api", "url": upstream.url}],
        )
        config["oidc"]["dpop"] = True
        config["trusted_proxies"] = ["127.0.0.1/32"]
        bff = BffProcess(write_config(workdir, config))
        try:
            bff.start()
            edge.configure(bff.port, upstream.port)
            edge.start()
            yield edge, upstream
        finally:
            edge.close()
            bff.close()
            await upstream.close()


async def test_the_edge_passes_bffs_proof_on_and_never_the_browsers(
    stack: tuple[Edge, DpopUpstream],
) -> None:
    edge, upstream = stack
    cookie = await login(edge.url, f"edge-dpop-{secrets.token_hex(4)}")
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "X-CSRF": "1", "DPoP": "forged"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for path in ("/api/items?q=1", "/api/items?q=2"):
            async with http.get(edge.url + path, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
    first, second = upstream.calls[-2:]
    assert first.verdict == second.verdict == "ok"
    assert first.headers["dpop"] == [first.proof] and "forged" not in (first.proof or "")
    assert first.claims["htu"] == f"{upstream.url}/items"
    assert first.claims["jti"] != second.claims["jti"]
