"""Issue 9, points 7, 8 and 10, against real ``bff run`` processes, redis-server and the real OP.

7. The OP rotates its signing keys (a restart with new keys that keeps its state): a live session
   refreshes and new logins succeed on every instance; nobody is logged out.
8. 8-second access tokens with the default ``refresh_skew`` (60 s): a burst after expiry costs one
   refresh, steady traffic about one refresh per half lifetime; the log says the tokens are short.
10. A refresh in flight when the user logs out: the tokens it mints are revoked too. An OP that
    publishes its revocation endpoint only in RFC 8414 metadata still gets the revocation; one
    that has none is reported at start-up and by ``bff check-config``.

Each test runs its own OP (they differ in configuration) and the bff instances it needs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bff.sessions import SessionData
from tests.support.bff_procs import (
    COOKIE_NAME,
    ROOT,
    BffCluster,
    EchoUpstream,
    base_config,
    login,
    op_delay_refresh,
    read_session,
    write_config,
)
from tests.support.procs import OidcProvider, RedisServer

API = "/api/echo"
CSRF = {"X-CSRF": "1"}


@dataclass(slots=True)
class Setup:
    op: OidcProvider
    cluster: BffCluster
    redis: RedisServer
    keys: list[str]

    async def call(self, http: aiohttp.ClientSession, index: int, cookie: str) -> int:
        headers = {"Cookie": f"{COOKIE_NAME}={cookie}", **CSRF}
        url = self.cluster.urls[index % len(self.cluster)] + f"{API}/x"
        async with http.get(url, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def stored(self, cookie: str) -> SessionData | None:
        return await read_session(self.redis.url, self.keys, cookie)

    async def refresh_grants(self) -> tuple[int, int]:
        stats = await self.op.stats()
        return stats["token"]["refresh_token"], stats["token_errors"]["refresh_token"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture
def setup_factory(
    redis_server: RedisServer, upstream: EchoUpstream, tmp_path: Path
) -> Iterator[Any]:
    """``make(op, instances, **oidc)``: a cluster of ``bff run`` processes on a client of ``op``."""
    clusters: list[BffCluster] = []

    async def make(op: OidcProvider, instances: int, **oidc: Any) -> Setup:
        workdir = tmp_path / f"bff{len(clusters)}"
        keys = [secrets.token_urlsafe(32)]
        cluster = BffCluster(workdir / "bff.yaml", instances)
        clusters.append(cluster)
        public_url = cluster[0].url
        client = await op.register_client(
            [f"{public_url}/bff/callback"],
            grant_types=["authorization_code", "refresh_token", "client_credentials"],
        )
        config = base_config(
            public_url=public_url,
            issuer=op.issuer,
            client=client,
            store=redis_server.url,
            keys=keys,
            static=workdir / "static",
            upstreams=[{"path": API, "url": upstream.url, "token": "user"}],
            refresh_skew=oidc.pop("refresh_skew", "1s"),
        )
        config["oidc"].update(oidc)
        write_config(workdir, config)
        await asyncio.to_thread(cluster.start)
        return Setup(op, cluster, redis_server, keys)

    yield make
    for cluster in clusters:
        cluster.close()


def _op(**options: Any) -> Iterator[OidcProvider]:
    with OidcProvider(**options) as op:
        yield op


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def wait_for_expiry(data: SessionData, margin: float = 0.3) -> None:
    assert data.access_expires_at is not None
    delay = data.access_expires_at + margin - time.time()
    assert delay < 15, "the OP's access tokens live longer than this test assumes"
    await asyncio.sleep(max(0.0, delay))


def kid_of(jwt: str) -> str:
    import base64

    head = jwt.split(".")[0]
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return str(header.get("kid"))


# -------------------------------------------------------------------------------------------------
# 7: key rotation at the OP


@pytest.mark.parametrize("fixed_kids", [False, True], ids=["new-kids", "same-kids-new-material"])
async def test_a_key_rotation_at_the_op_logs_nobody_out(
    setup_factory: Any, http: aiohttp.ClientSession, fixed_kids: bool
) -> None:
    with OidcProvider(access_ttl=5, persistent=True, fixed_kids=fixed_kids) as op:
        # A long refetch interval: only a refetch that ignores it can find the new keys in time.
        setup = await setup_factory(op, 2, jwks_refetch_interval="300s")
        cookie = await login(setup.cluster.urls[0], "rosa")
        before = await setup.stored(cookie)
        assert before is not None and before.id_token is not None
        assert {await setup.call(http, i, cookie) for i in range(2)} == {200}
        old_keys = await op.jwks()

        await asyncio.to_thread(op.restart)  # same state, new signing keys
        new_keys = await op.jwks()
        assert new_keys != old_keys
        if fixed_kids:
            assert {k["kid"] for k in new_keys["keys"]} == {k["kid"] for k in old_keys["keys"]}

        await wait_for_expiry(before)
        statuses = [await setup.call(http, i, cookie) for i in range(4)]
        assert statuses == [200] * 4, "the live session was logged out by the rotation"
        after = await setup.stored(cookie)
        assert after is not None and after.id_token is not None
        assert after.id_token != before.id_token  # the refreshed ID token was accepted
        if not fixed_kids:
            assert kid_of(after.id_token) != kid_of(before.id_token)
        assert await setup.refresh_grants() == (1, 0)

        # New logins on every instance, each with its own stale key cache.
        for i, url in enumerate(setup.cluster.urls):
            fresh = await login(url, f"newcomer{i}")
            assert await setup.call(http, i, fresh) == 200


# -------------------------------------------------------------------------------------------------
# 8: short-lived access tokens


@pytest.fixture
def short_op() -> Iterator[OidcProvider]:
    yield from _op(access_ttl=8)


async def test_eight_second_tokens_cost_one_refresh_per_burst_and_per_half_lifetime(
    setup_factory: Any, http: aiohttp.ClientSession, short_op: OidcProvider
) -> None:
    setup = await setup_factory(short_op, 3, refresh_skew="60s")  # the default skew
    cookie = await login(setup.cluster.urls[0], "sam")
    before = await setup.stored(cookie)
    assert before is not None and before.access_lifetime == 8
    await wait_for_expiry(before)
    await short_op.reset_stats()

    # A burst of 100 calls of one session across 3 instances, after expiry.
    statuses = await asyncio.gather(*(setup.call(http, i, cookie) for i in range(100)))
    burst_end = time.time()
    assert set(statuses) == {200}
    refreshed = await setup.stored(cookie)
    assert refreshed is not None and refreshed.access_expires_at is not None
    grants, failed = await setup.refresh_grants()
    assert failed == 0
    # Each refresh yields a token that needs none for 4 s (half of 8): within 4 s of the one
    # refresh the burst needed, there can be no other. (A machine so slow that the burst
    # outlasted that may see more, but never more than one per 4 s.)
    received = refreshed.access_expires_at - 8 if grants == 1 else burst_end
    if burst_end < received + 4:
        assert grants == 1
    assert grants <= 2 + (burst_end - (before.access_expires_at or 0)) / 4

    # Steady traffic for about 20 s: refreshes are at least 4 s apart (single flight, and the
    # token bff stores needs none for 4 s), and at least one per 8 s (a token must be valid).
    await short_op.reset_stats()
    started = time.time()
    calls = 0
    while time.time() - started < 20 and calls < 200:  # bounded in time and count
        assert await setup.call(http, calls, cookie) == 200
        calls += 1
        await asyncio.sleep(0.2)
    elapsed = time.time() - started
    grants, failed = await setup.refresh_grants()
    assert failed == 0
    # (+2: the counter was reset a moment before the clock started.) A 60 s skew alone, with
    # 8 s tokens, would refresh on every one of the ~80 calls.
    assert elapsed / 8 - 1 <= grants <= elapsed / 4 + 2, (grants, elapsed, calls)

    # Each instance that saw a token said once that the OP's tokens outlive no skew.
    logs = "".join(p.full_logs() for p in setup.cluster)
    assert "oidc.short_lived_access_tokens" in logs


def test_check_config_says_when_tokens_live_shorter_than_the_skew_and_no_revocation(
    tmp_path: Path,
) -> None:
    with OidcProvider(access_ttl=8, revocation_in="none") as op:
        client = asyncio.run(
            op.register_client(
                ["http://127.0.0.1:8080/bff/callback"],
                grant_types=["authorization_code", "refresh_token", "client_credentials"],
            )
        )
        config = base_config(
            public_url="http://127.0.0.1:8080",
            issuer=op.issuer,
            client=client,
            store="memory://",
            keys=[secrets.token_urlsafe(32)],
            static=tmp_path / "static",
            refresh_skew="60s",
        )
        config["workers"] = 1  # memory:// is refused with several workers
        path = write_config(tmp_path, config)
        result = run_cli("check-config", str(path))
        stats = asyncio.run(op.stats())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "access tokens live 8 s" in result.stderr
    assert "shorter than oidc.refresh_skew (60 s)" in result.stderr
    assert "no revocation_endpoint" in result.stderr
    assert stats["token"]["client_credentials"] == 1


def test_check_config_says_when_it_cannot_learn_the_lifetime(tmp_path: Path) -> None:
    with OidcProvider(access_ttl=8) as op:
        client = asyncio.run(op.register_client(["http://127.0.0.1:8080/bff/callback"]))
        config = base_config(
            public_url="http://127.0.0.1:8080",
            issuer=op.issuer,
            client=client,
            store="memory://",
            keys=[secrets.token_urlsafe(32)],
            static=tmp_path / "static",
        )
        config["workers"] = 1  # memory:// is refused with several workers
        result = run_cli("check-config", str(write_config(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    assert "access token lifetime unknown" in result.stdout
    assert f"revocation endpoint {op.issuer}/token/revocation" in result.stdout
    assert "warning" not in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bff", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -------------------------------------------------------------------------------------------------
# 10: no token outlives a logout


async def logout(setup: Setup, index: int, cookie: str) -> None:
    url = setup.cluster.urls[index]
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", **CSRF}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(f"{url}/bff/user", headers=headers) as resp:
            assert resp.status == 200
            me = await resp.json()
        async with http.get(url + me["logout_url"], headers=headers, allow_redirects=False) as r:
            assert r.status == 302


async def wait_until_dead(op: OidcProvider, account: str) -> dict[str, int]:
    live: dict[str, int] = {}
    for _ in range(100):  # bounded: 10 s
        live = await op.live_tokens(account)
        if live == {"RefreshToken": 0, "AccessToken": 0}:
            break
        await asyncio.sleep(0.1)
    return live


async def test_tokens_minted_by_a_refresh_in_flight_at_logout_are_revoked(
    setup_factory: Any, http: aiohttp.ClientSession
) -> None:
    # This OP revokes only the token it is given (not the grant), so the old tokens that
    # /bff/logout revokes do not take the new ones with them: only bff can.
    with OidcProvider(access_ttl=5, revoke_grant=False) as op:
        setup = await setup_factory(op, 2)
        cookie = await login(setup.cluster.urls[0], "lena")
        before = await setup.stored(cookie)
        assert before is not None
        await wait_for_expiry(before)
        await op.reset_stats()
        # The OP rotates at once, then holds its answer 2 s: the logout comes in between.
        await op_delay_refresh(op, 2000, after=True)
        pending = asyncio.create_task(setup.call(http, 0, cookie))
        for _ in range(100):  # bounded: 10 s
            if (await setup.refresh_grants())[0] == 1:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the refresh never reached the OP")
        await logout(setup, 1, cookie)
        assert await pending in (401, 503)  # the session is gone; never its tokens on the wire
        assert await setup.stored(cookie) is None

        assert await wait_until_dead(op, "lena") == {"RefreshToken": 0, "AccessToken": 0}
        stats = await op.stats()
        # the old refresh token at logout (its access token had expired), the new pair when the
        # refresh found its session gone
        assert stats["revoked"]["RefreshToken"] == 2
        assert stats["revoked"]["AccessToken"] == 1


async def test_an_op_with_revocation_only_in_rfc8414_metadata_gets_the_logout_revocations(
    setup_factory: Any,
) -> None:
    with OidcProvider(revocation_in="rfc8414") as op:
        assert "revocation_endpoint" not in await op.discovery()
        setup = await setup_factory(op, 1)
        cookie = await login(setup.cluster.urls[0], "ada")
        await op.reset_stats()
        await logout(setup, 0, cookie)
        assert await wait_until_dead(op, "ada") == {"RefreshToken": 0, "AccessToken": 0}
        assert (await op.stats())["revocations"] == 2
        assert "oidc.no_revocation_endpoint" not in setup.cluster[0].full_logs()


async def test_an_op_without_a_revocation_endpoint_is_reported_once_at_start_up(
    setup_factory: Any,
) -> None:
    with OidcProvider(revocation_in="none") as op:
        setup = await setup_factory(op, 1)
        await login(setup.cluster.urls[0], "bob")
        logs = setup.cluster[0].full_logs()
        warned = [line for line in logs.splitlines() if "oidc.no_revocation_endpoint" in line]
        assert len(warned) == 1, warned
        assert "logout cannot revoke" in logs
