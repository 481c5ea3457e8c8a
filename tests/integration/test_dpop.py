"""DPoP (RFC 9449, issue 12 point 3) end to end: a real redis-server, the real OP with DPoP on and
its nonces required, bff in this process (and as a real ``bff run`` for the restart), and an
upstream that validates every proof and the token's binding (``tests/support/dpop_upstream.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from bff import dpop
from bff.app import create_app
from bff.config import Settings, parse_settings
from bff.errors import ProviderUnavailable
from bff.oidc import OidcClient
from bff.preflight import run_checks
from bff.services import SERVICES, Services
from bff.sessions import Session
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    base_config,
    read_session,
    write_config,
)
from tests.support.bff_procs import login as process_login
from tests.support.dpop_upstream import DpopUpstream
from tests.support.procs import (
    OidcProvider,
    RedisServer,
    browser_session,
    free_port,
    op_login,
)

COOKIE = "bff-session"
KEY = "dpop-test-key-0123456789abcdef0123456789"
CSRF = {"X-CSRF": "1"}


@pytest.fixture(scope="module")
def dpop_op() -> Iterator[OidcProvider]:
    """An OP that binds tokens to DPoP keys and wants its nonce in every proof."""
    if shutil.which("node") is None:
        pytest.skip("node not found on PATH")
    with OidcProvider(access_ttl=60, dpop=True, dpop_nonce=True) as op:
        yield op


async def introspection_client(op: OidcProvider) -> tuple[str, str]:
    """A resource server's credentials at the OP (it introspects tokens with them)."""
    rs = await op.register_client(grant_types=("client_credentials",), scope="api:read")
    return rs["client_id"], rs["client_secret"]


@dataclass
class Bff:
    url: str
    settings: Settings
    app: web.Application
    upstream: DpopUpstream
    op: OidcProvider
    runner: web.AppRunner

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    async def session(self, browser: aiohttp.ClientSession) -> Session | None:
        cookie = browser.cookie_jar.filter_cookies(URL(self.url)).get(COOKIE)
        assert cookie is not None, "not logged in"
        secret = self.services.keyring.unsign(cookie.value)
        return await self.services.sessions.load(secret, fresh=True)  # type: ignore[arg-type]

    async def login(self, browser: aiohttp.ClientSession) -> Session:
        async with browser.get(f"{self.url}/bff/login", allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            authorize = resp.headers["Location"]
        callback = await op_login(browser, authorize, f"user-{uuid.uuid4().hex[:12]}")
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 200, await resp.text()
        session = await self.session(browser)
        assert session is not None
        return session


def settings_for(
    port: int,
    op: OidcProvider,
    client: dict[str, Any],
    redis: str,
    up: str,
    static: Path,
    extra_routes: tuple[dict[str, Any], ...] = (),
) -> Settings:
    return parse_settings(
        json.dumps(
            {
                "public_url": f"http://127.0.0.1:{port}",
                "static": str(static),
                "oidc": {
                    "issuer": op.issuer,
                    "client_id": client["client_id"],
                    "client_secret": client["client_secret"],
                    "scopes": ["openid", "profile", "api:read"],
                    "refresh_skew": "1s",
                    "dpop": True,
                },
                "session": {"store": redis, "cookie": {"name": COOKIE, "secure": False}},
                "keys": [KEY],
                "upstreams": [
                    {"path": "/api", "url": f"{up}/up"},
                    {"path": "/api/public", "url": f"{up}/public", "token": "none"},
                    {"path": "/api/ws", "url": f"{up}/ws", "websocket": True},
                    *extra_routes,
                ],
                "trusted_proxies": ["127.0.0.1/32"],  # for edge mode's /bff/authz
            }
        )
    )


async def start_bff(settings: Settings, port: int) -> tuple[web.Application, web.AppRunner]:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    deadline = time.monotonic() + 10
    while not app[SERVICES].oidc.ready:
        assert time.monotonic() < deadline, "bff never loaded the OP's metadata"
        await asyncio.sleep(0.05)
    return app, runner


@pytest.fixture
async def bff(
    redis_server: RedisServer, dpop_op: OidcProvider, tmp_path: Path
) -> AsyncIterator[Bff]:
    upstream = DpopUpstream(
        introspection=f"{dpop_op.issuer}/token/introspection",
        client=await introspection_client(dpop_op),
    )
    await upstream.start()
    port = free_port()
    # dpop_bound_access_tokens: the OP refuses this client's token requests without a proof.
    client = await dpop_op.register_client(
        redirect_uris=[f"http://127.0.0.1:{port}/bff/callback"],
        scope="openid profile api:read",
        dpop_bound_access_tokens=True,
    )
    (tmp_path / "static").mkdir()
    settings = settings_for(
        port, dpop_op, client, redis_server.url, upstream.url, tmp_path / "static"
    )
    app, runner = await start_bff(settings, port)
    try:
        yield Bff(f"http://127.0.0.1:{port}", settings, app, upstream, dpop_op, runner)
    finally:
        await runner.cleanup()
        await upstream.close()


@pytest.fixture
async def browser(bff: Bff) -> AsyncIterator[aiohttp.ClientSession]:
    async with browser_session(bff.url) as http:
        yield http


async def introspect(bff: Bff, token: str) -> dict[str, Any]:
    return await bff.upstream._introspect(token)


# -------------------------------------------------------------------------------------------------


async def test_a_login_binds_the_tokens_to_the_sessions_key_and_a_proxied_call_is_accepted(
    bff: Bff, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    session = await bff.login(browser)
    key = dpop.session_key(session)
    assert key is not None and key.alg == "ES256"  # the OP lists ES256 and EdDSA
    # The OP bound the access token to exactly this key.
    info = await introspect(bff, session.data.access_token)
    assert info["active"] and info["cnf"]["jkt"] == key.thumbprint()
    # Userinfo answered (the OP wants a DPoP proof, and its nonce, there too).
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "session.created" in events and "login.userinfo_unavailable" not in events
    async with browser.get(f"{bff.url}/api/orders/7?x=1#f", headers=CSRF) as resp:
        assert resp.status == 200, await resp.text()
    call = bff.upstream.calls[-1]
    assert call.verdict == "ok"
    assert call.header("authorization") == f"DPoP {session.data.access_token}"
    assert call.claims["htu"] == f"{bff.upstream.url}/up/orders/7"  # no query, no fragment
    assert call.claims["htm"] == "GET"
    assert call.jkt == key.thumbprint()
    # Userinfo, by a process that knows no nonce yet: the OP's 401 use_dpop_nonce, then the answer.
    bff.services.oidc._dpop_nonces = dpop.Nonces()
    info = await bff.services.oidc.userinfo(session.data.access_token, dpop_key=key)
    assert info["sub"] == session.data.sub


async def test_a_replayed_proof_is_refused_and_bff_sends_a_fresh_proof_each_time(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    for _ in range(3):
        async with browser.get(f"{bff.url}/api/items", headers=CSRF) as resp:
            assert resp.status == 200, await resp.text()
    calls = bff.upstream.calls[-3:]
    assert [c.verdict for c in calls] == ["ok"] * 3
    assert len({c.claims["jti"] for c in calls}) == 3
    assert len({c.proof for c in calls}) == 3
    # The upstream does refuse a proof it saw before: the same request, sent again as it was.
    last = calls[-1]
    assert last.proof is not None and last.token is not None
    status, body = await bff.upstream.send(
        "GET", "/up/items", {"Authorization": f"DPoP {last.token}", "DPoP": last.proof}
    )
    assert status == 401 and "replayed" in body["why"]


async def test_the_upstream_refuses_a_proof_for_another_url_and_the_token_as_a_bearer(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    token = session.data.access_token
    key = dpop.session_key(session)
    assert key is not None
    other = dpop.proof(key, "GET", f"{bff.upstream.url}/up/other", access_token=token)
    status, body = await bff.upstream.send(
        "GET", "/up/items", {"Authorization": f"DPoP {token}", "DPoP": other}
    )
    assert status == 401 and "htu mismatch" in body["why"]
    status, body = await bff.upstream.send("GET", "/up/items", {"Authorization": f"Bearer {token}"})
    assert status == 401 and body["why"] == "a DPoP-bound token used as a bearer token"
    # And a proof for the right URL but another token (ath) is refused as well.
    wrong = dpop.proof(key, "GET", f"{bff.upstream.url}/up/items", access_token=token + "x")
    status, body = await bff.upstream.send(
        "GET", "/up/items", {"Authorization": f"DPoP {token}", "DPoP": wrong}
    )
    assert status == 401 and body["why"] == "ath mismatch"


async def test_the_code_exchange_and_a_refresh_do_the_ops_nonce_dance_and_stay_bound(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.op.reset_stats()
    session = await bff.login(browser)
    stats = await bff.op.stats()
    # This bff knew no nonce yet: the OP refused the first exchange (use_dpop_nonce), the retry
    # with its nonce got the tokens.
    assert stats["token"]["authorization_code"] == 2
    assert stats["token_errors"]["authorization_code"] == 1
    key = dpop.session_key(session)
    assert key is not None
    # As a new process would: no nonce known. The refresh must do the dance too.
    bff.services.oidc._dpop_nonces = dpop.Nonces()
    refreshed = await bff.services.refresher.refresh(session, force=True)
    assert refreshed.data.access_token != session.data.access_token
    stats = await bff.op.stats()
    assert stats["token"]["refresh_token"] == 2 and stats["token_errors"]["refresh_token"] == 1
    # The new tokens are bound to the same key, which the record still holds.
    assert dpop.session_key(refreshed) is key
    info = await introspect(bff, refreshed.data.access_token)
    assert info["cnf"]["jkt"] == key.thumbprint()
    async with browser.get(f"{bff.url}/api/after-refresh", headers=CSRF) as resp:
        assert resp.status == 200, await resp.text()
    assert bff.upstream.calls[-1].token == refreshed.data.access_token


async def test_the_upstreams_nonce_dance_is_done_once_and_a_body_is_never_replayed(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    bff.upstream.require_nonce = True
    bff.upstream.rotate_nonce()
    before = len(bff.upstream.calls)
    await bff.op.reset_stats()
    async with browser.get(f"{bff.url}/api/nonce", headers=CSRF) as resp:
        assert resp.status == 200, await resp.text()
    calls = bff.upstream.calls[before:]
    assert [c.verdict for c in calls] == ["use_dpop_nonce", "ok"]
    # A nonce challenge is not a refused token: no refresh was asked for.
    assert (await bff.op.stats())["token"]["refresh_token"] == 0
    assert calls[0].token == calls[1].token
    assert calls[1].claims["nonce"] == bff.upstream.nonce
    assert calls[0].claims["jti"] != calls[1].claims["jti"]
    # Remembered: the next call carries it at once.
    async with browser.get(f"{bff.url}/api/nonce", headers=CSRF) as resp:
        assert resp.status == 200
    assert bff.upstream.calls[-1].claims["nonce"] == bff.upstream.nonce
    assert len(bff.upstream.calls) == before + 3
    # A new nonce meets a request with a body: the body streamed and is gone, so the 401 goes
    # back (not replayed); the browser's retry carries the nonce bff now knows.
    bff.upstream.rotate_nonce()
    before = len(bff.upstream.calls)
    async with browser.post(f"{bff.url}/api/nonce", data=b"x" * 1000, headers=CSRF) as resp:
        assert resp.status == 401
        assert resp.headers["DPoP-Nonce"] == bff.upstream.nonce
    assert len(bff.upstream.calls) == before + 1
    async with browser.post(f"{bff.url}/api/nonce", data=b"x" * 1000, headers=CSRF) as resp:
        assert resp.status == 200, await resp.text()
    assert bff.upstream.calls[-1].claims["nonce"] == bff.upstream.nonce


async def test_the_browsers_dpop_header_never_reaches_an_upstream(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    forged = "eyJ0eXAiOiJkcG9wK2p3dCJ9.e30.forged"
    headers = {**CSRF, "DPoP": forged, "dpop": forged + "2"}
    async with browser.get(f"{bff.url}/api/items", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    call = bff.upstream.calls[-1]
    assert call.headers["dpop"] == [call.proof] and forged not in (call.proof or "")
    assert call.verdict == "ok"
    # A route that sends no token sends no proof either, and never the browser's.
    async with browser.get(f"{bff.url}/api/public/x", headers=headers) as resp:
        assert resp.status == 401  # the validating upstream wants a token: none was sent
    call = bff.upstream.calls[-1]
    assert "dpop" not in call.headers and "authorization" not in call.headers
    assert session.data.access_token not in json.dumps(call.headers)


async def test_discovery_refuses_dpop_when_the_op_does_not_advertise_it(
    oidc_op: OidcProvider, tmp_path: Path
) -> None:
    """The session-wide test OP has DPoP off: its discovery document does not mention it."""
    settings = parse_settings(
        json.dumps(
            {
                "public_url": "http://127.0.0.1:8080",
                "static": str(tmp_path),
                "oidc": {
                    "issuer": oidc_op.issuer,
                    "client_id": "c",
                    "client_secret": "s",
                    "dpop": True,
                },
                "keys": [KEY],
            }
        )
    )
    async with aiohttp.ClientSession() as http:
        client = OidcClient(settings.oidc, http, "http://127.0.0.1:8080/bff/callback")
        with pytest.raises(ProviderUnavailable, match="dpop_signing_alg_values_supported"):
            await client.metadata()
    report = await run_checks(settings)
    assert any("dpop_signing_alg_values_supported" in e for e in report.errors), report.errors


async def test_check_config_names_the_dpop_algorithm(bff: Bff) -> None:
    report = await run_checks(bff.settings)
    line = f"oidc.issuer {bff.op.issuer}: DPoP: tokens bound to one ES256 key per session"
    assert f"{line} (the OP lists ES256, EdDSA)" in report.infos, report.infos


async def test_an_op_answering_a_bearer_token_to_a_dpop_request_fails_the_login_clearly(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An OP that advertises DPoP but ignores the proof: its Bearer token is not taken."""
    if shutil.which("node") is None:
        pytest.skip("node not found on PATH")
    patch = {"dpop_signing_alg_values_supported": ["ES256"]}
    with OidcProvider(discovery_patch=patch) as op:
        port = free_port()
        client = await op.register_client(redirect_uris=[f"http://127.0.0.1:{port}/bff/callback"])
        settings = settings_for(port, op, client, redis_server.url, "http://127.0.0.1:9", tmp_path)
        _, runner = await start_bff(settings, port)
        try:
            url = f"http://127.0.0.1:{port}"
            async with browser_session(url) as http:
                async with http.get(f"{url}/bff/login", allow_redirects=False) as resp:
                    authorize = resp.headers["Location"]
                callback = await op_login(http, authorize, "bearer-user")
                async with http.get(callback, allow_redirects=False) as resp:
                    assert resp.status == 400
                    body = await resp.json()
                assert body["error"] == "login_failed"
                assert "token_type 'Bearer'" in body["error_description"]
                assert "oidc.dpop" in body["error_description"]
                assert http.cookie_jar.filter_cookies(URL(url)).get(COOKIE) is None
        finally:
            await runner.cleanup()


async def test_the_sessions_key_survives_a_restart_of_bff_sealed_in_redis_and_never_logged(
    redis_server: RedisServer, dpop_op: OidcProvider, tmp_path: Path
) -> None:
    upstream = DpopUpstream(
        introspection=f"{dpop_op.issuer}/token/introspection",
        client=await introspection_client(dpop_op),
    )
    await upstream.start()
    port = free_port()
    client = await dpop_op.register_client(
        redirect_uris=[f"http://127.0.0.1:{port}/bff/callback"],
        scope="openid profile email api:read",
        dpop_bound_access_tokens=True,
    )
    config = base_config(
        public_url=f"http://127.0.0.1:{port}",
        issuer=dpop_op.issuer,
        client=client,
        store=redis_server.url,
        keys=[KEY],
        static=tmp_path / "static",
        upstreams=[{"path": "/api", "url": f"{upstream.url}/up"}],
    )
    config["oidc"]["dpop"] = True
    config["log"] = {"level": "debug", "format": "json"}
    proc = BffProcess(write_config(tmp_path, config), port=port)
    try:
        with proc:
            cookie = await process_login(proc.url, "restart-user")
            data = await read_session(redis_server.url, [KEY], cookie)
            assert data is not None and data.dpop_jwk is not None
            private = data.dpop_jwk["d"]
            headers = {**CSRF, "Cookie": f"{COOKIE_NAME}={cookie}"}
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{proc.url}/api/a", headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                first = upstream.calls[-1]
                proc.restart()
                async with http.get(f"{proc.url}/api/b", headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                second = upstream.calls[-1]
            assert first.verdict == second.verdict == "ok"
            assert first.jkt == second.jkt  # the same key, read back from Redis after a restart
            # Sealed: the store's bytes hold neither the private key nor the token in clear.
            store = await redis_keys(redis_server)
            assert private.encode() not in store and data.access_token.encode() not in store
            logs = b"".join(
                (proc.workdir / name).read_bytes() for name in ("stdout.log", "stderr.log")
            )
            assert b"session.created" in logs  # the debug log was written
            for secret in (private, data.access_token, first.proof or "", second.proof or ""):
                assert secret.encode() not in logs
    finally:
        await upstream.close()


async def redis_keys(redis_server: RedisServer) -> bytes:
    """Every value in the store, concatenated (the test Redis is small)."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.url)
    try:
        out = b""
        async for name in client.scan_iter(count=1000):
            if await client.type(name) == b"string":
                out += await client.get(name) or b""
        return out
    finally:
        await client.aclose()


async def test_a_websocket_handshake_carries_a_proof_the_upstream_accepts(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    async with browser.ws_connect(
        f"{bff.url}/api/ws/chat?room=1", headers={"Origin": bff.url}
    ) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=10)).data == "echo hi"
    call = bff.upstream.calls[-1]
    assert call.verdict == "ok" and call.header("authorization") == (
        f"DPoP {session.data.access_token}"
    )
    assert call.claims["htm"] == "GET"
    assert call.claims["htu"] == f"{bff.upstream.url}/ws/chat"  # the http(s) form, no query
    # An upstream that wants a nonce: a handshake has no body, so it is sent again with it.
    bff.upstream.require_nonce = True
    bff.upstream.rotate_nonce()
    before = len(bff.upstream.calls)
    async with browser.ws_connect(f"{bff.url}/api/ws/chat", headers={"Origin": bff.url}) as ws:
        await ws.send_str("again")
        assert (await ws.receive(timeout=10)).data == "echo again"
    calls = bff.upstream.calls[before:]
    assert [c.verdict for c in calls] == ["use_dpop_nonce", "ok"]
    assert calls[1].claims["nonce"] == bff.upstream.nonce


async def test_edge_mode_answers_the_token_with_a_proof_the_upstream_accepts(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    cookie = browser.cookie_jar.filter_cookies(URL(bff.url))[COOKIE].value
    ask = {
        "Cookie": f"{COOKIE}={cookie}",
        **CSRF,
        "X-Original-URI": "/api/edge/x?y=1",
        "X-Original-Method": "DELETE",
        "DPoP": "forged-by-the-browser",
    }
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(f"{bff.url}/bff/authz", headers=ask) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer = dict(resp.headers)
    assert answer["Authorization"] == f"DPoP {session.data.access_token}"
    assert answer["DPoP"] != "forged-by-the-browser"
    # What the edge would send on: the upstream takes it, for that method and URL only.
    headers = {"Authorization": answer["Authorization"], "DPoP": answer["DPoP"]}
    status, body = await bff.upstream.send("DELETE", "/up/edge/x?y=1", headers)
    assert status == 200, body


# -- a DPoP session's per-route (RFC 8707 resource) tokens ---------------------------------------

RESOURCE = "https://orders.test/api"


@pytest.fixture(scope="module")
def dpop_resource_op() -> Iterator[OidcProvider]:
    """A DPoP OP (nonces required) that also issues JWT access tokens for one resource server."""
    if shutil.which("node") is None:
        pytest.skip("node not found on PATH")
    servers = {RESOURCE: {"scope": "api:read", "ttl": 60}}
    with OidcProvider(access_ttl=60, dpop=True, dpop_nonce=True, resource_servers=servers) as op:
        yield op


async def test_a_dpop_sessions_resource_route_gets_a_bound_token_a_validating_upstream_accepts(
    redis_server: RedisServer, dpop_resource_op: OidcProvider, tmp_path: Path
) -> None:
    """The merge seam of DPoP and per-route tokens: the resource token is obtained with the
    session's key (a proof on the refresh grant, the OP's nonce dance included), so it is a JWT
    for that resource alone whose ``cnf.jkt`` is the session's key; bff sends it as ``DPoP`` with
    a proof for the upstream URL, and an upstream that verifies the JWT, its audience, the proof
    and the binding accepts it. The session's main token never reaches that upstream."""
    op = dpop_resource_op
    upstream = DpopUpstream(
        introspection=f"{op.issuer}/token/introspection",
        client=await introspection_client(op),
        jwt_audience=RESOURCE,
        jwks=f"{op.issuer}/jwks",
        require_nonce=True,
    )
    await upstream.start()
    port = free_port()
    client = await op.register_client(
        redirect_uris=[f"http://127.0.0.1:{port}/bff/callback"],
        scope="openid profile api:read",
        dpop_bound_access_tokens=True,
    )
    (tmp_path / "static").mkdir()
    route = {"path": "/orders", "url": f"{upstream.url}/rs", "resource": RESOURCE}
    settings = settings_for(
        port, op, client, redis_server.url, upstream.url, tmp_path / "static", (route,)
    )
    app, runner = await start_bff(settings, port)
    try:
        bff = Bff(f"http://127.0.0.1:{port}", settings, app, upstream, op, runner)
        async with browser_session(bff.url) as browser:
            session = await bff.login(browser)
            key = dpop.session_key(session)
            assert key is not None
            for n in range(2):  # the second call: the token kept in the session, a new proof
                async with browser.get(f"{bff.url}/orders/7?x={n}", headers=CSRF) as resp:
                    assert resp.status == 200, await resp.text()
            after = await bff.session(browser)
        accepted = [c for c in upstream.calls if c.verdict == "ok"]
        assert len(accepted) == 2, [c.verdict for c in upstream.calls]
        assert after is not None
        resource_token = after.data.resource_tokens[RESOURCE]["t"]
        for call in accepted:
            assert call.header("authorization") == f"DPoP {resource_token}"
            assert call.token != session.data.access_token  # never the main token
            assert call.claims["htu"] == f"{upstream.url}/rs/7"  # no query
            assert call.claims["nonce"] == upstream.nonce
            assert call.jkt == key.thumbprint()
        info = await upstream._token_info(resource_token)
        assert info["aud"] == RESOURCE and info["cnf"]["jkt"] == key.thumbprint()
    finally:
        await runner.cleanup()
        await upstream.close()
