"""Silent refresh across real bff processes, a real redis-server and the real OP (issue 4).

Three ``bff run`` processes share one Redis, like instances behind a load balancer. The OP issues
access tokens for 5 s and rotates refresh tokens: presenting a consumed refresh token revokes the
whole grant, so any double refresh anywhere would end the session, and the OP's own count of
``refresh_token`` grants shows how many refreshes happened. ``oidc.refresh_skew`` is 1 s.

Every response the "SPA" gets is recorded and checked for every token the test has seen (the
upstream's bearer tokens, the refresh and ID tokens read from the store): none may leak.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from bff.keys import Keyring, SessionSecret, store_id
from bff.sessions import SessionData, lock_key
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffCluster,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    op_delay_refresh,
    op_fail_refresh,
    read_session,
    token_digest,
    write_config,
)
from tests.support.procs import OidcProvider, RedisServer

LEASE = 5.0  # TokenRefresher's default lock lease
HTTP_TIMEOUT = 3.0  # oidc.http_timeout in base_config
API = "/api/echo"


# -------------------------------------------------------------------------------------------------
# Fixtures: one upstream, one OP client, three bff instances for the whole module


@dataclass(slots=True)
class Env:
    cluster: BffCluster
    upstream: EchoUpstream
    op: OidcProvider
    redis: RedisServer
    client: dict[str, Any]
    keys: list[str]
    workdir: Path
    responses: list[Response] = field(default_factory=list)

    @property
    def store_url(self) -> str:
        return self.redis.url

    async def session(self, cookie: str) -> SessionData | None:
        return await read_session(self.store_url, self.keys, cookie)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def _register(op: OidcProvider, redirect_uri: str, **kwargs: Any) -> dict[str, Any]:
    client: dict[str, Any] = asyncio.run(op.register_client([redirect_uri], **kwargs))
    return client


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture(scope="module")
def env(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("refresh")
    keys = [secrets.token_urlsafe(32)]
    config = workdir / "bff.yaml"
    cluster = BffCluster(config, 3)
    public_url = cluster[0].url
    client = _register(oidc_op, f"{public_url}/bff/callback")
    write_config(
        workdir,
        base_config(
            public_url=public_url,
            issuer=oidc_op.issuer,
            client=client,
            store=redis_server.url,
            keys=keys,
            static=workdir / "static",
            upstreams=[{"path": API, "url": upstream.url, "token": "user"}],
        ),
    )
    with cluster:
        yield Env(cluster, upstream, oidc_op, redis_server, client, keys, workdir)


@pytest.fixture
async def spa(env: Env) -> AsyncIterator[Spa]:
    """The SPA's HTTP client; after the test, no response it got may contain a token."""
    env.upstream.clear()
    await env.op.reset_stats()  # also turns the OP's fault injection off
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as http:
        spa = Spa(env, http)
        yield spa
    for proc in env.cluster:
        if not proc.is_running():
            proc.start()  # a test killed it; the next test gets three instances again
    tokens = {s.token for s in env.upstream.seen() if s.token} | spa.known_tokens
    assert tokens, "the test saw no token at all: the leak check below would be vacuous"
    for response in spa.responses:
        text = response.body + "".join(f"{k}: {v}\n" for k, v in response.headers)
        leaked = [t for t in tokens if t in text]
        assert not leaked, f"a token reached the SPA in a {response.status} response"


@dataclass(slots=True)
class Spa:
    env: Env
    http: aiohttp.ClientSession
    responses: list[Response] = field(default_factory=list)
    known_tokens: set[str] = field(default_factory=set)

    async def call(
        self, base: str, cookie: str, method: str = "GET", path: str = f"{API}/items?q=1"
    ) -> Response:
        headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "X-CSRF": "1"}
        data = b'{"n": 1}' if method == "POST" else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, base + path, headers=headers, data=data) as resp:
            response = Response(resp.status, tuple(resp.headers.items()), await resp.text())
        self.responses.append(response)
        return response

    async def calls(self, plan: Iterable[tuple[str, str]]) -> list[Response]:
        """Fire ``(base_url, cookie)`` calls all at once."""
        return list(await asyncio.gather(*(self.call(base, cookie) for base, cookie in plan)))

    async def stored(self, cookie: str) -> SessionData | None:
        """The session record, decrypted (raises if it is corrupted); its tokens join the check."""
        data = await self.env.session(cookie)
        if data is not None:
            self.known_tokens.update(
                t for t in (data.access_token, data.refresh_token, data.id_token) if t
            )
        return data


async def login_users(env: Env, spa: Spa, count: int, prefix: str) -> list[str]:
    """``count`` sessions, logged in through the instances in turn."""
    urls = env.cluster.urls
    cookies = await asyncio.gather(
        *(login(urls[i % len(urls)], f"{prefix}{i}") for i in range(count))
    )
    for cookie in cookies:
        assert await spa.stored(cookie) is not None
    return list(cookies)


async def wait_for_expiry(sessions: Sequence[SessionData], margin: float = 0.2) -> None:
    """Sleep until every session's access token has expired (bounded: TTL is 5 s)."""
    deadline = max(s.access_expires_at or 0.0 for s in sessions) + margin
    delay = deadline - time.time()
    assert delay < 10, "the OP's access tokens live longer than these tests assume"
    await asyncio.sleep(max(0.0, delay))


def assert_ok(responses: Sequence[Response]) -> None:
    bad = [(r.status, r.body[:200]) for r in responses if r.status != 200]
    assert not bad, f"{len(bad)} of {len(responses)} calls failed, e.g. {bad[:3]}"
    for r in responses:
        assert r.json()["ok"] is True
        assert r.json()["bearer"], "the upstream got no bearer token"


async def refresh_grants(op: OidcProvider) -> tuple[int, int]:
    """(refresh_token grants, failed ones) at the OP since the test's reset."""
    stats = await op.stats()
    return stats["token"]["refresh_token"], stats["token_errors"]["refresh_token"]


def basic_auth(client: dict[str, Any]) -> str:
    pair = f"{client['client_id']}:{client['client_secret']}".encode()
    return "Basic " + base64.b64encode(pair).decode()


async def lock_exists(env: Env, cookie: str) -> bool:
    secret = Keyring(env.keys).unsign(cookie)
    assert secret is not None
    r = aioredis.from_url(env.store_url)
    try:
        return bool(await r.exists(lock_key(store_id(SessionSecret(secret)))))
    finally:
        await r.aclose()


# -------------------------------------------------------------------------------------------------
# 1, 2: many calls at expiry, one refresh per session


async def test_a_hundred_calls_on_three_instances_at_expiry_make_one_refresh(
    env: Env, spa: Spa
) -> None:
    [cookie] = await login_users(env, spa, 1, "alice")
    before = await spa.stored(cookie)
    assert before is not None and before.refresh_token
    await wait_for_expiry([before])
    await env.op.reset_stats()

    urls = env.cluster.urls
    responses = await spa.calls((urls[i % 3], cookie) for i in range(100))

    assert_ok(responses)
    assert await refresh_grants(env.op) == (1, 0)
    after = await spa.stored(cookie)
    assert after is not None
    assert after.version == before.version + 1
    assert after.refresh_token and after.refresh_token != before.refresh_token
    assert after.access_token != before.access_token
    assert after.access_expires_at is not None and after.access_expires_at > time.time()
    # every call went out with the one new token, none with the expired one
    assert {r.json()["bearer"] for r in responses} == {token_digest(after.access_token)}

    # the session goes on working on every instance, without another refresh
    assert_ok(await spa.calls((url, cookie) for url in urls))
    assert await refresh_grants(env.op) == (1, 0)


async def test_twenty_sessions_at_expiry_make_one_refresh_each(env: Env, spa: Spa) -> None:
    cookies = await login_users(env, spa, 20, "user")
    before = [await spa.stored(c) for c in cookies]
    assert all(b is not None for b in before)
    await wait_for_expiry([b for b in before if b is not None])
    await env.op.reset_stats()

    urls = env.cluster.urls
    plan = [(urls[(i + j) % 3], cookie) for j in range(15) for i, cookie in enumerate(cookies)]
    responses = await spa.calls(plan)

    assert_ok(responses)
    assert await refresh_grants(env.op) == (20, 0)
    for cookie, old in zip(cookies, before, strict=True):
        new = await spa.stored(cookie)
        assert new is not None and old is not None
        assert new.version == old.version + 1
        assert new.refresh_token != old.refresh_token
    # each session's calls all carried that session's one new token
    digests = {token_digest(d.access_token) for c in cookies if (d := await spa.stored(c))}
    assert {r.json()["bearer"] for r in responses} == digests
    assert_ok(await spa.calls((urls[i % 3], c) for i, c in enumerate(cookies)))
    assert await refresh_grants(env.op) == (20, 0)


# -------------------------------------------------------------------------------------------------
# 3: the lock holder dies mid-refresh


@pytest.mark.parametrize(
    "op_handles_orphan",
    [
        pytest.param(False, id="orphaned-request-never-reaches-op"),
        pytest.param(True, id="op-rotates-for-a-dead-holder"),
    ],
)
async def test_killing_the_lock_holder_mid_refresh_leaves_the_session_refreshed_or_cleanly_expired(
    env: Env, spa: Spa, op_handles_orphan: bool
) -> None:
    [cookie] = await login_users(env, spa, 1, "kim")
    before = await spa.stored(cookie)
    assert before is not None
    await wait_for_expiry([before])
    await env.op.reset_stats()
    # The OP holds refresh grants 3 s: long enough to kill the holder while its request waits.
    await op_delay_refresh(env.op, 3000, drop_if_disconnected=not op_handles_orphan)

    holder, others = env.cluster[0], env.cluster.procs[1:]
    doomed = asyncio.create_task(spa.call(holder.url, cookie))
    for _ in range(100):  # bounded: 2 s
        if await lock_exists(env, cookie):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the first instance never took the refresh lock")
    await asyncio.sleep(0.3)  # its token request is at the OP now
    holder.kill()
    killed_at = time.monotonic()
    # Off for the survivors; the held request keeps the setting it arrived with.
    await op_delay_refresh(env.op, 0)
    with pytest.raises(aiohttp.ClientError):
        await doomed

    responses = await spa.calls((others[i % 2].url, cookie) for i in range(20))
    waited = time.monotonic() - killed_at

    # the survivors went on within the lease (plus one OP round trip), not after a timeout
    assert waited < LEASE + 2.0, f"the other instances waited {waited:.1f} s"
    statuses = {r.status for r in responses}
    assert len(statuses) == 1, f"instances disagree about the session: {statuses}"
    after = await spa.stored(cookie)  # raises if the record is corrupted
    grants, failed = await refresh_grants(env.op)
    if op_handles_orphan:
        # The OP rotated for the dead holder; the survivor's refresh reused the old token, so
        # the OP revoked the grant: the session ends cleanly, everywhere.
        assert statuses == {401}
        assert {r.json()["error"] for r in responses} == {"session_expired"}
        assert after is None
        assert (grants, failed) == (2, 1)
        again = await spa.call(others[0].url, cookie)
        assert again.status == 401
    else:
        assert_ok(responses)
        assert (grants, failed) == (1, 0)
        assert after is not None
        assert after.version == before.version + 1
        assert after.refresh_token != before.refresh_token
        assert_ok(await spa.calls((p.url, cookie) for p in others))
        assert await refresh_grants(env.op) == (1, 0)


# -------------------------------------------------------------------------------------------------
# 4: the OP fails; a revoked grant


async def test_an_op_answering_503_gives_503_and_keeps_the_session_until_it_recovers(
    env: Env, spa: Spa
) -> None:
    [cookie] = await login_users(env, spa, 1, "olga")
    before = await spa.stored(cookie)
    assert before is not None
    await wait_for_expiry([before])
    await env.op.reset_stats()
    await op_fail_refresh(env.op, 503)

    urls = env.cluster.urls
    responses = await spa.calls((urls[i % 3], cookie) for i in range(9))

    assert {r.status for r in responses} == {503}
    for r in responses:
        assert r.json()["error"] == "provider_unavailable"
        assert int(r.header("Retry-After") or 0) > 0
    kept = await spa.stored(cookie)
    assert kept is not None
    assert (kept.version, kept.refresh_token) == (before.version, before.refresh_token)

    await op_fail_refresh(env.op, 0)
    assert_ok(await spa.calls((url, cookie) for url in urls))
    grants, failed = await refresh_grants(env.op)
    assert grants - failed == 1, "after the outage exactly one refresh succeeded"
    assert failed <= 3, "while the OP failed, each instance tried about once, not per call"


async def test_an_op_stopped_mid_refresh_gives_503_and_the_session_refreshes_once_it_is_back(
    env: Env, spa: Spa
) -> None:
    [cookie] = await login_users(env, spa, 1, "stan")
    before = await spa.stored(cookie)
    assert before is not None
    await wait_for_expiry([before])
    await env.op.reset_stats()
    pid = env.op.pid
    assert pid is not None

    os.kill(pid, signal.SIGSTOP)  # the OP hangs: connections open, nothing answers
    try:
        started = time.monotonic()
        responses = await spa.calls((url, cookie) for url in env.cluster.urls)
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)

    assert {r.status for r in responses} == {503}, [r.body for r in responses]
    assert all(int(r.header("Retry-After") or 0) > 0 for r in responses)
    # One OP timeout (http_timeout 3 s) for everyone: the instances that waited on the lock
    # learn that the holder failed instead of each trying the hung OP in turn.
    assert waited < HTTP_TIMEOUT + 1.5, f"a hung OP held the SPA's calls for {waited:.1f} s"
    kept = await spa.stored(cookie)
    assert kept is not None

    # The holder's request was in the stopped OP's socket buffer; the OP carries it out once it
    # runs again. bff keeps waiting for that answer (refresh.py), so the rotation is not lost.
    # A busy machine may need a few rounds before the OP catches up: 503 until then, never 401.
    await wait_until_refreshed(spa, cookie, before)
    assert_ok(await spa.calls((url, cookie) for url in env.cluster.urls))
    grants, failed = await refresh_grants(env.op)
    assert grants - failed == 1, "exactly one rotation, the one bff waited for"


async def wait_until_refreshed(spa: Spa, cookie: str, before: SessionData) -> None:
    """Call on every instance until all answer 200 (bounded); a 401 at any point fails."""
    urls = spa.env.cluster.urls
    for _ in range(30):  # bounded: 30 rounds, each at most one OP timeout plus a second
        responses = await spa.calls((url, cookie) for url in urls)
        statuses = {r.status for r in responses}
        assert statuses <= {200, 503}, [r.body for r in responses if r.status not in (200, 503)]
        if statuses == {200}:
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("the session never refreshed after the OP came back")
    after = await spa.stored(cookie)
    assert after is not None and after.refresh_token != before.refresh_token


async def test_an_op_answering_after_the_timeout_does_not_lose_the_rotated_refresh_token(
    env: Env, spa: Spa
) -> None:
    """The OP carries the refresh out at once but answers after bff's http_timeout (3 s), as an
    overloaded OP does: the callers get 503, and the holder still stores the rotated tokens, so
    the next call does not present the consumed refresh token (which would revoke the grant)."""
    [cookie] = await login_users(env, spa, 1, "otto")
    before = await spa.stored(cookie)
    assert before is not None
    await wait_for_expiry([before])
    await env.op.reset_stats()
    await op_delay_refresh(env.op, int((HTTP_TIMEOUT + 1.5) * 1000), after=True)

    responses = await spa.calls((url, cookie) for url in env.cluster.urls)

    assert {r.status for r in responses} == {503}, [r.body for r in responses]
    await op_delay_refresh(env.op, 0)
    await wait_until_refreshed(spa, cookie, before)
    assert await refresh_grants(env.op) == (1, 0)


async def test_a_revoked_grant_ends_the_session_with_401_session_expired(
    env: Env, spa: Spa
) -> None:
    [cookie] = await login_users(env, spa, 1, "rita")
    before = await spa.stored(cookie)
    assert before is not None and before.refresh_token
    meta = await env.op.discovery()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            meta["revocation_endpoint"],
            data={"token": before.refresh_token, "token_type_hint": "refresh_token"},
            headers={"Authorization": basic_auth(env.client)},
        ) as resp,
    ):
        assert resp.status == 200
    await wait_for_expiry([before])

    responses = await spa.calls((url, cookie) for url in env.cluster.urls)

    assert {r.status for r in responses} == {401}
    assert {r.json()["error"] for r in responses} == {"session_expired"}
    assert await spa.stored(cookie) is None
    assert await refresh_grants(env.op) == (1, 1)  # one attempt, then the session was gone
    assert (await spa.call(env.cluster.urls[0], cookie, path="/bff/user")).status == 401


# -------------------------------------------------------------------------------------------------
# Upstream 401, and an OP that gives no refresh token


async def test_an_upstream_401_makes_one_forced_refresh_and_one_retry(env: Env, spa: Spa) -> None:
    [cookie] = await login_users(env, spa, 1, "uma")
    before = await spa.stored(cookie)
    assert before is not None and before.access_expires_at is not None
    assert before.access_expires_at - time.time() > 2, "the token must still look valid"
    env.upstream.reject(before.access_token)  # e.g. revoked at the resource server

    response = await spa.call(env.cluster.urls[1], cookie)

    assert_ok([response])
    after = await spa.stored(cookie)
    assert after is not None and after.access_token != before.access_token
    assert response.json()["bearer"] == token_digest(after.access_token)
    seen = [(s.token, s.status) for s in env.upstream.seen()]
    assert seen == [(before.access_token, 401), (after.access_token, 200)]
    assert await refresh_grants(env.op) == (1, 0)

    # a request with a body is not replayed: the upstream's 401 is passed on, once
    env.upstream.reject(after.access_token)
    posted = await spa.call(env.cluster.urls[2], cookie, method="POST")
    assert posted.status == 401
    assert [s.method for s in env.upstream.seen()].count("POST") == 1


async def test_without_a_refresh_token_the_session_ends_when_the_access_token_expires(
    env: Env, spa: Spa
) -> None:
    workdir = env.workdir / "no-refresh"
    proc = BffProcess(workdir / "bff.yaml")
    client = await env.op.register_client(
        [f"{proc.url}/bff/callback"], grant_types=["authorization_code"]
    )
    write_config(
        workdir,
        base_config(
            public_url=proc.url,
            issuer=env.op.issuer,
            client=client,
            store=env.store_url,
            keys=env.keys,
            static=workdir / "static",
            upstreams=[{"path": API, "url": env.upstream.url, "token": "user"}],
        ),
    )
    with proc:
        cookie = await login(proc.url, "nora")
        data = await spa.stored(cookie)
        assert data is not None and data.refresh_token is None
        assert data.access_expires_at is not None

        assert_ok([await spa.call(proc.url, cookie)])
        await wait_for_expiry([data], margin=0.3)
        response = await spa.call(proc.url, cookie)

    assert response.status == 401
    assert response.json()["error"] == "session_expired"
    assert await spa.stored(cookie) is None
    assert await refresh_grants(env.op) == (0, 0)
