"""The shared store on Redis, via ``redis.asyncio``: one node (``redis://``, ``rediss://``,
``unix://``), a Sentinel-managed master (``redis+sentinel://``) or a Cluster
(``redis+cluster://``); see ``bff.store.url``.

Every instance of bff reads and writes here, so any instance serves any request. Multi-step
operations that must be atomic (compare-and-set, lock renew/release, the rate-limit token bucket)
are Lua scripts; ``take`` is GETDEL (Redis >= 6.2). Every command and script touches exactly one
key, so each runs in one Cluster hash slot. Driver errors, and any call that outlives the store
timeout, become :class:`~bff.errors.StoreUnavailable` here, at the seam.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bff.config.settings import RedisSettings
from bff.errors import StoreUnavailable
from bff.store.url import StoreUrl, parse_store_url

__all__ = ["RedisStore"]

CLUSTER_MAX_CONNECTIONS = 64  # per node, and concurrent operations per store (see `_gate`)

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


_INDEX_ADD = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
-- The index lives as long as its longest-lived member, and no longer.
redis.call('PEXPIRE', KEYS[1], ARGV[4], 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[4], 'GT')
return 1
"""


def _translated(
    fn: Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]]:
    """Driver errors become StoreUnavailable, and the whole call (pool wait, connect, retries,
    a failover's redirects) is bounded by the store timeout: a hung Redis is a quick 503."""

    @functools.wraps(fn)
    async def wrapper(store: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            async with asyncio.timeout(store.timeout):
                if store._gate is None:
                    return await fn(store, *args, **kwargs)
                async with store._gate:
                    return await fn(store, *args, **kwargs)
        # TimeoutError is an OSError; RedisClusterException (no slot map: no node reachable,
        # refused auth, a slot not covered) is not a RedisError.
        except (RedisError, RedisClusterException, OSError) as exc:
            err = str(exc) or type(exc).__name__
            log.warning("store.unavailable", extra={"event": "store.unavailable", "err": err})
            raise StoreUnavailable() from exc

    return wrapper


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        timeout: float = 0.5,
        sentinel: Sentinel | None = None,
        concurrency: int | None = None,
    ) -> None:
        self._r = client
        self._sentinel = sentinel  # closed with the store: it holds connections to the sentinels
        # The Cluster client has no blocking pool: past `max_connections` to a node it fails at
        # once. A gate of that size makes a burst queue (within the timeout) instead.
        self._gate = asyncio.Semaphore(concurrency) if concurrency is not None else None
        self.timeout = timeout  # seconds one operation may take, all retries included
        self._replace = client.register_script(_REPLACE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._take_token = client.register_script(_BUCKET)
        self._index_add = client.register_script(_INDEX_ADD)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.5,
        redis: RedisSettings | None = None,
        **options: Any,
    ) -> RedisStore:
        """A store on any URL ``bff.store.url`` accepts but ``memory://``.

        ``options`` go to the client or its connection pool (tests tune ``max_connections``).
        """
        target = parse_store_url(url)
        settings = redis if redis is not None else RedisSettings()
        if target.kind == "sentinel":
            sentinel, master = _sentinel_client(target, settings, timeout, options)
            return cls(master, timeout=timeout, sentinel=sentinel)
        if target.kind == "cluster":
            client = _cluster_client(target, settings, timeout, options)
            gate = int(options.get("max_connections", CLUSTER_MAX_CONNECTIONS))
            return cls(client, timeout=timeout, concurrency=gate)
        if target.kind != "redis":
            raise ValueError("not a Redis URL")
        kwargs = {**_connection_kwargs(timeout), **_auth(settings)}
        if target.tls:
            kwargs.update(_tls_kwargs(settings))
        # A burst waits for a free connection (within the store timeout) instead of failing
        # with "Too many connections"; the bound keeps N instances x workers within Redis' limits.
        kwargs.setdefault("max_connections", 64)
        kwargs["timeout"] = timeout
        kwargs.update(options)
        pool = aioredis.BlockingConnectionPool.from_url(url, **kwargs)
        return cls(aioredis.Redis(connection_pool=pool), timeout=timeout)

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
        args: list[str | int] = [member, repr(now + ttl), repr(now), _ms(ttl)]
        await self._index_add(keys=[index], args=args)

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
        if isinstance(self._r, RedisCluster):
            await self._r.aclose()
        else:
            await self._r.aclose(close_connection_pool=True)
        if self._sentinel is not None:
            await self._sentinel.aclose()

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The raw client, for tests and the benchmark's memory report only."""
        return self._r


# -------------------------------------------------------------------------------------------------
# Clients per topology


def _retry() -> Retry:
    # One quick retry hides a pooled connection that died with a Redis restart or a failover;
    # more would only delay the 503 the caller should see (the store timeout bounds it anyway).
    return Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1)


def _connection_kwargs(timeout: float) -> dict[str, Any]:
    """Socket timeouts a little inside the store timeout: a hung node then ends in the driver's
    own TimeoutError, which it answers (a Cluster client refreshes its slot map, a Sentinel
    connection asks the sentinels again), instead of in our cancellation, which it cannot see.
    Seen without this margin: a Cluster client kept sending to a frozen master after failover."""
    socket_timeout = timeout * 0.8
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": 15,
        "retry": _retry(),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


def _auth(settings: RedisSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if settings.username is not None:
        out["username"] = settings.username
    if settings.password is not None:
        out["password"] = settings.password.get()
    return out


def _url_auth(target: StoreUrl) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if target.username is not None:
        out["username"] = target.username
    if target.password is not None:
        out["password"] = target.password
    return out


def _tls_kwargs(settings: RedisSettings) -> dict[str, Any]:
    tls = settings.tls
    out: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": tls.check_hostname}
    if tls.ca_file is not None:
        out["ssl_ca_certs"] = str(tls.ca_file)
    if tls.cert_file is not None:
        out["ssl_certfile"] = str(tls.cert_file)
    if tls.key_file is not None:
        out["ssl_keyfile"] = str(tls.key_file)
    return out


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait for a free connection: a burst
    queues (within the store timeout) instead of failing with "Too many connections"."""


def _sentinel_client(
    target: StoreUrl, settings: RedisSettings, timeout: float, options: dict[str, Any]
) -> tuple[Sentinel, aioredis.Redis]:
    """The master of ``target.master``, found through the sentinels on every new connection.

    After a failover the old master's connections fail (or answer READONLY, which redis-py
    turns into a reconnect), and the next connection asks the sentinels for the new master.
    """
    tls = _tls_kwargs(settings) if target.tls else {}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **tls,
    }
    if target.tls:
        sentinel_kwargs["ssl"] = True
    if settings.sentinel_username is not None:
        sentinel_kwargs["username"] = settings.sentinel_username
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get()
    kwargs = {
        **_connection_kwargs(timeout),
        **_url_auth(target),
        **_auth(settings),
        **tls,
        "db": target.db,
    }
    if target.tls:
        kwargs["ssl"] = True
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
    kwargs.update({"max_connections": 64, "timeout": timeout, **options})
    client: aioredis.Redis = sentinel.master_for(
        target.master, connection_pool_class=_BlockingSentinelPool, **kwargs
    )
    return sentinel, client


def _cluster_client(
    target: StoreUrl, settings: RedisSettings, timeout: float, options: dict[str, Any]
) -> RedisCluster:
    """A Cluster client from seed nodes: it learns the slot map and follows MOVED/ASK.

    ``require_full_coverage`` is off so that sessions on healthy shards keep working while one
    shard fails over (when the servers allow it: ``cluster-require-full-coverage no``).
    """
    kwargs = {
        **_connection_kwargs(timeout),
        **_url_auth(target),
        **_auth(settings),
    }
    if target.tls:
        kwargs.update(_tls_kwargs(settings), ssl=True)
    kwargs.pop("health_check_interval")
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    return RedisCluster(
        startup_nodes=nodes,
        require_full_coverage=False,
        **{"max_connections": CLUSTER_MAX_CONNECTIONS, **kwargs, **options},
    )
