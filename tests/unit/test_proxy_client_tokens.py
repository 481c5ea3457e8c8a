"""bff.client_tokens: one grant for many callers and instances, encrypted, renewed in time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bff.client_tokens import ClientTokens, token_key
from bff.errors import ProviderUnavailable, StoreUnavailable
from bff.keys import Keyring
from bff.oidc import TokenRequestRefused, TokenSet
from bff.store import SessionStore
from bff.store.redis import RedisStore

ISSUER = "https://op.example"
KEYRING = Keyring(["k" * 32])


class FakeOp:
    """Counts client_credentials grants; each answers after ``delay`` with a new token."""

    def __init__(self, clock: Any, lifetime: float | None = 300.0, delay: float = 0.01):
        self.clock = clock
        self.lifetime = lifetime
        self.delay = delay
        self.grants: list[tuple[str, ...]] = []
        self.refuse = False

    async def client_credentials(self, scopes: tuple[str, ...] = ()) -> TokenSet:
        self.grants.append(scopes)
        await asyncio.sleep(self.delay)
        if self.refuse:
            raise TokenRequestRefused("unauthorized_client")
        expires_at = None if self.lifetime is None else self.clock() + self.lifetime
        return TokenSet(f"cc-{len(self.grants)}", "Bearer", expires_at, None, None, None)


def tokens(op: FakeOp, store: SessionStore, clock: Any, **kw: Any) -> ClientTokens:
    return ClientTokens(
        op,  # type: ignore[arg-type]
        store,
        KEYRING,
        issuer=ISSUER,
        client_id="shop-bff",
        clock=clock,
        **kw,
    )


async def test_concurrent_calls_in_one_process_cause_one_grant(memory_store, clock) -> None:
    op = FakeOp(clock)
    cc = tokens(op, memory_store, clock)
    got = await asyncio.gather(*(cc.token(("api:read",)) for _ in range(20)))
    assert set(got) == {"cc-1"}
    assert op.grants == [("api:read",)]


async def test_instances_sharing_a_store_cause_one_grant(fake_redis_server, clock) -> None:
    from fakeredis import aioredis as fake_aioredis

    stores = [RedisStore(fake_aioredis.FakeRedis(server=fake_redis_server)) for _ in range(3)]
    op = FakeOp(clock, delay=0.1)
    instances = [tokens(op, s, clock) for s in stores]
    got = await asyncio.gather(*(cc.token() for cc in instances for _ in range(5)))
    assert set(got) == {"cc-1"}
    assert len(op.grants) == 1
    for s in stores:
        await s.close()


async def test_the_stored_token_is_encrypted_under_a_key_without_user_data(
    memory_store, clock
) -> None:
    cc = tokens(FakeOp(clock), memory_store, clock)
    token = await cc.token(("api:read", "api:write"))
    key = token_key(ISSUER, "shop-bff", ("api:write", "api:read"))
    blob = await memory_store.get(key)
    assert blob is not None
    assert token.encode() not in blob
    assert "shop-bff" not in key and "api" not in key
    # Another key ring (the keys rotated away entirely) cannot read it: a new grant follows.
    other_op = FakeOp(clock)
    other = ClientTokens(
        other_op,  # type: ignore[arg-type]
        memory_store,
        Keyring(["z" * 32]),
        issuer=ISSUER,
        client_id="shop-bff",
        clock=clock,
    )
    assert await other.token(("api:read", "api:write")) == "cc-1"
    assert len(other_op.grants) == 1
    assert await memory_store.get(key) != blob


async def test_a_token_is_renewed_shortly_before_it_expires(memory_store, clock) -> None:
    op = FakeOp(clock, lifetime=100.0)
    cc = tokens(op, memory_store, clock, skew=30.0)
    assert await cc.token() == "cc-1"
    clock.advance(74)  # renew at min(30, 100/4) = 25 s before expiry
    assert await cc.token() == "cc-1"
    clock.advance(2)
    assert await cc.token() == "cc-2"
    assert len(op.grants) == 2


async def test_a_token_an_upstream_refused_is_replaced_once(memory_store, clock) -> None:
    op = FakeOp(clock)
    cc = tokens(op, memory_store, clock)
    first = await cc.token()
    again = await asyncio.gather(*(cc.token(reject=first) for _ in range(5)))
    assert set(again) == {"cc-2"}
    assert len(op.grants) == 2
    assert await cc.token(reject=first) == "cc-2"  # the new one is not refused
    assert len(op.grants) == 2


async def test_a_token_without_expires_in_lives_the_default_lifetime(memory_store, clock) -> None:
    op = FakeOp(clock, lifetime=None)
    cc = tokens(op, memory_store, clock, default_lifetime=60.0, skew=10.0)
    await cc.token()
    clock.advance(49)
    await cc.token()
    assert len(op.grants) == 1
    clock.advance(2)
    await cc.token()
    assert len(op.grants) == 2


async def test_an_op_refusing_the_grant_gives_503(memory_store, clock) -> None:
    op = FakeOp(clock)
    op.refuse = True
    with pytest.raises(ProviderUnavailable):
        await tokens(op, memory_store, clock).token()


class DeadStore:
    async def get(self, key: str) -> bytes | None:
        raise StoreUnavailable()

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        raise StoreUnavailable()

    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool:
        raise StoreUnavailable()


async def test_client_routes_keep_working_while_the_store_is_down(clock) -> None:
    op = FakeOp(clock)
    cc = tokens(op, DeadStore(), clock)  # type: ignore[arg-type]
    got = await asyncio.gather(*(cc.token() for _ in range(5)))
    assert set(got) == {"cc-1"}
    assert len(op.grants) == 1


class SameTokenOp(FakeOp):
    """An OP that hands back its cached client-credentials token: every grant is 'cc-1'."""

    async def client_credentials(self, scopes: tuple[str, ...] = ()) -> TokenSet:
        result = await super().client_credentials(scopes)
        return TokenSet("cc-1", "Bearer", result.expires_at, None, None, None)


async def test_refusals_of_a_token_the_op_hands_back_again_do_not_fail_or_multiply(
    memory_store, clock
) -> None:
    op = SameTokenOp(clock)
    cc = tokens(op, memory_store, clock)
    first = await cc.token()
    # 30 concurrent 401s: one forced grant for all of them, no error, the same token back.
    again = await asyncio.gather(*(cc.token(reject=first) for _ in range(30)))
    assert set(again) == {"cc-1"}
    assert len(op.grants) == 2


async def test_forced_renewals_are_rate_limited_however_often_an_upstream_refuses(
    memory_store, clock
) -> None:
    op = FakeOp(clock)
    cc = tokens(op, memory_store, clock, min_forced_interval=10.0)
    token = await cc.token()
    token = await cc.token(reject=token)  # a forced renewal: grant 2
    for _ in range(50):  # an anonymous client hammering a route whose upstream says 401
        assert await cc.token(reject=token) == token
    assert len(op.grants) == 2
    clock.advance(11)
    assert await cc.token(reject=token) != token  # later, a refusal renews once more
    assert len(op.grants) == 3
