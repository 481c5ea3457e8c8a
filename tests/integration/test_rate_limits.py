"""Issue 9, point 9: per-address rate limits on the anonymous endpoints, on real ``bff run``
processes and a real redis-server.

A flood of ``/bff/login`` from one address leaves no more login transactions in Redis than the
configured burst, and every refused request is a 429 with ``Retry-After`` and a JSON error. Two
instances on one Redis share one bucket: the limit is per address, not per process. A dead Redis
makes the limiter fail open, and the login a clear 503, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from bff.keys import SessionSecret, store_id
from tests.support.bff_procs import BffCluster, BffProcess, base_config, write_config
from tests.support.procs import OidcProvider, RedisServer

BURST = 5
# 1000 s per token: no refill can sneak into a test, however slow the machine.
LIMITS = {"login": {"per_second": 0.001, "burst": BURST}}
FLOOD = 40
KEYS = ["rate-limit-test-key-" + "r" * 24]


def config(workdir: Path, redis_server: RedisServer, oidc_op: OidcProvider, url: str) -> Path:
    # No login completes here: the client need not be registered at the OP.
    settings = base_config(
        public_url=url,
        issuer=oidc_op.issuer,
        client={"client_id": "rate-limited", "client_secret": "unused"},
        store=redis_server.url,
        keys=KEYS,
        static=workdir / "static",
    )
    settings["rate_limits"] = LIMITS
    return write_config(workdir, settings)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the shared server, with no rate-limit bucket before or after the test.

    Every test on this machine comes from 127.0.0.1: a bucket left behind would limit the next
    test's logins, and one left by an earlier test would shrink this one's burst.
    """
    client = aioredis.from_url(redis_server.url)

    async def clear() -> None:
        async for key in client.scan_iter(match="bff:{rl:*"):
            await client.delete(key)

    await clear()
    try:
        yield client
    finally:
        await clear()
        await client.aclose()


@pytest.fixture
def one_bff(
    tmp_path: Path, redis_server: RedisServer, oidc_op: OidcProvider
) -> Iterator[BffProcess]:
    proc = BffProcess(tmp_path / "bff.yaml")
    config(tmp_path, redis_server, oidc_op, proc.url)
    with proc:
        yield proc


@pytest.fixture
def two_bffs(
    tmp_path: Path, redis_server: RedisServer, oidc_op: OidcProvider
) -> Iterator[BffCluster]:
    path = config(tmp_path, redis_server, oidc_op, "http://127.0.0.1:8080")
    with BffCluster(path, 2) as cluster:
        yield cluster


def tx_key(location: str) -> bytes:
    """The login transaction a /bff/login redirect stored (layout: bff/sessions.py)."""
    state = URL(location).query["state"]
    return f"bff:{{{store_id(SessionSecret(state), 'tx')}}}:tx".encode()


async def tx_keys(redis: aioredis.Redis) -> set[bytes]:
    return {k async for k in redis.scan_iter(match="bff:*:tx")}


async def get_login(http: aiohttp.ClientSession, url: str, i: int) -> tuple[int, Any, str]:
    # A different X-Forwarded-For on each request: with no trusted proxy, it changes nothing.
    headers = {"X-Forwarded-For": f"198.51.100.{i % 250}", "Accept": "application/json"}
    async with http.get(f"{url}/bff/login", headers=headers, allow_redirects=False) as resp:
        return resp.status, resp.headers.copy(), await resp.text()


async def test_a_login_flood_from_one_address_leaves_at_most_burst_transactions(
    one_bff: BffProcess, redis: aioredis.Redis
) -> None:
    before = await tx_keys(redis)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        answers = await asyncio.gather(*(get_login(http, one_bff.url, i) for i in range(FLOOD)))

    allowed = [headers["Location"] for status, headers, _ in answers if status == 302]
    refused = [(headers, body) for status, headers, body in answers if status == 429]
    assert len(allowed) == BURST, [a[0] for a in answers]
    assert len(refused) == FLOOD - BURST
    for headers, body in refused:
        assert headers["Content-Type"].startswith("application/json")
        error = json.loads(body)
        assert error["error"] == "rate_limited" and error["error_description"]
        assert headers["Retry-After"].isdigit() and int(headers["Retry-After"]) >= 1
        assert "Set-Cookie" not in headers

    # Exactly the allowed logins' transactions are in Redis; the refused ones stored nothing.
    new = await tx_keys(redis) - before
    assert new == {tx_key(location) for location in allowed}
    assert len(new) <= BURST
    # The bucket is one key for the address, and it expires by itself.
    buckets = [k async for k in redis.scan_iter(match="bff:{rl:*}:login")]
    assert len(buckets) == 1
    assert 0 < await redis.pttl(buckets[0]) <= BURST / 0.001 * 1000


async def test_two_instances_share_one_bucket(two_bffs: BffCluster, redis: aioredis.Redis) -> None:
    statuses: dict[str, list[int]] = {url: [] for url in two_bffs.urls}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for i in range(2 * BURST):  # in turn, one at a time: A, B, A, B, ...
            url = two_bffs.urls[i % 2]
            status, _, body = await get_login(http, url, i)
            assert status in (302, 429), body
            statuses[url].append(status)
    # Per-process buckets would have allowed every one of these ten.
    assert sum(s.count(302) for s in statuses.values()) == BURST
    for url, seen in statuses.items():
        assert seen.count(302) >= 2 and seen.count(429) >= 2, (url, seen)


async def test_a_dead_store_makes_login_a_503_not_a_500_and_the_limiter_fails_open(
    one_bff: BffProcess, redis: aioredis.Redis, redis_server: RedisServer, ensure_running: None
) -> None:
    redis_server.stop()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for i in range(3):
                status, headers, body = await get_login(http, one_bff.url, i)
                assert status == 503, body
                assert json.loads(body)["error"] == "store_unavailable"
                assert headers["Retry-After"].isdigit()
    finally:
        redis_server.restart()
    logs = one_bff.full_logs()
    assert "ratelimit.fail_open" in logs
    assert "request.failed" not in logs and "Traceback" not in logs
    # Redis is back (empty): logins start again, limited again, with no restart of bff.
    deadline = time.monotonic() + 20
    status = 503
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        while status == 503 and time.monotonic() < deadline:
            status, _, _ = await get_login(http, one_bff.url, 0)
            if status == 503:
                await asyncio.sleep(0.2)
        assert status == 302
        answers = [(await get_login(http, one_bff.url, i))[0] for i in range(BURST)]
    assert answers.count(302) == BURST - 1 and answers.count(429) == 1
