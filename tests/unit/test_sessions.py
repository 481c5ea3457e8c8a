"""bff.sessions: the session lifecycle on a store, its caches and timeouts, login transactions."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import fakeredis
import pytest
from fakeredis import aioredis as fake_aioredis

from bff.errors import LoginFailed
from bff.keys import new_secret
from bff.sessions import LoginTransaction, SessionData, SessionManager
from bff.store.memory import MemoryStore
from bff.store.redis import RedisStore
from tests.unit.fakes import FakeClock

ACCESS = "AT-0123456789-access-token-value"
REFRESH = "RT-0123456789-refresh-token-value"
ID_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
IDLE = 600.0
ABSOLUTE = 3600.0


def _data(
    clock: FakeClock, *, sub: str = "alice@example.com", sid: str | None = "op-sid-1"
) -> SessionData:
    now = clock()
    return SessionData(
        sub=sub,
        claims={"sub": sub, "name": "Alice Example"},
        access_token=ACCESS,
        access_expires_at=now + 300,
        refresh_token=REFRESH,
        id_token=ID_TOKEN,
        scopes=("openid", "profile"),
        created_at=now,
        expires_at=now + ABSOLUTE,
        sid=sid,
    )


def _manager(store: MemoryStore | RedisStore, clock: FakeClock, **options: float) -> SessionManager:
    settings: dict[str, float] = {"idle_timeout": IDLE, "absolute_timeout": ABSOLUTE}
    settings.update(options)
    return SessionManager(store, clock=clock, **settings)


@pytest.fixture
def sessions(memory_store: MemoryStore, clock: FakeClock) -> SessionManager:
    return _manager(memory_store, clock)


@pytest.fixture
def other_instance(memory_store: MemoryStore, clock: FakeClock) -> SessionManager:
    """A second SessionManager on the same store: another bff instance or worker process."""
    return _manager(memory_store, clock)


# -- create / load / save -----------------------------------------------------------------


async def test_a_created_session_loads_back_by_its_secret(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    loaded = await other_instance.load(created.secret)
    assert loaded is not None
    assert loaded.data == created.data
    assert loaded.id == created.id
    assert loaded.handle == created.handle and loaded.handle not in (created.secret, created.id)


async def test_each_create_gets_a_new_secret_and_id(
    sessions: SessionManager, clock: FakeClock
) -> None:
    a = await sessions.create(_data(clock))
    b = await sessions.create(_data(clock))
    assert a.secret != b.secret and a.id != b.id


async def test_no_cookie_or_an_unknown_secret_loads_nothing(
    sessions: SessionManager, clock: FakeClock
) -> None:
    await sessions.create(_data(clock))
    assert await sessions.load(None) is None
    assert await sessions.load(new_secret()) is None


async def test_a_blob_copied_under_another_sessions_key_does_not_open(
    sessions: SessionManager, memory_store: MemoryStore, clock: FakeClock
) -> None:
    victim = await sessions.create(_data(clock, sub="victim"))
    attacker = await sessions.create(_data(clock, sub="attacker"))
    await memory_store.set(attacker.key, victim.blob, 60)
    assert await sessions.load(attacker.secret, fresh=True) is None


async def test_save_writes_a_new_version(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    saved = await sessions.save(created, dataclasses.replace(created.data, access_token="AT-2"))
    assert saved is not None
    assert saved.data.version == created.data.version + 1
    reloaded = await other_instance.load(created.secret)
    assert reloaded is not None and reloaded.data.access_token == "AT-2"


async def test_a_save_based_on_a_stale_version_returns_none_and_does_not_overwrite(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    here = await sessions.load(created.secret)
    there = await other_instance.load(created.secret)
    assert here is not None and there is not None
    winner = await other_instance.save(
        there, dataclasses.replace(there.data, access_token="AT-new")
    )
    assert winner is not None
    lost = await sessions.save(here, dataclasses.replace(here.data, access_token="AT-stale"))
    assert lost is None
    current = await sessions.load(created.secret, fresh=True)
    assert current is not None and current.data.access_token == "AT-new"
    # The loser's cache does not keep serving its stale view either.
    assert (await sessions.load(created.secret)) == current


async def test_of_two_concurrent_saves_of_one_version_exactly_one_wins(
    sessions: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    results = await asyncio.gather(
        sessions.save(created, dataclasses.replace(created.data, access_token="A")),
        sessions.save(created, dataclasses.replace(created.data, access_token="B")),
    )
    assert sum(r is not None for r in results) == 1


async def test_save_of_an_ended_session_does_not_resurrect_it(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    await other_instance.end(created)
    assert await sessions.save(created, dataclasses.replace(created.data)) is None
    assert await sessions.load(created.secret, fresh=True) is None


# -- the per-process cache ----------------------------------------------------------------


async def test_a_session_ended_on_another_instance_is_gone_here_within_cache_ttl(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    assert await sessions.load(created.secret) is not None  # now in this instance's cache
    elsewhere = await other_instance.load(created.secret)
    assert elsewhere is not None
    await other_instance.end(elsewhere)
    assert await sessions.load(created.secret, fresh=True) is None
    clock.advance(sessions.cache_ttl)
    assert await sessions.load(created.secret) is None


async def test_a_cached_session_is_served_without_the_store_within_cache_ttl(
    sessions: SessionManager, memory_store: MemoryStore, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    await memory_store.delete(created.key)  # behind the manager's back
    clock.advance(sessions.cache_ttl / 2)
    assert await sessions.load(created.secret) is not None
    clock.advance(sessions.cache_ttl / 2)
    assert await sessions.load(created.secret) is None


async def test_concurrent_requests_after_the_cache_lapses_read_the_store_once(
    sessions: SessionManager, memory_store: MemoryStore, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    clock.advance(sessions.cache_ttl)
    reads = 0
    real_get = memory_store.get

    async def slow_get(key: str) -> bytes | None:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)  # every request arrives while the one read is in flight
        return await real_get(key)

    memory_store.get = slow_get  # type: ignore[method-assign]
    loaded = await asyncio.gather(*(sessions.load(created.secret) for _ in range(100)))
    assert reads == 1
    assert all(s is not None and s.id == created.id for s in loaded)


async def test_a_refresh_saved_on_another_instance_is_seen_here_within_cache_ttl(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    there = await other_instance.load(created.secret)
    assert there is not None
    await other_instance.save(there, dataclasses.replace(there.data, access_token="AT-2"))
    clock.advance(sessions.cache_ttl)
    here = await sessions.load(created.secret)
    assert here is not None and here.data.access_token == "AT-2"


async def test_cache_ttl_zero_always_reads_the_store(
    memory_store: MemoryStore, clock: FakeClock
) -> None:
    sessions = _manager(memory_store, clock, cache_ttl=0)
    created = await sessions.create(_data(clock))
    await memory_store.delete(created.key)
    assert await sessions.load(created.secret) is None


async def test_per_process_bookkeeping_stays_bounded_however_many_sessions_pass(
    sessions: SessionManager, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions that simply expire are never ended here; their traces must not pile up."""
    monkeypatch.setattr("bff.sessions._CACHE_MAX", 50)
    for _ in range(200):
        created = await sessions.create(_data(clock))
        await sessions.load(created.secret, fresh=True)
        clock.advance(IDLE / 10)
    assert len(sessions._cache) <= 50
    assert len(sessions._touched) <= 50


# -- timeouts -----------------------------------------------------------------------------


async def test_an_idle_session_ends_after_idle_timeout(
    sessions: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    clock.advance(IDLE - 1)
    assert await sessions.load(created.secret, fresh=True) is not None
    clock.advance(IDLE + 1)
    assert await sessions.load(created.secret) is None


async def test_activity_slides_the_idle_timeout(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    for _ in range(5):  # 5 x 0.6 idle: long past one idle timeout, yet active all along
        clock.advance(IDLE * 0.6)
        assert await sessions.load(created.secret) is not None
    clock.advance(IDLE * 0.6)
    # Seen on another instance too: the sliding lives in the store, not in a local cache.
    assert await other_instance.load(created.secret) is not None
    clock.advance(IDLE + 1)
    assert await other_instance.load(created.secret) is None


async def test_the_absolute_timeout_ends_an_active_session(
    sessions: SessionManager, memory_store: MemoryStore, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock))
    elapsed = 0.0
    while elapsed + IDLE / 2 < ABSOLUTE:
        clock.advance(IDLE / 2)
        elapsed += IDLE / 2
        assert await sessions.load(created.secret) is not None
    # The store TTL never reaches past the absolute end...
    left = await memory_store.ttl(created.key)
    assert left is not None and left <= ABSOLUTE - elapsed + 1e-6
    clock.advance(ABSOLUTE - elapsed)
    assert await sessions.load(created.secret) is None
    assert await memory_store.get(created.key) is None


async def test_a_cached_session_is_not_served_past_its_absolute_end(
    memory_store: MemoryStore, clock: FakeClock
) -> None:
    sessions = _manager(memory_store, clock, cache_ttl=5)
    data = dataclasses.replace(_data(clock), expires_at=clock() + 2)
    created = await sessions.create(data)
    assert await sessions.load(created.secret) is not None
    clock.advance(2)
    assert await sessions.load(created.secret) is None


# -- indexes by sub and OP sid ------------------------------------------------------------


async def test_sessions_are_found_and_ended_by_sub_and_by_op_sid(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    laptop = await sessions.create(_data(clock, sub="alice", sid="op-1"))
    phone = await sessions.create(_data(clock, sub="alice", sid="op-2"))
    bob = await sessions.create(_data(clock, sub="bob", sid="op-3"))
    assert sorted(await other_instance.ids_for(sub="alice")) == sorted([laptop.id, phone.id])
    assert await other_instance.ids_for(sid="op-1") == [laptop.id]
    assert await other_instance.end_matching(sid="op-1") == 1
    assert await other_instance.ids_for(sub="alice") == [phone.id]
    assert await other_instance.end_matching(sub="alice") == 1
    assert await other_instance.ids_for(sub="alice") == []
    clock.advance(sessions.cache_ttl)
    assert await sessions.load(laptop.secret) is None
    assert await sessions.load(phone.secret) is None
    assert await sessions.load(bob.secret) is not None


async def test_ending_a_session_removes_it_from_its_indexes(
    sessions: SessionManager, memory_store: MemoryStore, clock: FakeClock
) -> None:
    created = await sessions.create(_data(clock, sub="alice", sid="op-1"))
    await sessions.end(created)
    assert await sessions.ids_for(sub="alice", sid="op-1") == []
    assert await sessions.load(created.secret) is None
    assert all(not members for members in memory_store._indexes.values())


async def test_index_entries_expire_with_the_session(
    sessions: SessionManager, clock: FakeClock
) -> None:
    await sessions.create(_data(clock, sub="alice", sid="op-1"))
    clock.advance(ABSOLUTE + 1)
    assert await sessions.ids_for(sub="alice", sid="op-1") == []


# -- at rest ------------------------------------------------------------------------------


def _b(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value


async def _dump(client: fake_aioredis.FakeRedis) -> list[bytes]:
    """Every key and every stored byte, as an attacker with a Redis dump would see them."""
    out: list[bytes] = []
    for key in await client.keys("*"):
        out.append(_b(key))
        kind = _b(await client.type(key)).decode()
        if kind == "string":
            out.append(_b(await client.get(key)))
        elif kind == "zset":
            out.extend(_b(m) for m in await client.zrange(key, 0, -1))
        else:
            pytest.fail(f"unexpected key type {kind} at {key!r}")
    return out


async def test_the_store_holds_no_token_no_secret_and_no_plain_identity() -> None:
    client = fake_aioredis.FakeRedis(server=fakeredis.FakeServer())
    sessions = SessionManager(RedisStore(client), idle_timeout=IDLE, absolute_timeout=ABSOLUTE)
    clock = FakeClock(start=sessions._clock())
    session = await sessions.create(_data(clock, sub="alice@example.com", sid="op-sid-secret"))
    saved = await sessions.save(
        session, dataclasses.replace(session.data, access_token=ACCESS + "2")
    )
    assert saved is not None
    browser = new_secret()
    tx = LoginTransaction("state-value-123", "nonce-value-456", "verifier-value-789", "/app", 0.0)
    await sessions.begin_login(browser, tx)
    dump = await _dump(client)
    assert len(dump) >= 5
    forbidden = [
        ACCESS, REFRESH, ID_TOKEN, session.secret, browser, "alice@example.com",
        "Alice Example", "op-sid-secret", "state-value-123", "nonce-value-456",
        "verifier-value-789",
    ]  # fmt: skip
    for raw in dump:
        for value in forbidden:
            assert value.encode() not in raw, f"{value!r} readable in the store"


# -- login transactions -------------------------------------------------------------------


def _tx(clock: FakeClock, state: str = "state-1") -> LoginTransaction:
    return LoginTransaction(state, "nonce-1", "verifier-1", "/app", clock())


async def test_a_login_transaction_finishes_once_in_its_browser(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    browser = new_secret()
    tx = _tx(clock)
    await sessions.begin_login(browser, tx)
    assert await other_instance.finish_login(browser, "state-1") == tx
    with pytest.raises(LoginFailed):
        await sessions.finish_login(browser, "state-1")


async def test_a_login_transaction_does_not_finish_in_another_browser(
    sessions: SessionManager, clock: FakeClock
) -> None:
    browser = new_secret()
    await sessions.begin_login(browser, _tx(clock))
    with pytest.raises(LoginFailed):
        await sessions.finish_login(new_secret(), "state-1")
    with pytest.raises(LoginFailed):
        await sessions.finish_login(None, "state-1")
    # The foreign attempt did not burn the real browser's login.
    assert (await sessions.finish_login(browser, "state-1")).state == "state-1"


@pytest.mark.parametrize("state", [None, "", "state-2", "state-1 ", "STATE-1"])
async def test_an_unknown_or_missing_state_fails(
    sessions: SessionManager, clock: FakeClock, state: str | None
) -> None:
    browser = new_secret()
    await sessions.begin_login(browser, _tx(clock))
    with pytest.raises(LoginFailed):
        await sessions.finish_login(browser, state)


async def test_a_login_transaction_expires_after_login_timeout(
    sessions: SessionManager, clock: FakeClock
) -> None:
    browser = new_secret()
    await sessions.begin_login(browser, _tx(clock))
    clock.advance(sessions.login_timeout + 1)
    with pytest.raises(LoginFailed):
        await sessions.finish_login(browser, "state-1")


async def test_of_two_racing_callbacks_with_one_state_exactly_one_finishes(
    sessions: SessionManager, other_instance: SessionManager, clock: FakeClock
) -> None:
    browser = new_secret()
    await sessions.begin_login(browser, _tx(clock))
    results = await asyncio.gather(
        sessions.finish_login(browser, "state-1"),
        other_instance.finish_login(browser, "state-1"),
        return_exceptions=True,
    )
    assert sum(isinstance(r, LoginTransaction) for r in results) == 1
    assert sum(isinstance(r, LoginFailed) for r in results) == 1


def test_a_record_from_an_older_or_newer_version_still_reads(clock: FakeClock) -> None:
    data = _data(clock)
    data.access_lifetime = 8.0
    values = json.loads(data.to_bytes())
    del values["access_lifetime"]  # written before the field existed
    old = SessionData.from_bytes(json.dumps(values).encode())
    assert old.access_lifetime is None and old.access_token == ACCESS
    values["field_of_a_later_version"] = 1  # written by a newer instance in a rolling upgrade
    assert SessionData.from_bytes(json.dumps(values).encode()).refresh_token == REFRESH
    assert SessionData.from_bytes(data.to_bytes()).access_lifetime == 8.0


async def test_the_cached_view_holds_a_session_no_longer_than_cache_ttl_and_never_past_its_end(
    memory_store: MemoryStore, clock: FakeClock
) -> None:
    """``cached`` is what the fast lane decides on without the store: a session it returns must
    be one ``load`` would return from its cache, so a logout elsewhere is seen within cache_ttl."""
    sessions = _manager(memory_store, clock, cache_ttl=1.0)
    created = await sessions.create(_data(clock))
    assert sessions.cached(created.secret) == created
    clock.advance(0.9)
    assert sessions.cached(created.secret) == created
    clock.advance(0.2)  # older than cache_ttl: only the store can say
    assert sessions.cached(created.secret) is None
    assert await sessions.load(created.secret) is not None  # read again, cached again
    assert sessions.cached(created.secret) is not None
    await sessions.end(created)  # this instance forgets it at once
    assert sessions.cached(created.secret) is None
    assert sessions.cached(new_secret()) is None
    short = _manager(memory_store, clock, cache_ttl=5.0)
    ending = await short.create(_data(clock))
    clock.advance(ABSOLUTE)  # the session's absolute end falls inside the cache time
    assert short.cached(ending.secret) is None
