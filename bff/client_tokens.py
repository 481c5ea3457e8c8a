"""Client-credentials tokens for ``token: client`` routes, shared by every instance.

A token is fetched from the OP once and used by all instances until shortly before it expires:

* in each process, a dict answers the hot path with no store round trip, and concurrent callers
  share one :class:`asyncio.Future` (single flight per process);
* across instances the token lives in the store under a key derived from the issuer, our
  ``client_id`` and the scopes (no user data), encrypted with the configured keys (invariant 3:
  it must be read without a cookie), and a store lock with a renewable lease lets one instance
  fetch while the others wait for its result.

A token is renewed ``min(skew, a quarter of its lifetime)`` before it expires, and at once when an
upstream refused it (``reject=``), at most once per ``min_forced_interval`` per process. When the
store is down the token is fetched and kept locally, so client routes keep working; an OP that
fails gives 503.

With several providers (``oidc:`` as a list), client-credentials tokens come from the default
(first) provider: a route cannot name another one (issue 12, point 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bff.errors import ProviderUnavailable, StoreUnavailable
from bff.keys import DecryptError, Keyring
from bff.locks import StoreLock, poll_delays
from bff.oidc import InvalidGrant, OidcClient, TokenRequestRefused
from bff.store import SessionStore

__all__ = ["ClientToken", "ClientTokens", "token_key"]

log = logging.getLogger(__name__)


def token_key(issuer: str, client_id: str, scopes: tuple[str, ...]) -> str:
    """The store key of one client's token for one set of scopes; holds no user data."""
    material = "\x00".join((issuer, client_id, " ".join(sorted(set(scopes)))))
    digest = hashlib.sha256(material.encode()).hexdigest()[:32]
    return f"bff:{{cc:{digest}}}:token"


def _lock_key(key: str) -> str:
    return key.removesuffix(":token") + ":lock"


@dataclass(frozen=True, slots=True)
class ClientToken:
    access_token: str
    expires_at: float  # epoch seconds
    renew_at: float  # epoch seconds; from then on a new token is fetched

    def __repr__(self) -> str:  # the token never reaches a log line
        return f"ClientToken(expires_at={self.expires_at}, renew_at={self.renew_at})"

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"t": self.access_token, "e": self.expires_at, "r": self.renew_at},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientToken:
        v = json.loads(raw)
        return cls(str(v["t"]), float(v["e"]), float(v["r"]))


class ClientTokens:
    def __init__(
        self,
        oidc: OidcClient,
        store: SessionStore,
        keyring: Keyring,
        *,
        issuer: str,
        client_id: str,
        skew: float = 30.0,
        default_lifetime: float = 300.0,
        lease: float = 5.0,
        wait_timeout: float = 20.0,
        min_forced_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._oidc = oidc
        self._store = store
        self._keyring = keyring
        self._issuer = issuer
        self._client_id = client_id
        self.skew = skew
        self.default_lifetime = default_lifetime  # when the OP sends no expires_in
        self.lease = lease
        self.wait_timeout = wait_timeout
        self.min_forced_interval = min_forced_interval  # between renewals an upstream forced
        self._clock = clock
        self._local: dict[tuple[str, ...], ClientToken] = {}
        self._keys: dict[tuple[str, ...], str] = {}
        self._inflight: dict[tuple[str, ...], asyncio.Future[ClientToken]] = {}
        self._forced_at: dict[tuple[str, ...], float] = {}

    async def token(self, scopes: tuple[str, ...] = (), *, reject: str | None = None) -> str:
        """A valid access token for ``scopes``; ``reject``: one an upstream just refused."""
        now = self._clock()
        cached = self._local.get(scopes)
        if cached is not None and cached.renew_at > now and cached.access_token != reject:
            return cached.access_token
        pending = self._inflight.get(scopes)
        if pending is not None:
            # Whatever the fetch in flight brings is the newest token there is.
            return (await asyncio.shield(pending)).access_token
        # Refused again soon after a forced renewal: another grant would not help, and anyone
        # able to send X-CSRF could otherwise make us ask the OP on every request.
        recently_forced = (
            now - self._forced_at.get(scopes, float("-inf")) < self.min_forced_interval
        )
        if cached is not None and cached.renew_at > now and recently_forced:
            return cached.access_token
        if reject is not None:
            self._forced_at[scopes] = now
        future: asyncio.Future[ClientToken] = asyncio.get_running_loop().create_future()
        self._inflight[scopes] = future
        try:
            result = await self._obtain(scopes, reject)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # a lone caller must not leave an unretrieved exception behind
            raise
        else:
            future.set_result(result)
        finally:
            del self._inflight[scopes]
        self._local[scopes] = result
        return result.access_token

    def _key(self, scopes: tuple[str, ...]) -> str:
        key = self._keys.get(scopes)
        if key is None:
            key = self._keys[scopes] = token_key(self._issuer, self._client_id, scopes)
        return key

    def _usable(self, token: ClientToken | None, reject: str | None) -> bool:
        return token is not None and token.renew_at > self._clock() and token.access_token != reject

    async def _obtain(self, scopes: tuple[str, ...], reject: str | None) -> ClientToken:
        key = self._key(scopes)
        try:
            return await self._obtain_shared(key, scopes, reject)
        except StoreUnavailable:
            log.warning("client_token.store_unavailable", extra={"event": "client_token.no_store"})
            return await self._fetch(scopes)

    async def _obtain_shared(
        self, key: str, scopes: tuple[str, ...], reject: str | None
    ) -> ClientToken:
        stored = await self._read(key)
        if self._usable(stored, reject):
            assert stored is not None
            return stored
        lock = StoreLock(self._store, _lock_key(key), self.lease)
        deadline = self._clock() + self.wait_timeout
        delays = poll_delays()
        while True:
            if await lock.acquire():
                async with lock:
                    # Someone may have written a token between our read and our lock.
                    stored = await self._read(key)
                    if self._usable(stored, reject):
                        assert stored is not None
                        return stored
                    fetched = await self._fetch(scopes)
                    with contextlib.suppress(StoreUnavailable):  # still good for this process
                        await self._write(key, fetched)
                    return fetched
            # Another instance is fetching: wait for its token instead of asking the OP too.
            await asyncio.sleep(next(delays))
            stored = await self._read(key)
            if self._usable(stored, reject):
                assert stored is not None
                return stored
            if self._clock() > deadline:
                raise ProviderUnavailable("a client-credentials grant is taking too long")

    async def _fetch(self, scopes: tuple[str, ...]) -> ClientToken:
        try:
            tokens = await self._oidc.client_credentials(scopes)
        except (TokenRequestRefused, InvalidGrant) as exc:
            log.error(
                "client_token.refused",
                extra={"event": "client_token.refused", "error": type(exc).__name__},
            )
            raise ProviderUnavailable("the OP refused the client-credentials grant") from None
        now = self._clock()
        expires_at = tokens.expires_at or now + self.default_lifetime
        lifetime = max(0.0, expires_at - now)
        return ClientToken(
            tokens.access_token, expires_at, expires_at - min(self.skew, lifetime / 4)
        )

    async def _read(self, key: str) -> ClientToken | None:
        blob = await self._store.get(key)
        if blob is None:
            return None
        try:
            return ClientToken.from_bytes(self._keyring.decrypt(blob, key.encode()))
        except (DecryptError, ValueError, KeyError, TypeError):
            return None  # sealed under a retired key, or damaged: fetch a new one

    async def _write(self, key: str, token: ClientToken) -> None:
        ttl = token.expires_at - self._clock()
        if ttl > 0:
            await self._store.set(key, self._keyring.encrypt(token.to_bytes(), key.encode()), ttl)
