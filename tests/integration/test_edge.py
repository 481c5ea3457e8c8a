"""Edge mode through real nginx and real Caddy running the shipped configs (issue 11, 1 and 2).

For each edge: a real ``bff run`` (``trusted_proxies: [127.0.0.1/32]``, ``public_url`` = the
edge's URL), the real OP and Redis, and an echo upstream that records what reached it. The
browser talks only to the edge; the edge proxies the API itself after asking ``/bff/authz``.
Every answer the "browser" gets is checked for every token the test saw: none may leak.

The auth endpoint's own rules (who may ask, which headers say what) are tested against bff
directly at the end, with the peer address trusted (127.0.0.1) or not (127.0.0.2).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from yarl import URL

from bff.sessions import SessionData
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    read_session,
    token_digest,
    write_config,
)
from tests.support.edge_procs import Edge, NginxEdge, edge_missing, make_edge
from tests.support.procs import OidcProvider, RedisServer

API = "/api"
READ_ONLY = "/api/ro"  # a route with `methods: [GET]`
OPEN = "/api/open"  # a route with `token: none`
CSRF = {"X-CSRF": "1"}
# Longer than the shipped 1 s so that "right after a hit" is surely inside it on a busy machine.
CACHE_SECONDS = 5


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass(slots=True)
class Setup:
    kind: str
    edge: Edge
    bff: BffProcess
    upstream: EchoUpstream
    op: OidcProvider
    redis: RedisServer
    keys: list[str]
    answers: list[Answer] = field(default_factory=list)
    known_tokens: set[str] = field(default_factory=set)

    async def call(
        self,
        cookie: str | None,
        path: str = f"{API}/items?q=1",
        *,
        method: str = "GET",
        headers: Mapping[str, str] = CSRF,
        base: str | None = None,
    ) -> Answer:
        """One API call as the SPA makes it, through the edge (or ``base``)."""
        sent = dict(headers)
        if cookie is not None:
            sent["Cookie"] = f"{COOKIE_NAME}={cookie}"
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
            # encoded=True: the target goes out byte for byte (yarl would resolve "%2e%2e")
            http.request(
                method, URL((base or self.edge.url) + path, encoded=True), headers=sent
            ) as resp,
        ):
            answer = Answer(resp.status, tuple(resp.headers.items()), await resp.text())
        self.answers.append(answer)
        return answer

    async def session(self, cookie: str) -> SessionData | None:
        data = await read_session(self.redis.url, self.keys, cookie)
        if data is not None:
            self.known_tokens.update(
                t for t in (data.access_token, data.refresh_token, data.id_token) if t
            )
        return data


def _register(op: OidcProvider, redirect_uri: str) -> dict[str, Any]:
    client: dict[str, Any] = asyncio.run(op.register_client([redirect_uri]))
    return client


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def env(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    kind: str = request.param
    missing = edge_missing(kind)
    if missing is not None:
        pytest.skip(missing)
    yield from _stack(kind, make_edge(kind), redis_server, oidc_op, upstream, tmp_path_factory)


def _stack(
    kind: str,
    edge: Edge,
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    """bff run behind ``edge``, both started; stopped after the module."""
    workdir = tmp_path_factory.mktemp(f"edge-{kind}")
    keys = [secrets.token_urlsafe(32)]
    client = _register(oidc_op, f"{edge.url}/bff/callback")
    config = base_config(
        public_url=edge.url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=keys,
        static=workdir / "static",
        upstreams=[
            {"path": API, "url": upstream.url, "token": "user", "websocket": True},
            {"path": READ_ONLY, "url": upstream.url, "token": "user", "methods": ["GET"]},
            {"path": OPEN, "url": upstream.url, "token": "none"},
        ],
    )
    config["trusted_proxies"] = ["127.0.0.1/32"]
    bff = BffProcess(write_config(workdir, config))
    try:
        bff.start()
        edge.configure(bff.port, upstream.port)
        edge.start()
        yield Setup(kind, edge, bff, upstream, oidc_op, redis_server, keys)
    finally:
        edge.close()
        bff.close()


@pytest.fixture
async def setup(env: Setup) -> AsyncIterator[Setup]:
    """The module's edge; after each test, no answer the browser got may hold a token."""
    env.upstream.clear()
    env.answers.clear()
    yield env
    assert_no_token_leaked(env)


def assert_no_token_leaked(env: Setup) -> None:
    """No answer the browser got holds a token the test saw."""
    tokens = {s.token for s in env.upstream.seen() if s.token} | env.known_tokens
    for answer in env.answers:
        text = answer.body + "".join(f"{k}: {v}\n" for k, v in answer.headers)
        leaked = [t for t in tokens if t in text]
        assert not leaked, f"a token reached the browser in a {answer.status} answer"


@pytest.fixture(scope="module")
def cached_env(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    """nginx with the shipped config's optional auth cache on, for CACHE_SECONDS."""
    missing = edge_missing("nginx")
    if missing is not None:
        pytest.skip(missing)
    edge = NginxEdge(cache_seconds=CACHE_SECONDS)
    yield from _stack("nginx-cache", edge, redis_server, oidc_op, upstream, tmp_path_factory)


@pytest.fixture
async def cached(cached_env: Setup) -> AsyncIterator[Setup]:
    cached_env.upstream.clear()
    cached_env.answers.clear()
    yield cached_env
    assert_no_token_leaked(cached_env)


@pytest.fixture
async def direct(cached: Setup) -> AsyncIterator[Setup]:
    """A bff behind a trusted edge, for asking its auth endpoint directly: the endpoint's own
    rules do not depend on the edge (nor on its cache), so one edge's bff serves."""
    yield cached


async def logged_in(setup: Setup, user: str) -> tuple[str, SessionData]:
    """A session made by a real login through the edge, and its record."""
    cookie = await login(setup.edge.url, f"{user}-{setup.kind}")
    data = await setup.session(cookie)
    assert data is not None
    return cookie, data


async def refresh_grants(op: OidcProvider) -> int:
    stats = await op.stats()
    count: int = stats["token"]["refresh_token"]
    return count


# -------------------------------------------------------------------------------------------------
# Through each edge


async def test_a_call_reaches_the_upstream_with_the_bearer_and_without_the_cookie(
    setup: Setup,
) -> None:
    cookie, data = await logged_in(setup, "alice")
    forged = {**CSRF, "Authorization": "Bearer forged-by-the-browser"}
    answer = await setup.call(cookie, f"{API}/items?q=1", headers=forged)

    assert answer.status == 200, answer.body
    assert answer.json()["bearer"] == token_digest(data.access_token)
    [seen] = setup.upstream.seen()
    assert seen.path == "/items?q=1"  # the edge maps the prefix as bff's route does
    assert seen.header("Authorization") == [f"Bearer {data.access_token}"]
    assert seen.header("Cookie") == []
    assert answer.header("Set-Cookie") is None
    assert answer.header("Authorization") is None


async def test_on_a_route_without_a_token_the_browsers_authorization_never_passes(
    setup: Setup,
) -> None:
    forged = {**CSRF, "Authorization": "Bearer forged-by-the-browser"}
    answer = await setup.call(None, f"{OPEN}/x", headers=forged)
    assert answer.status == 200, answer.body
    [seen] = setup.upstream.seen()
    assert seen.header("Authorization") == []


async def test_without_a_session_the_edge_answers_bffs_401_and_nothing_reaches_the_upstream(
    setup: Setup,
) -> None:
    answer = await setup.call(None)
    assert answer.status == 401
    assert answer.json()["error"] == "login_required"
    assert setup.upstream.seen() == []


@pytest.mark.parametrize(
    "headers",
    [{"X-CSRF": "1", "Sec-Fetch-Site": "cross-site"}, {}],
    ids=["cross-site", "no-x-csrf"],
)
async def test_a_forged_call_gets_bffs_403(setup: Setup, headers: dict[str, str]) -> None:
    cookie, _ = await logged_in(setup, "mallory")
    answer = await setup.call(cookie, headers=headers)
    assert answer.status == 403
    assert answer.json()["error"] == "csrf_failed"
    assert setup.upstream.seen() == []


async def test_a_method_the_route_refuses_gets_bffs_405(setup: Setup) -> None:
    cookie, _ = await logged_in(setup, "ro")
    answer = await setup.call(cookie, f"{READ_ONLY}/x", method="DELETE")
    assert answer.status == 405
    assert answer.json()["error"] == "method_not_allowed"
    assert setup.upstream.seen() == []
    assert (await setup.call(cookie, f"{READ_ONLY}/x")).status == 200


@pytest.mark.parametrize("path", ["/bff/authz", "/bff//authz", "/bff/%61uthz", "/bff/authz?x=1"])
async def test_the_browser_cannot_reach_the_auth_endpoint(setup: Setup, path: str) -> None:
    cookie, _ = await logged_in(setup, "eve")
    headers = {**CSRF, "X-Original-URI": f"{API}/x", "X-Original-Method": "GET",
               "X-Forwarded-Uri": f"{API}/x", "X-Forwarded-Method": "GET"}  # fmt: skip
    answer = await setup.call(cookie, path, headers=headers)
    assert answer.status == 404
    assert answer.header("Authorization") is None


async def test_a_browser_naming_another_route_in_edge_headers_gets_400(setup: Setup) -> None:
    cookie, _ = await logged_in(setup, "liar")
    # The edge overwrites the headers of its own family; the others pass through as sent.
    lies = {**CSRF, "X-Original-URI": f"{READ_ONLY}/x", "X-Forwarded-Uri": f"{READ_ONLY}/x",
            "X-Original-URL": f"http://x{READ_ONLY}/x", "X-Original-Method": "GET",
            "X-Forwarded-Method": "GET"}  # fmt: skip
    answer = await setup.call(cookie, f"{API}/x", method="DELETE", headers=lies)
    assert answer.status == 400
    assert answer.json()["error"] == "invalid_request"
    assert setup.upstream.seen() == []


async def test_a_traversal_is_refused_by_bff_and_never_proxied(setup: Setup) -> None:
    cookie, _ = await logged_in(setup, "trav")
    answer = await setup.call(cookie, f"{API}/%2e%2e/admin")
    assert answer.status in (400, 404), answer.body  # the edge may refuse before asking bff
    assert setup.upstream.seen() == []


async def test_a_burst_of_100_calls_at_expiry_makes_one_refresh(setup: Setup) -> None:
    cookie, before = await logged_in(setup, "burst")
    assert before.refresh_token and before.access_expires_at is not None
    delay = before.access_expires_at + 0.2 - time.time()
    assert delay < 10, "the OP's access tokens live longer than this test assumes"
    await asyncio.sleep(max(0.0, delay))
    await setup.op.reset_stats()

    answers = await asyncio.gather(*(setup.call(cookie) for _ in range(100)))

    bad = [(a.status, a.body[:200]) for a in answers if a.status != 200]
    assert not bad, f"{len(bad)} of 100 calls failed, e.g. {bad[:3]}"
    # Should a call reach the upstream without a bearer, say what the edge sent in its place
    # (the scheme word only, or "absent"): a placeholder's text points at the edge's config.
    unbearered = [
        [v.split(" ", 1)[0][:48] for v in s.header("Authorization")] or ["absent"]
        for s in setup.upstream.seen()
        if s.token is None
    ]
    assert not unbearered, f"{len(unbearered)} reached the upstream without a bearer: {unbearered}"
    assert await refresh_grants(setup.op) == 1
    after = await setup.session(cookie)
    assert after is not None and after.access_token != before.access_token
    assert {a.json()["bearer"] for a in answers} == {token_digest(after.access_token)}


async def test_after_logout_the_next_call_is_401(setup: Setup) -> None:
    cookie, _ = await logged_in(setup, "bye")
    assert (await setup.call(cookie)).status == 200
    me = await setup.call(cookie, "/bff/user")
    assert me.status == 200
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(
            setup.edge.url + me.json()["logout_url"],
            headers={"Cookie": f"{COOKIE_NAME}={cookie}"},
            allow_redirects=False,
        ) as resp,
    ):
        assert resp.status == 302
    # One bff process: its logout dropped the session from its own cache too. (Other
    # instances see it within session.cache_ttl, 1 s here.)
    setup.upstream.clear()
    answer = await setup.call(cookie)
    assert answer.status == 401
    assert answer.json()["error"] == "session_expired"
    assert setup.upstream.seen() == []


async def test_server_sent_events_stream_through_the_edge(setup: Setup) -> None:
    cookie, data = await logged_in(setup, "sse")
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", **CSRF}
    try:
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
            http.get(f"{setup.edge.url}{API}/__stream/events", headers=headers) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            # The upstream holds "last" until released: "first" arrives only if nothing buffers.
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 20)
            assert first == b"data: first\n\n"
            setup.upstream.release_streams()
            assert await asyncio.wait_for(resp.content.read(), 20) == b"data: last\n\n"
    finally:
        setup.upstream.release_streams()
    [seen] = setup.upstream.seen()
    assert seen.token == data.access_token
    assert seen.header("Cookie") == []


async def test_a_websocket_works_through_the_edge_with_the_bearer(setup: Setup) -> None:
    cookie, data = await logged_in(setup, "ws")
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "Origin": setup.edge.url}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.ws_connect(f"{setup.edge.url}{API}/__stream/ws", headers=headers) as ws,
    ):
        await ws.send_str("hello")
        msg = await ws.receive(timeout=20)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "hello")
    [seen] = setup.upstream.seen()
    assert seen.token == data.access_token
    assert seen.header("Cookie") == []


async def test_a_websocket_from_another_origin_is_refused_at_the_edge(setup: Setup) -> None:
    cookie, _ = await logged_in(setup, "wsx")
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "Origin": "http://evil.example"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{setup.edge.url}{API}/__stream/ws", headers=headers)
    assert refused.value.status == 403
    assert setup.upstream.seen() == []


# -------------------------------------------------------------------------------------------------
# The auth endpoint itself, asked directly


async def authz(
    setup: Setup, headers: Mapping[str, str], *, peer: str = "127.0.0.1", method: str = "GET"
) -> Answer:
    connector = aiohttp.TCPConnector(local_addr=(peer, 0))
    async with (
        aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.request(method, setup.bff.url + "/bff/authz", headers=dict(headers)) as resp,
    ):
        answer = Answer(resp.status, tuple(resp.headers.items()), await resp.text())
    setup.answers.append(answer)
    return answer


def original(cookie: str, **extra: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={cookie}", **CSRF, **extra}


async def test_authz_answers_only_a_trusted_peer(direct: Setup) -> None:
    cookie, data = await logged_in(direct, "direct")
    ask = original(cookie, **{"X-Original-URI": f"{API}/x", "X-Original-Method": "GET"})
    trusted = await authz(direct, ask)
    assert trusted.status == 200
    assert trusted.header("Authorization") == f"Bearer {data.access_token}"
    assert trusted.header("Cache-Control") == "no-store"
    direct.answers.remove(trusted)  # the edge's answer holds the token by design

    untrusted = await authz(direct, ask, peer="127.0.0.2")
    assert untrusted.status == 403
    assert untrusted.json()["error"] == "untrusted_edge"
    assert untrusted.header("Authorization") is None


@pytest.mark.parametrize(
    "where",
    [
        {"X-Forwarded-Uri": f"{API}/x", "X-Forwarded-Method": "GET"},  # Traefik, Caddy
        {"X-Original-URL": f"https://app.example{API}/x?y=1", "X-Original-Method": "GET"},
        {  # ingress-nginx with auth-method: both, from the same $request_uri
            "X-Original-URL": f"https://app.example{API}/x?y=1",
            "X-Original-URI": f"{API}/x?y=1",
            "X-Original-Method": "GET",
            "X-Forwarded-Method": "GET",
        },
    ],
    ids=["x-forwarded", "x-original-url", "agreeing-families"],
)
async def test_authz_reads_each_edges_headers(direct: Setup, where: dict[str, str]) -> None:
    cookie, data = await logged_in(direct, "hdrs")
    answer = await authz(direct, original(cookie, **where), method="POST")
    assert answer.status == 200
    assert answer.header("Authorization") == f"Bearer {data.access_token}"
    direct.answers.remove(answer)


@pytest.mark.parametrize(
    ("where", "status", "error"),
    [
        ({}, 400, "invalid_request"),
        ({"X-Original-URI": f"{API}/x"}, 400, "invalid_request"),  # no method
        (  # two that disagree: which to believe is not bff's guess
            {
                "X-Original-URI": f"{API}/x",
                "X-Forwarded-Uri": f"{READ_ONLY}/x",
                "X-Original-Method": "GET",
            },
            400,
            "invalid_request",
        ),
        (
            {
                "X-Original-URI": f"{API}/x",
                "X-Original-URL": f"http://h{READ_ONLY}/x",
                "X-Original-Method": "GET",
            },
            400,
            "invalid_request",
        ),
        (
            {
                "X-Original-URI": f"{API}/x",
                "X-Original-Method": "GET",
                "X-Forwarded-Method": "DELETE",
            },
            400,
            "invalid_request",
        ),
        ({"X-Original-URI": "api/x", "X-Original-Method": "GET"}, 400, "invalid_request"),
        ({"X-Original-URI": f"{API}/a b", "X-Original-Method": "GET"}, 400, "invalid_request"),
        ({"X-Original-URI": f"{API}/x", "X-Original-Method": "G(T"}, 400, "invalid_request"),
        (
            {"X-Original-URL": "javascript:alert(1)", "X-Original-Method": "GET"},
            400,
            "invalid_request",
        ),
        ({"X-Original-URI": f"{API}/%2e%2e/x", "X-Original-Method": "GET"}, 400, "invalid_path"),
        ({"X-Original-URI": f"{API}/..;/x", "X-Original-Method": "GET"}, 400, "invalid_path"),
        ({"X-Original-URI": "/elsewhere", "X-Original-Method": "GET"}, 404, "not_found"),
        (
            {"X-Original-URI": f"{READ_ONLY}/x", "X-Original-Method": "PUT"},
            405,
            "method_not_allowed",
        ),
        (
            {"X-Original-URI": f"{API}/x", "X-Original-Method": "GET", "X-Bff-Denied": "1"},
            503,
            "temporarily_unavailable",
        ),
    ],
)
async def test_authz_refuses_what_the_proxy_refuses(
    direct: Setup, where: dict[str, str], status: int, error: str
) -> None:
    cookie, _ = await logged_in(direct, "bad")
    answer = await authz(direct, original(cookie, **where))
    assert (answer.status, answer.json()["error"]) == (status, error)
    assert answer.header("Authorization") is None


async def test_authz_refuses_a_repeated_original_uri(direct: Setup) -> None:
    cookie, _ = await logged_in(direct, "twice")
    headers = [
        ("Cookie", f"{COOKIE_NAME}={cookie}"),
        ("X-CSRF", "1"),
        ("X-Original-Method", "GET"),
        ("X-Original-URI", f"{API}/x"),
        ("X-Original-URI", "/elsewhere"),
    ]
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(direct.bff.url + "/bff/authz", headers=headers) as resp,  # type: ignore[arg-type]
    ):
        assert resp.status == 400
        assert "Authorization" not in resp.headers


# -------------------------------------------------------------------------------------------------
# The optional auth cache of the shipped nginx.conf (issue 11, point 3)


async def until_cached(setup: Setup, cookie: str, headers: Mapping[str, str] = CSRF) -> Answer:
    """Call until the edge answered from its auth cache (bounded: 20 calls)."""
    for _ in range(20):
        answer = await setup.call(cookie, headers=headers)
        assert answer.status == 200, answer.body
        if answer.header("X-Test-Authz-Cache") == "HIT":
            return answer
    raise AssertionError("the edge never answered from its auth cache")


async def test_the_auth_cache_answers_repeat_calls_each_session_with_its_own_token(
    cached: Setup,
) -> None:
    alice, alice_data = await logged_in(cached, "cache-a")
    bob, bob_data = await logged_in(cached, "cache-b")
    first = await cached.call(alice)
    assert first.header("X-Test-Authz-Cache") in ("MISS", "EXPIRED")
    hit = await until_cached(cached, alice)
    assert hit.json()["bearer"] == token_digest(alice_data.access_token)
    # Another cookie is another key, even while alice's answer is cached.
    other = await cached.call(bob)
    assert other.header("X-Test-Authz-Cache") != "HIT"
    assert other.json()["bearer"] == token_digest(bob_data.access_token)
    assert {s.token for s in cached.upstream.seen()} == {
        alice_data.access_token,
        bob_data.access_token,
    }


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-CSRF": "1", "Sec-Fetch-Site": "cross-site"}, {"X-CSRF": "1", "Origin": "http://x"}],
    ids=["no-x-csrf", "cross-site", "foreign-origin"],
)
async def test_a_cached_yes_is_no_yes_for_a_forged_call(
    cached: Setup, headers: dict[str, str]
) -> None:
    cookie, _ = await logged_in(cached, "cache-forged")
    await until_cached(cached, cookie)  # the SPA's answer is cached right now
    cached.upstream.clear()
    forged = await cached.call(cookie, headers=headers)
    assert forged.status == 403
    assert forged.header("X-Test-Authz-Cache") is None  # no API answer at all
    assert cached.upstream.seen() == []


async def test_with_the_cache_a_logout_is_seen_once_the_cached_answer_ends(
    cached: Setup,
) -> None:
    cookie, _ = await logged_in(cached, "cache-bye")
    await until_cached(cached, cookie)
    me = await cached.call(cookie, "/bff/user")
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(
            cached.edge.url + me.json()["logout_url"],
            headers={"Cookie": f"{COOKIE_NAME}={cookie}"},
            allow_redirects=False,
        ) as resp,
    ):
        assert resp.status == 302
    # The cost of the cache: calls may pass until the cached answer ends (CACHE_SECONDS).
    deadline = time.monotonic() + CACHE_SECONDS + 20
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = (await cached.call(cookie)).status
        if status == 200:
            await asyncio.sleep(0.2)
    assert status == 401
