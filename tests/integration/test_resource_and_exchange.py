"""Issue 12, points 1, 2 and 6, against real ``bff run`` processes, redis-server and the real OP.

The OP (oidc-provider with ``features.resourceIndicators`` and a registered RFC 8693 grant)
issues JWT access tokens for its resource servers; each upstream decodes what it received with
the OP's JWKS, so "each upstream sees only its own audience" is checked on the token itself.

1. ``resource:`` routes: a token per resource from the session's refresh token, each refreshed
   on its own expiry under the session's single flight (a burst on two instances at expiry is one
   refresh grant per resource, with refresh-token rotation on and nobody logged out); a route
   without a resource gets the session's normal token.
2. ``token: exchange`` routes: exchanged once and cached (N calls on two instances, 1 exchange);
   refused -> 403, OP down -> 503, and the upstream never sees the user's own token.
6. An OP whose discovery lacks the token-exchange grant: bff never becomes ready and says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bff.config import load_settings
from bff.oidc import TOKEN_EXCHANGE_GRANT
from bff.preflight import run_checks
from bff.sessions import SessionData
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffCluster,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    read_session,
    write_config,
)
from tests.support.procs import OidcProvider, RedisServer

CSRF = {"X-CSRF": "1"}
ORDERS = "https://orders.test/api"
BILLING = "https://billing.test/api"
REPORTS = "https://reports.test/api"
RESOURCE_TTL = 8  # seconds: short enough to wait for, long enough to outlast a burst (7 s)


@dataclass(slots=True)
class Apis:
    orders: EchoUpstream
    billing: EchoUpstream
    plain: EchoUpstream
    reports: EchoUpstream
    refused: EchoUpstream

    def all(self) -> list[EchoUpstream]:
        return [self.orders, self.billing, self.plain, self.reports, self.refused]


@pytest.fixture(scope="module")
def op() -> Iterator[OidcProvider]:
    servers = {uri: {"scope": "api:read", "ttl": RESOURCE_TTL} for uri in (ORDERS, BILLING)}
    servers[REPORTS] = {"scope": "api:read api:write", "ttl": 60}
    with OidcProvider(
        access_ttl=RESOURCE_TTL, resource_servers=servers, token_exchange=True
    ) as server:
        yield server


@pytest.fixture(scope="module")
def apis() -> Iterator[Apis]:
    with (
        EchoUpstream() as orders,
        EchoUpstream() as billing,
        EchoUpstream() as plain,
        EchoUpstream() as reports,
        EchoUpstream() as refused,
    ):
        yield Apis(orders, billing, plain, reports, refused)


@dataclass(slots=True)
class Setup:
    op: OidcProvider
    cluster: BffCluster
    redis: RedisServer
    keys: list[str]

    async def call(self, http: aiohttp.ClientSession, index: int, cookie: str, path: str) -> int:
        headers = {"Cookie": f"{COOKIE_NAME}={cookie}", **CSRF}
        url = self.cluster.urls[index % len(self.cluster)] + path
        async with http.get(url, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def error(self, http: aiohttp.ClientSession, cookie: str, path: str) -> tuple[int, Any]:
        headers = {"Cookie": f"{COOKIE_NAME}={cookie}", **CSRF}
        async with http.get(self.cluster.urls[0] + path, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def stored(self, cookie: str) -> SessionData | None:
        return await read_session(self.redis.url, self.keys, cookie)


def routes(apis: Apis) -> list[dict[str, Any]]:
    return [
        {"path": "/api/orders", "url": apis.orders.url, "resource": ORDERS},
        {"path": "/api/billing", "url": apis.billing.url, "resource": [BILLING]},
        {"path": "/api/plain", "url": apis.plain.url},
        {
            "path": "/api/reports",
            "url": apis.reports.url,
            "token": "exchange",
            "audience": REPORTS,
            "exchange_scopes": ["api:read"],
        },
        {
            "path": "/api/refused",
            "url": apis.refused.url,
            "token": "exchange",
            "audience": "https://unknown.test/api",
        },
    ]


@pytest.fixture(scope="module")
def setup(
    op: OidcProvider,
    apis: Apis,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("route-tokens")
    keys = [secrets.token_urlsafe(32)]
    cluster = BffCluster(workdir / "bff.yaml", 2)
    public_url = cluster[0].url
    client = asyncio.run(
        op.register_client(
            [f"{public_url}/bff/callback"],
            grant_types=["authorization_code", "refresh_token", TOKEN_EXCHANGE_GRANT],
        )
    )
    config = base_config(
        public_url=public_url,
        issuer=op.issuer,
        client=client,
        store=redis_server.url,
        keys=keys,
        static=workdir / "static",
        upstreams=routes(apis),
        refresh_skew="1s",
    )
    write_config(workdir, config)
    cluster.start()
    try:
        yield Setup(op, cluster, redis_server, keys)
    finally:
        cluster.close()


@pytest.fixture
async def http(apis: Apis) -> AsyncIterator[aiohttp.ClientSession]:
    for api in apis.all():
        api.clear()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def claims_at(op: OidcProvider, token: str | None) -> dict[str, Any] | None:
    """The upstream's view: the token's claims verified with the OP's JWKS, None if opaque."""
    assert token is not None
    if token.count(".") != 2:
        return None
    keys = KeySet.import_key_set(await op.jwks())
    try:
        claims: dict[str, Any] = jwt.decode(token, keys).claims
    except JoseError as exc:  # a JWT that does not verify fails the test loudly
        raise AssertionError(f"the upstream got a token the OP did not sign: {exc}") from exc
    assert claims["iss"] == op.issuer
    return claims


async def audiences(op: OidcProvider, api: EchoUpstream) -> set[str | None]:
    found: set[str | None] = set()
    for seen in api.seen():
        claims = await claims_at(op, seen.token)
        found.add(None if claims is None else str(claims["aud"]))
    return found


async def wait_until_stale(data: SessionData, key: str, skew: float = 1.0) -> None:
    entry = data.resource_tokens[key]
    delay = float(entry["e"]) - min(skew, float(entry["l"]) / 2) + 0.3 - time.time()
    assert delay < 15, "the resource tokens live longer than this test assumes"
    await asyncio.sleep(max(0.0, delay))


# -------------------------------------------------------------------------------------------------
# 1: resource indicators


async def test_each_upstream_sees_only_a_token_for_its_own_audience(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    cookie = await login(setup.cluster.urls[0], "ada")
    for i in range(4):  # both instances, every route
        for path in ("/api/orders/x", "/api/billing/x", "/api/plain/x", "/api/reports/x"):
            assert await setup.call(http, i, cookie, path) == 200
    assert await audiences(setup.op, apis.orders) == {ORDERS}
    assert await audiences(setup.op, apis.billing) == {BILLING}
    assert await audiences(setup.op, apis.reports) == {REPORTS}
    # A route without a resource gets the session's own token (oidc-provider's opaque one).
    stored = await setup.stored(cookie)
    assert stored is not None
    assert apis.plain.seen()[-1].token == stored.access_token
    assert await audiences(setup.op, apis.plain) == {None}  # opaque: no audience of a route
    # No token crossed routes, and none of the routes' tokens is the session's main one.
    tokens = {
        f.name: {s.token for s in getattr(apis, f.name).seen()} for f in dataclasses.fields(apis)
    }
    names = list(tokens)
    for a in names:
        for b in names:
            if a != b:
                assert not tokens[a] & tokens[b], f"{a} and {b} saw the same token"
    assert stored.access_token not in tokens["orders"] | tokens["billing"] | tokens["reports"]
    assert set(stored.resource_tokens) == {ORDERS, BILLING}
    claims = await claims_at(setup.op, next(iter(tokens["orders"])))
    assert claims is not None and claims["sub"] == "ada"


async def test_a_burst_at_expiry_refreshes_each_resource_once_and_logs_nobody_out(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    cookie = await login(setup.cluster.urls[0], "bea")
    for path in ("/api/orders/x", "/api/billing/x"):
        assert await setup.call(http, 0, cookie, path) == 200
    before = await setup.stored(cookie)
    assert before is not None
    await wait_until_stale(before, ORDERS)
    await wait_until_stale(before, BILLING)
    await setup.op.reset_stats()

    # 40 calls on each resource route, spread over both instances, all after expiry.
    calls = [
        setup.call(http, i, cookie, path)
        for i in range(40)
        for path in ("/api/orders/y", "/api/billing/y")
    ]
    assert set(await asyncio.gather(*calls)) == {200}
    stats = await setup.op.stats()
    assert stats["token"]["refresh_token"] == 2  # one per resource
    assert stats["token_errors"]["refresh_token"] == 0
    after = await setup.stored(cookie)
    assert after is not None
    for key in (ORDERS, BILLING):
        assert after.resource_tokens[key]["t"] != before.resource_tokens[key]["t"]
    # Rotation: every refresh consumed the refresh token the one before it stored.
    assert after.refresh_token != before.refresh_token
    assert after.access_token == before.access_token  # the main token was not touched
    assert await audiences(setup.op, apis.orders) == {ORDERS}
    assert await audiences(setup.op, apis.billing) == {BILLING}


async def test_main_and_resource_refreshes_at_once_share_the_rotating_refresh_token(
    setup: Setup, http: aiohttp.ClientSession
) -> None:
    """The main token and both resource tokens are due together: a mixed burst refreshes each
    once, one after the other, each with the refresh token the previous one stored (a rotating
    OP revokes the grant when one is presented twice): no invalid_grant, nobody logged out."""
    cookie = await login(setup.cluster.urls[0], "cyd")
    paths = ("/api/orders/z", "/api/billing/z", "/api/plain/z")
    for path in paths:
        assert await setup.call(http, 0, cookie, path) == 200
    for round_ in range(2):
        before = await setup.stored(cookie)
        assert before is not None and before.access_expires_at is not None
        await wait_until_stale(before, ORDERS)
        await wait_until_stale(before, BILLING)
        main = {"e": before.access_expires_at, "l": before.access_lifetime or RESOURCE_TTL}
        await wait_until_stale(dataclasses.replace(before, resource_tokens={"m": main}), "m")
        await setup.op.reset_stats()
        results = await asyncio.gather(
            *(setup.call(http, i, cookie, p) for i in range(20) for p in paths)
        )
        assert set(results) == {200}, f"round {round_}"
        stats = await setup.op.stats()
        assert stats["token_errors"]["refresh_token"] == 0, f"round {round_}"
        assert stats["token"]["refresh_token"] == 3, f"round {round_}"  # main + 2 resources
        after = await setup.stored(cookie)
        assert after is not None and after.refresh_token != before.refresh_token


# -------------------------------------------------------------------------------------------------
# 2: token exchange


async def test_an_exchange_is_made_once_and_cached_across_instances(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    cookie = await login(setup.cluster.urls[0], "dee")
    await setup.op.reset_stats()
    results = await asyncio.gather(
        *(setup.call(http, i, cookie, "/api/reports/a") for i in range(30))
    )
    assert set(results) == {200}
    for i in range(10):
        assert await setup.call(http, i, cookie, "/api/reports/b") == 200
    stats = await setup.op.stats()
    assert stats["token"].get(TOKEN_EXCHANGE_GRANT) == 1
    assert stats["token_errors"].get(TOKEN_EXCHANGE_GRANT, 0) == 0
    seen = {s.token for s in apis.reports.seen()}
    assert len(seen) == 1
    claims = await claims_at(setup.op, seen.pop())
    assert claims is not None and claims["aud"] == REPORTS and claims["sub"] == "dee"
    assert claims["scope"] == "api:read"  # exchange_scopes, not the session's scopes
    stored = await setup.stored(cookie)
    assert stored is not None and stored.access_token not in {s.token for s in apis.reports.seen()}


async def test_a_refused_exchange_is_403_and_the_upstream_sees_nothing(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    cookie = await login(setup.cluster.urls[0], "eve")
    status, body = await setup.error(http, cookie, "/api/refused/x")
    assert status == 403
    assert body["error"] == "token_refused"
    assert apis.refused.seen() == []  # never the user's own token instead


async def test_without_a_session_an_exchange_route_is_401(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    async with http.get(setup.cluster.urls[0] + "/api/reports/x", headers=CSRF) as resp:
        assert resp.status == 401
    assert apis.reports.seen() == []


async def test_an_upstream_401_renews_only_that_routes_token_and_retries(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    cookie = await login(setup.cluster.urls[0], "gus")
    assert await setup.call(http, 0, cookie, "/api/orders/x") == 200
    assert await setup.call(http, 0, cookie, "/api/reports/x") == 200
    orders_token = apis.orders.seen()[-1].token
    reports_token = apis.reports.seen()[-1].token
    assert orders_token is not None and reports_token is not None
    apis.orders.reject(orders_token)
    apis.reports.reject(reports_token)
    assert await setup.call(http, 0, cookie, "/api/orders/y") == 200
    assert await setup.call(http, 0, cookie, "/api/reports/y") == 200
    retried = apis.orders.seen()[-1].token
    assert retried != orders_token and await audiences(setup.op, apis.orders) == {ORDERS}
    assert apis.reports.seen()[-1].token != reports_token
    assert await audiences(setup.op, apis.reports) == {REPORTS}
    after = await setup.stored(cookie)
    assert after is not None and after.access_token not in {
        s.token for s in apis.orders.seen() + apis.reports.seen()
    }


async def test_no_route_token_reaches_the_logs(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    cookie = await login(setup.cluster.urls[0], "hal")
    for i in range(2):
        for path in ("/api/orders/x", "/api/billing/x", "/api/reports/x"):
            assert await setup.call(http, i, cookie, path) == 200
    tokens = {s.token for api in (apis.orders, apis.billing, apis.reports) for s in api.seen()}
    assert len(tokens) == 3 and None not in tokens
    logs = "".join(proc.full_logs() for proc in setup.cluster)
    assert "route_token.refreshed" in logs  # the log was written, and is what we search
    for token in tokens:
        assert token is not None and token not in logs


async def test_an_op_down_makes_exchange_and_resource_routes_503_and_forwards_nothing(
    setup: Setup, apis: Apis, http: aiohttp.ClientSession
) -> None:
    """Last in this module: the OP loses its state when it comes back."""
    cookie = await login(setup.cluster.urls[0], "fay")
    try:
        await asyncio.to_thread(setup.op.stop)
        status, body = await setup.error(http, cookie, "/api/reports/x")
        assert status == 503, body
        status, body = await setup.error(http, cookie, "/api/orders/x")
        assert status == 503, body
        assert apis.reports.seen() == [] and apis.orders.seen() == []
        assert await setup.stored(cookie) is not None  # the session was kept
    finally:
        await asyncio.to_thread(setup.op.start)


# -------------------------------------------------------------------------------------------------
# 6: discovery without the token-exchange grant


def test_an_op_without_the_exchange_grant_is_refused_with_a_clear_message(
    redis_server: RedisServer, apis: Apis, tmp_path: Path
) -> None:
    with OidcProvider(access_ttl=30) as plain_op:  # no OP_TOKEN_EXCHANGE
        client = asyncio.run(plain_op.register_client(["http://127.0.0.1:1/bff/callback"]))
        proc = BffProcess(tmp_path / "bff.yaml", wait_ready=False)
        config = base_config(
            public_url=proc.url,
            issuer=plain_op.issuer,
            client=client,
            store=redis_server.url,
            keys=[secrets.token_urlsafe(32)],
            static=tmp_path / "static",
            upstreams=routes(apis)[3:4],
        )
        write_config(tmp_path, config)
        with proc:
            deadline = time.monotonic() + 20
            while "oidc.grant_type_unsupported" not in proc.full_logs():
                assert time.monotonic() < deadline, proc.full_logs()
                time.sleep(0.2)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(proc.url + "/readyz", timeout=5)
            assert refused.value.code == 503
            assert "token: exchange on /api/reports" in proc.full_logs()
        # `bff check-config` says the same before anything runs.
        report = asyncio.run(run_checks(load_settings(tmp_path / "bff.yaml")))
        assert any(
            "grant_types_supported lacks " + TOKEN_EXCHANGE_GRANT in e for e in report.errors
        ), report.errors
