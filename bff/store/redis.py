"""The shared store on Redis (``redis://``, ``rediss://``, ``unix://``), via ``redis.asyncio``.

Every instance of bff reads and writes here, so any instance serves any request. Multi-step
operations that must be atomic (compare-and-set, lock renew/release, the rate-limit token bucket)
are Lua scripts; ``take`` is GETDEL (Redis >= 6.2). Driver errors become
:class:`~bff.errors.StoreUnavailable` here, at the seam.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from bff.errors import StoreUnavailable

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Compare-and-set: only the writer that read the current value may replace it.
_REPLACE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A token bucket (the arithmetic of ``bff/store/bucket.py``, kept in step with it) on the
# server's own clock: one atomic step, whatever the number of instances and their clocks.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level = burst
local raw = redis.call('GET', KEYS[1])
if raw then
  local saved, stamp = string.match(raw, '^(%S+) (%S+)$')
  saved = tonumber(saved)
  stamp = tonumber(stamp)
  -- Only a sane state counts (NaN fails every comparison); anything else is a full bucket.
  if saved and stamp and saved >= 0 and saved < math.huge and stamp >= 0 and stamp < math.huge then
    level = math.min(burst, saved + math.max(0, now - stamp) * rate)
  end
end
local allowed = 0
local wait = 0
if level >= 1 then
  level = level - 1
  allowed = 1
else
  wait = (1 - level) / rate
end
local ttl = math.max(1, math.ceil((burst - level) / rate * 1000))
redis.call('SET', KEYS[1], string.format('%.6f %.6f', level, now), 'PX', ttl)
return {allowed, string.format('%.6f', wait)}
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _translated(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisError, OSError) as exc:
            log.warning("store.unavailable", extra={"event": "store.unavailable", "err": str(exc)})
            raise StoreUnavailable() from exc

    return wrapper


class RedisStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client
        self._replace = client.register_script(_REPLACE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._take_token = client.register_script(_BUCKET)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        # One quick retry hides a pooled connection that died with a Redis restart; more than
        # that would only delay the 503 the caller should see.
        options.setdefault("socket_timeout", 2.0)
        options.setdefault("socket_connect_timeout", 1.0)
        options.setdefault("health_check_interval", 15)
        options.setdefault("retry", Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1))
        options.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
        # A burst waits for a free connection (up to `timeout`) instead of failing with
        # "Too many connections"; the bound keeps N instances x workers within Redis' limits.
        options.setdefault("max_connections", 64)
        options.setdefault("timeout", 2.0)
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        return cls(aioredis.Redis(connection_pool=pool))

    @_translated
    async def get(self, key: str) -> bytes | None:
        return _as_bytes(await self._r.get(key))

    @_translated
    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._r.set(key, value, px=_ms(ttl))

    @_translated
    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        return bool(await self._r.set(key, value, px=_ms(ttl), nx=True))

    @_translated
    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        return bool(await self._replace(keys=[key], args=[expected, value, _ms(ttl)]))

    @_translated
    async def take(self, key: str) -> bytes | None:
        return _as_bytes(await self._r.getdel(key))

    @_translated
    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        # One DEL per key keeps every command inside one cluster hash slot.
        found = 0
        for key in keys:
            found += int(await self._r.delete(key))
        return found

    @_translated
    async def expire(self, key: str, ttl: float) -> bool:
        return bool(await self._r.pexpire(key, _ms(ttl)))

    @_translated
    async def ttl(self, key: str) -> float | None:
        ms = int(await self._r.pttl(key))
        return None if ms == -2 else (float("inf") if ms == -1 else ms / 1000)

    @_translated
    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool:
        return bool(await self._r.set(key, owner, px=_ms(lease), nx=True))

    @_translated
    async def renew_lock(self, key: str, owner: str, lease: float) -> bool:
        return bool(await self._renew(keys=[key], args=[owner, _ms(lease)]))

    @_translated
    async def release_lock(self, key: str, owner: str) -> None:
        await self._release(keys=[key], args=[owner])

    @_translated
    async def index_add(self, index: str, member: str, ttl: float) -> None:
        now = time.time()
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zadd(index, {member: now + ttl})
            pipe.zremrangebyscore(index, "-inf", now)
            # The index lives as long as its longest-lived member, and no longer.
            pipe.pexpire(index, _ms(ttl), nx=True)
            pipe.pexpire(index, _ms(ttl), gt=True)
            await pipe.execute()

    @_translated
    async def index_members(self, index: str) -> list[str]:
        members = await self._r.zrangebyscore(index, time.time(), "+inf")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    @_translated
    async def index_remove(self, index: str, *members: str) -> None:
        if members:
            await self._r.zrem(index, *members)

    @_translated
    async def take_token(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        allowed, wait = await self._take_token(keys=[key], args=[repr(float(rate)), int(burst)])
        return bool(allowed), float(wait)

    @_translated
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose(close_connection_pool=True)

    @property
    def client(self) -> aioredis.Redis:
        """The raw client, for tests and the benchmark's memory report only."""
        return self._r
