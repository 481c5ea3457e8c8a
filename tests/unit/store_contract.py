"""The one contract every ``SessionStore`` keeps (like oauth2-proxy's ``RunSessionStoreTests``).

A test class inherits :class:`StoreContract` and provides two fixtures:

* ``store``: an empty store;
* ``advance``: an async callable that lets ``seconds`` pass for that store (a fake clock for
  ``MemoryStore``, a real sleep for Redis).

TTLs are ``short`` (a fraction of a second) so that the real-Redis runs stay fast, and every
expiry check waits comfortably past the TTL, never right at it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import ClassVar

from bff.store import SessionStore

Advance = Callable[[float], Awaitable[None]]

LONG = 30.0


class StoreContract:
    #: A TTL that a test lets lapse; subclasses on a real clock pick what their backend can time.
    short: ClassVar[float] = 0.15

    @property
    def past(self) -> float:
        """Waiting this long puts a ``short`` TTL safely in the past."""
        return 2 * self.short

    # -- get / set / ttl --------------------------------------------------------------------

    async def test_a_missing_key_reads_as_none(self, store: SessionStore) -> None:
        assert await store.get("k:missing") is None
        assert await store.ttl("k:missing") is None

    async def test_set_then_get_returns_the_exact_bytes(self, store: SessionStore) -> None:
        value = bytes(range(256)) + b"\x00\xff tail"
        await store.set("k:1", value, LONG)
        assert await store.get("k:1") == value

    async def test_set_overwrites_an_existing_value(self, store: SessionStore) -> None:
        await store.set("k:1", b"one", LONG)
        await store.set("k:1", b"two", LONG)
        assert await store.get("k:1") == b"two"

    async def test_a_value_is_gone_after_its_ttl(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.set("k:short", b"v", self.short)
        await store.set("k:long", b"v", LONG)
        assert await store.get("k:short") == b"v"
        await advance(self.past)
        assert await store.get("k:short") is None
        assert await store.ttl("k:short") is None
        assert await store.get("k:long") == b"v"

    async def test_ttl_reports_the_seconds_left(self, store: SessionStore) -> None:
        await store.set("k:1", b"v", LONG)
        left = assert_finite(await store.ttl("k:1"))
        assert LONG - 1 < left <= LONG
        assert await store.replace("k:1", b"v", b"w", self.short)
        assert 0 < assert_finite(await store.ttl("k:1")) <= self.short + 1e-6

    # -- add (SET NX) -----------------------------------------------------------------------

    async def test_add_writes_only_when_the_key_is_absent(self, store: SessionStore) -> None:
        assert await store.add("k:1", b"first", LONG) is True
        assert await store.add("k:1", b"second", LONG) is False
        assert await store.get("k:1") == b"first"

    async def test_add_succeeds_again_once_the_old_value_expired(
        self, store: SessionStore, advance: Advance
    ) -> None:
        assert await store.add("k:1", b"first", self.short) is True
        await advance(self.past)
        assert await store.add("k:1", b"second", LONG) is True
        assert await store.get("k:1") == b"second"

    async def test_concurrent_adds_let_exactly_one_writer_win(self, store: SessionStore) -> None:
        results = await asyncio.gather(*(store.add("k:1", b"%d" % i, LONG) for i in range(10)))
        assert results.count(True) == 1
        assert await store.get("k:1") == b"%d" % results.index(True)

    # -- replace (compare-and-set) ----------------------------------------------------------

    async def test_replace_based_on_the_current_value_wins(self, store: SessionStore) -> None:
        await store.set("k:1", b"v1", LONG)
        assert await store.replace("k:1", b"v1", b"v2", LONG) is True
        assert await store.get("k:1") == b"v2"

    async def test_replace_based_on_a_stale_value_loses_and_changes_nothing(
        self, store: SessionStore
    ) -> None:
        await store.set("k:1", b"v1", LONG)
        assert await store.replace("k:1", b"v1", b"v2", LONG) is True
        assert await store.replace("k:1", b"v1", b"stale write", LONG) is False
        assert await store.get("k:1") == b"v2"

    async def test_replace_of_a_missing_key_writes_nothing(self, store: SessionStore) -> None:
        assert await store.replace("k:1", b"v1", b"v2", LONG) is False
        assert await store.get("k:1") is None

    async def test_replace_of_an_expired_key_writes_nothing(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.set("k:1", b"v1", self.short)
        await advance(self.past)
        assert await store.replace("k:1", b"v1", b"v2", LONG) is False
        assert await store.get("k:1") is None

    async def test_replace_compares_binary_values_exactly(self, store: SessionStore) -> None:
        await store.set("k:1", b"\x00\x01\xff", LONG)
        assert await store.replace("k:1", b"\x00\x01", b"x", LONG) is False
        assert await store.replace("k:1", b"\x00\x01\xfe", b"x", LONG) is False
        assert await store.replace("k:1", b"\x00\x01\xff", b"y", LONG) is True
        assert await store.get("k:1") == b"y"

    async def test_replace_applies_the_new_ttl(self, store: SessionStore, advance: Advance) -> None:
        await store.set("k:1", b"v1", LONG)
        assert await store.replace("k:1", b"v1", b"v2", self.short) is True
        await advance(self.past)
        assert await store.get("k:1") is None

    async def test_of_two_writers_from_one_version_only_one_wins(self, store: SessionStore) -> None:
        await store.set("k:1", b"v1", LONG)
        results = await asyncio.gather(
            store.replace("k:1", b"v1", b"from a", LONG),
            store.replace("k:1", b"v1", b"from b", LONG),
        )
        assert sorted(results) == [False, True]
        assert await store.get("k:1") == (b"from a" if results[0] else b"from b")

    # -- take (GETDEL) ----------------------------------------------------------------------

    async def test_take_returns_the_value_once(self, store: SessionStore) -> None:
        await store.set("k:1", b"once", LONG)
        assert await store.take("k:1") == b"once"
        assert await store.take("k:1") is None
        assert await store.get("k:1") is None

    async def test_take_of_a_missing_or_expired_key_is_none(
        self, store: SessionStore, advance: Advance
    ) -> None:
        assert await store.take("k:missing") is None
        await store.set("k:1", b"v", self.short)
        await advance(self.past)
        assert await store.take("k:1") is None

    async def test_of_concurrent_takes_exactly_one_gets_the_value(
        self, store: SessionStore
    ) -> None:
        await store.set("k:1", b"single use", LONG)
        results = await asyncio.gather(*(store.take("k:1") for _ in range(2)))
        assert sorted(results, key=lambda r: r is None) == [b"single use", None]
        await store.set("k:2", b"single use", LONG)
        many = await asyncio.gather(*(store.take("k:2") for _ in range(10)))
        assert many.count(b"single use") == 1
        assert many.count(None) == 9

    # -- delete / expire --------------------------------------------------------------------

    async def test_delete_removes_keys_and_counts_those_that_existed(
        self, store: SessionStore
    ) -> None:
        await store.set("k:1", b"v", LONG)
        await store.set("k:2", b"v", LONG)
        assert await store.delete("k:1", "k:2", "k:missing") == 2
        assert await store.get("k:1") is None
        assert await store.get("k:2") is None
        assert await store.delete("k:1") == 0
        assert await store.delete() == 0

    async def test_expire_extends_a_live_key(self, store: SessionStore, advance: Advance) -> None:
        await store.set("k:1", b"v", self.short)
        assert await store.expire("k:1", LONG) is True
        await advance(self.past)
        assert await store.get("k:1") == b"v"

    async def test_expire_can_shorten_a_live_key(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.set("k:1", b"v", LONG)
        assert await store.expire("k:1", self.short) is True
        await advance(self.past)
        assert await store.get("k:1") is None

    async def test_expire_of_a_missing_key_is_false_and_creates_nothing(
        self, store: SessionStore
    ) -> None:
        assert await store.expire("k:missing", LONG) is False
        assert await store.get("k:missing") is None

    # -- locks ------------------------------------------------------------------------------

    async def test_a_lock_is_exclusive(self, store: SessionStore) -> None:
        assert await store.acquire_lock("l:1", "alice", LONG) is True
        assert await store.acquire_lock("l:1", "bob", LONG) is False
        assert await store.acquire_lock("l:1", "alice", LONG) is False  # not re-entrant

    async def test_of_concurrent_contenders_exactly_one_gets_the_lock(
        self, store: SessionStore
    ) -> None:
        results = await asyncio.gather(
            *(store.acquire_lock("l:1", f"owner-{i}", LONG) for i in range(10))
        )
        assert results.count(True) == 1

    async def test_only_the_owner_renews_and_renewal_outlives_the_first_lease(
        self, store: SessionStore, advance: Advance
    ) -> None:
        assert await store.acquire_lock("l:1", "alice", self.short) is True
        assert await store.renew_lock("l:1", "bob", LONG) is False
        assert await store.renew_lock("l:1", "alice", LONG) is True
        await advance(self.past)
        assert await store.acquire_lock("l:1", "bob", self.short) is False

    async def test_a_stranger_cannot_release_the_lock(self, store: SessionStore) -> None:
        assert await store.acquire_lock("l:1", "alice", LONG) is True
        await store.release_lock("l:1", "bob")
        assert await store.acquire_lock("l:1", "bob", LONG) is False

    async def test_the_owner_releases_and_another_may_take_it(self, store: SessionStore) -> None:
        assert await store.acquire_lock("l:1", "alice", LONG) is True
        await store.release_lock("l:1", "alice")
        assert await store.acquire_lock("l:1", "bob", LONG) is True
        await store.release_lock("l:1", "alice")  # alice's release no longer touches bob's lock
        assert await store.acquire_lock("l:1", "carol", LONG) is False

    async def test_a_lease_that_is_not_renewed_lapses(
        self, store: SessionStore, advance: Advance
    ) -> None:
        assert await store.acquire_lock("l:1", "alice", self.short) is True
        await advance(self.past)
        assert await store.renew_lock("l:1", "alice", LONG) is False
        assert await store.acquire_lock("l:1", "bob", LONG) is True
        assert await store.renew_lock("l:1", "alice", LONG) is False

    async def test_releasing_a_lock_nobody_holds_is_harmless(self, store: SessionStore) -> None:
        await store.release_lock("l:none", "alice")
        assert await store.acquire_lock("l:none", "alice", LONG) is True

    # -- indexes ----------------------------------------------------------------------------

    async def test_an_unknown_index_has_no_members(self, store: SessionStore) -> None:
        assert await store.index_members("i:missing") == []

    async def test_index_add_members_and_remove(self, store: SessionStore) -> None:
        await store.index_add("i:1", "b", LONG)
        await store.index_add("i:1", "a", LONG)
        await store.index_add("i:1", "a", LONG)  # a set: no duplicates
        await store.index_add("i:2", "c", LONG)
        assert await store.index_members("i:1") == ["a", "b"]
        await store.index_remove("i:1", "a", "not-a-member")
        assert await store.index_members("i:1") == ["b"]
        await store.index_remove("i:1")
        assert await store.index_members("i:1") == ["b"]
        assert await store.index_members("i:2") == ["c"]

    async def test_index_members_expire_one_by_one(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.index_add("i:1", "short", self.short)
        await store.index_add("i:1", "long", LONG)
        assert await store.index_members("i:1") == ["long", "short"]
        await advance(self.past)
        assert await store.index_members("i:1") == ["long"]

    async def test_re_adding_a_member_renews_its_ttl(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.index_add("i:1", "m", self.short)
        await store.index_add("i:1", "m", LONG)
        await advance(self.past)
        assert await store.index_members("i:1") == ["m"]

    async def test_an_index_whose_members_all_expired_is_empty(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.index_add("i:1", "a", self.short)
        await store.index_add("i:1", "b", self.short)
        await advance(self.past)
        assert await store.index_members("i:1") == []

    # -- rate-limit token buckets -----------------------------------------------------------

    async def test_a_new_bucket_allows_exactly_burst_then_says_when_to_retry(
        self, store: SessionStore
    ) -> None:
        # 1000 s per token: no refill can sneak in, however slow the machine.
        rate = 0.001
        results = [await store.take_token("rl:1", rate, 3) for _ in range(5)]
        assert [allowed for allowed, _ in results] == [True, True, True, False, False]
        assert all(wait == 0.0 for _, wait in results[:3])
        for _, wait in results[3:]:
            assert 0 < wait <= 1 / rate

    async def test_concurrent_takes_never_exceed_the_burst(self, store: SessionStore) -> None:
        results = await asyncio.gather(*(store.take_token("rl:1", 0.001, 5) for _ in range(20)))
        assert sum(allowed for allowed, _ in results) == 5

    async def test_buckets_of_different_keys_are_independent(self, store: SessionStore) -> None:
        assert await store.take_token("rl:a", 0.001, 1) == (True, 0.0)
        assert (await store.take_token("rl:a", 0.001, 1))[0] is False
        assert await store.take_token("rl:b", 0.001, 1) == (True, 0.0)

    async def test_tokens_come_back_once_the_retry_time_has_passed(
        self, store: SessionStore, advance: Advance
    ) -> None:
        rate = 1 / self.short  # one token per `short`
        for _ in range(50):  # bounded: each take is far quicker than a refill
            allowed, wait = await store.take_token("rl:1", rate, 2)
            if not allowed:
                break
        assert not allowed and 0 < wait <= self.short + 1e-6
        await advance(self.past)
        assert (await store.take_token("rl:1", rate, 2))[0] is True

    async def test_an_idle_bucket_expires_once_it_would_be_full(
        self, store: SessionStore, advance: Advance
    ) -> None:
        await store.take_token("rl:1", 1 / self.short, 1)
        left = assert_finite(await store.ttl("rl:1"))
        assert 0 < left <= self.short + 1e-3
        await advance(self.past)
        assert await store.get("rl:1") is None

    async def test_a_slow_bucket_lives_until_it_is_full_again(self, store: SessionStore) -> None:
        await store.take_token("rl:1", 0.01, 10)
        await store.take_token("rl:1", 0.01, 10)
        # Two tokens at 100 s each: the bucket is full again in 200 s, and not before.
        left = assert_finite(await store.ttl("rl:1"))
        assert 190 < left <= 200.001

    async def test_an_unreadable_bucket_reads_as_a_full_one(self, store: SessionStore) -> None:
        for i, junk in enumerate([b"not a bucket", b"nan 1", b"inf 1", b"1 -inf", b"-5 1", b""]):
            key = f"rl:{i}"
            await store.set(key, junk, LONG)
            assert await store.take_token(key, 0.001, 2) == (True, 0.0), junk
            assert await store.take_token(key, 0.001, 2) == (True, 0.0), junk
            assert (await store.take_token(key, 0.001, 2))[0] is False, junk

    # -- health -----------------------------------------------------------------------------

    async def test_ping_answers(self, store: SessionStore) -> None:
        await store.ping()


def assert_finite(value: float | None) -> float:
    """A TTL that exists and is a real number (not the ``inf`` of a key without expiry)."""
    assert value is not None and math.isfinite(value)
    return value
