"""Rate limits on /bff/login, /bff/callback and /bff/backchannel-logout (issue 9, point 9).

The bucket arithmetic on its own (``bff/store/bucket.py``, which the Redis Lua script mirrors;
the store contract runs both), the per-address keys, failing open when the store is down, and
the 429s of a whole app against the hostile OP on a MemoryStore.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fakeredis
import pytest
from aiohttp.test_utils import TestClient
from fakeredis import aioredis as fake_aioredis
from redis.crc import key_slot

from bff.app import create_app
from bff.config import RateLimit, RateLimitSettings, parse_settings
from bff.errors import RateLimited
from bff.metrics import Metrics
from bff.ratelimit import RateLimiter, bucket_key
from bff.store import SessionStore
from bff.store.bucket import decode, encode, take
from bff.store.memory import MemoryStore
from bff.store.redis import RedisStore
from tests.support.hostile_op import HostileOp

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
KEY = "unit-test-key-0123456789abcdefghijklmnopqrstuvwxyz"
NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": "text/html"}

# -------------------------------------------------------------------------------------------------
# The bucket arithmetic


def test_a_missing_bucket_is_full_and_gives_one_token() -> None:
    result = take(None, 0.0, now=100.0, rate=2.0, burst=5)
    assert (result.allowed, result.retry_after, result.tokens) == (True, 0.0, 4.0)
    assert result.ttl == 0.5  # one token short of full, at 2 tokens/s


def test_the_last_token_then_a_refusal_that_says_when_the_next_one_comes() -> None:
    last = take(1.0, 100.0, now=100.0, rate=2.0, burst=5)
    assert last.allowed and last.tokens == 0.0 and last.ttl == 2.5
    refused = take(0.0, 100.0, now=100.1, rate=2.0, burst=5)
    assert not refused.allowed
    assert refused.tokens == pytest.approx(0.2)
    assert refused.retry_after == pytest.approx(0.4)  # 0.8 of a token at 2 tokens/s


def test_tokens_refill_at_the_rate_and_never_beyond_the_burst() -> None:
    assert take(0.0, 100.0, now=101.0, rate=2.0, burst=5).tokens == 1.0  # 2 back, 1 taken
    assert take(0.0, 100.0, now=1000.0, rate=2.0, burst=5).tokens == 4.0  # capped at burst


def test_a_clock_that_went_backwards_refills_nothing() -> None:
    result = take(0.5, 100.0, now=90.0, rate=2.0, burst=5)
    assert not result.allowed and result.tokens == 0.5


def test_a_bucket_lives_exactly_until_it_would_be_full_again() -> None:
    # 0.001 tokens/s, 3 tokens missing: 3000 s.
    assert take(3.0, 0.0, now=0.0, rate=0.001, burst=5).ttl == 3000.0


@pytest.mark.parametrize(
    "raw",
    [None, b"", b"garbage", b"1.0", b"1 2 3", b"nan 1", b"1 inf", b"-1 5", b"\xff\xfe 1"],
)
def test_an_absent_or_unreadable_state_decodes_as_no_bucket(raw: bytes | None) -> None:
    assert decode(raw) == (None, 0.0)


def test_state_round_trips_through_bytes() -> None:
    assert decode(encode(2.5, 1_700_000_000.123456)) == (2.5, 1_700_000_000.123456)


# -------------------------------------------------------------------------------------------------
# Keys: one bucket per address (IPv6: per /64), hashed, spread over cluster slots


def test_keys_are_per_endpoint_and_address_and_hold_no_plain_address() -> None:
    key = bucket_key("203.0.113.7", "login")
    assert key is not None and key.startswith("bff:{rl:") and key.endswith("}:login")
    assert "203.0.113.7" not in key
    assert bucket_key("203.0.113.7", "callback") != key
    assert bucket_key("203.0.113.8", "login") != key


def test_an_ipv6_subscriber_gets_one_bucket_for_its_whole_64() -> None:
    one = bucket_key("2001:db8:1:2::1", "login")
    assert bucket_key("2001:db8:1:2:ffff:ffff:ffff:ffff", "login") == one
    assert bucket_key("2001:db8:1:3::1", "login") != one


def test_an_ipv4_mapped_address_is_its_ipv4_address() -> None:
    assert bucket_key("::ffff:203.0.113.7", "login") == bucket_key("203.0.113.7", "login")


def test_no_address_means_no_bucket() -> None:
    assert bucket_key("", "login") is None


def test_addresses_spread_over_cluster_slots() -> None:
    slots = {key_slot(str(bucket_key(f"198.51.100.{i}", "login")).encode()) for i in range(50)}
    assert len(slots) > 40


# -------------------------------------------------------------------------------------------------
# The limiter over a store

LIMITS = RateLimitSettings(
    login=RateLimit(per_second=0.001, burst=2),
    callback=RateLimit(per_second=0.001, burst=1),
    backchannel_logout=RateLimit(per_second=0.001, burst=1),
)


async def test_the_limiter_refuses_beyond_the_burst_with_a_retry_after(
    memory_store: MemoryStore,
) -> None:
    metrics = Metrics()
    limiter = RateLimiter(memory_store, LIMITS, metrics)
    await limiter.check("203.0.113.7", "login")
    await limiter.check("203.0.113.7", "login")
    with pytest.raises(RateLimited) as refused:
        await limiter.check("203.0.113.7", "login")
    assert refused.value.status == 429
    assert refused.value.body()["error"] == "rate_limited"
    assert 0 < int(refused.value.headers()["Retry-After"]) <= 1000
    await limiter.check("203.0.113.8", "login")  # another address has its own bucket
    await limiter.check("203.0.113.7", "callback")  # ... and so has another endpoint
    assert metrics.value("bff_rate_limit_total", endpoint="login", outcome="limited") == 1


async def test_a_store_outage_lets_requests_through_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    store = RedisStore(fake_aioredis.FakeRedis(server=server))
    metrics = Metrics()
    limiter = RateLimiter(store, LIMITS, metrics)
    with caplog.at_level(logging.WARNING, logger="bff.ratelimit"):
        for _ in range(5):  # far beyond the burst of 2: nothing refused
            await limiter.check("203.0.113.7", "login")
    assert [r.msg for r in caplog.records if r.name == "bff.ratelimit"] == ["ratelimit.fail_open"]
    assert metrics.value("bff_rate_limit_total", endpoint="login", outcome="store_down") == 5
    server.connected = True
    await limiter.check("203.0.113.7", "login")
    await limiter.check("203.0.113.7", "login")
    with pytest.raises(RateLimited):
        await limiter.check("203.0.113.7", "login")
    await store.close()


# -------------------------------------------------------------------------------------------------
# A whole app: 429 with Retry-After and a JSON error, and nothing done for the refused request


@pytest.fixture
async def op() -> AsyncIterator[HostileOp]:
    async with HostileOp() as hostile:
        yield hostile


def settings_for(op: HostileOp, rate_limits: str) -> Any:
    return parse_settings(
        f"""
public_url: http://127.0.0.1:8080
oidc:
  issuer: {op.issuer}
  client_id: {op.client_id}
  client_secret: {op.client_secret}
  scopes: [openid]
session:
  store: memory://
  cookie: {{name: bff-session, secure: false}}
keys: [{KEY}]
rate_limits: {rate_limits}
"""
    )


LIMITED = (
    "{login: {per_second: 0.001, burst: 3}, callback: {per_second: 0.001, burst: 2},"
    " backchannel_logout: {per_second: 0.001, burst: 2}}"
)


async def start(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    rate_limits: str = LIMITED,
    store: SessionStore | None = None,
) -> tuple[TestClient[Any, Any], SessionStore]:
    store = store if store is not None else MemoryStore()
    client = await aiohttp_client(create_app(settings_for(op, rate_limits), store=store))
    return client, store


def tx_count(store: SessionStore) -> int:
    assert isinstance(store, MemoryStore)
    return sum(1 for k in list(store._data) if k.endswith(":tx") and store._live(k))


async def assert_429(resp: Any) -> None:
    assert resp.status == 429
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == "rate_limited" and body["error_description"]
    assert resp.headers["Retry-After"].isdigit() and int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in resp.headers


async def test_login_beyond_the_burst_is_429_and_stores_no_transaction(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    client, store = await start(aiohttp_client, op)
    for _ in range(3):
        assert (await client.get("/bff/login", allow_redirects=False)).status == 302
    for _ in range(3):
        await assert_429(await client.get("/bff/login", allow_redirects=False))
    assert tx_count(store) == 3
    assert len(op.authorize_requests) == 0  # the test never followed the redirects


async def test_callback_beyond_the_burst_is_429_and_a_navigation_goes_back_to_the_app(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    client, _ = await start(aiohttp_client, op)
    for _ in range(2):
        assert (await client.get("/bff/callback?state=x&code=y")).status == 400
    await assert_429(await client.get("/bff/callback?state=x&code=y"))
    resp = await client.get("/bff/callback?state=x", headers=NAVIGATION, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/?bff_error=rate_limited"


async def test_a_navigation_to_a_limited_login_goes_back_to_its_return_to(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    client, _ = await start(aiohttp_client, op)
    for _ in range(3):
        await client.get("/bff/login", allow_redirects=False)
    resp = await client.get(
        "/bff/login?returnTo=/orders%3Fid%3D7", headers=NAVIGATION, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/orders?id=7&bff_error=rate_limited"


async def test_backchannel_logout_beyond_the_burst_is_429(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    client, _ = await start(aiohttp_client, op)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for _ in range(2):
        resp = await client.post("/bff/backchannel-logout", data=b"logout_token=x", headers=form)
        assert resp.status == 400
    await assert_429(
        await client.post("/bff/backchannel-logout", data=b"logout_token=x", headers=form)
    )


async def test_limits_are_on_by_default_and_off_when_disabled(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    assert settings_for(op, "{}").rate_limits == RateLimitSettings()
    assert RateLimitSettings().enabled
    client, store = await start(
        aiohttp_client, op, rate_limits="{enabled: false, login: {burst: 1}}"
    )
    for _ in range(5):
        assert (await client.get("/bff/login", allow_redirects=False)).status == 302
    assert tx_count(store) == 5


async def test_a_store_outage_makes_login_a_503_never_a_500_or_a_429(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    server = fakeredis.FakeServer()
    store = RedisStore(fake_aioredis.FakeRedis(server=server))
    client, _ = await start(aiohttp_client, op, store=store)
    server.connected = False
    for _ in range(5):
        resp = await client.get("/bff/login", allow_redirects=False)
        assert resp.status == 503
        assert (await resp.json())["error"] == "store_unavailable"
        assert resp.headers["Retry-After"].isdigit()
