"""Redis Cluster safety of bff's key layout, checked statically (the real Cluster runs in
``tests/integration/test_redis_cluster.py``).

Every store command and Lua script touches one key, so no request can be cross-slot; keys that
one flow uses together (a session, its refresh lock and the lock's failure note; a client token
and its lock) share a ``{hash tag}`` and so a slot and a shard.
"""

from __future__ import annotations

import re

from redis.crc import key_slot

from bff.client_tokens import _lock_key as client_lock_key
from bff.client_tokens import token_key
from bff.keys import new_secret, store_id
from bff.ratelimit import bucket_key
from bff.sessions import lock_key, refresh_failure_key, session_key
from bff.store import redis as redis_store


def test_every_lua_script_touches_only_its_one_key() -> None:
    scripts = {n: v for n, v in vars(redis_store).items() if n.isupper() or n.startswith("_")}
    lua = {n: v for n, v in scripts.items() if isinstance(v, str) and "redis.call" in v}
    assert len(lua) >= 5, sorted(lua)
    for name, body in lua.items():
        assert set(re.findall(r"KEYS\[(\d+)\]", body)) == {"1"}, name


def test_a_sessions_keys_share_one_slot() -> None:
    for _ in range(20):
        sid = store_id(new_secret())
        slots = {key_slot(k(sid).encode()) for k in (session_key, lock_key, refresh_failure_key)}
        assert len(slots) == 1


def test_a_client_token_and_its_lock_share_one_slot() -> None:
    key = token_key("https://op.example", "client", ("a", "b"))
    assert key_slot(key.encode()) == key_slot(client_lock_key(key).encode())
    other = token_key("https://op.example", "client", ("c",))
    assert key_slot(key.encode()) != key_slot(other.encode())  # the tag is the digest


def test_rate_limit_buckets_spread_over_slots() -> None:
    keys = [bucket_key(f"192.0.2.{i}", "login") for i in range(50)]
    assert all(k is not None and k.startswith("bff:{rl:") for k in keys)
    assert len({key_slot(k.encode()) for k in keys if k}) > 40
