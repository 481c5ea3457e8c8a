"""Sessions and login transactions: Python values <-> encrypted bytes <-> the store.

This is the only module that knows how records are laid out in the store:

==========================  ===================================================  ===============
key                         value                                                 lifetime
==========================  ===================================================  ===============
``bff:{<id>}:s``            the session, AES-GCM under its cookie-derived key     idle/absolute
``bff:{<id>}:lock``         refresh lock owner (``refresh.py``)                   lease
``bff:{<id>}:lock:failed``  a refresh holder's OP failure, for its waiters      seconds
``bff:{<id>}:x:<route>``    a route's exchanged token (``route_tokens.py``),     token lifetime
                            AES-GCM under the session's cookie-derived key
``bff:{<id>}:x:<route>:lock``  its exchange lock (``route_tokens.py``)             lease
``bff:{<tx>}:tx``           a login transaction, under the browser-binding key    login_timeout
``bff:{sub:<h>}:sessions``  index (issuer, sub) -> session ids (no tokens)        longest member
``bff:{sid:<h>}:sessions``  index (issuer, OP sid) -> session ids (no tokens)     longest member
``bff:{jti:<h>}:seen``      a logout token's (issuer, ``jti``) (replay guard)     token lifetime
``bff:{rl:<h>}:<route>``    an address's rate-limit bucket (``ratelimit.py``)    until refilled
==========================  ===================================================  ===============

``<id>`` is a one-way hash of the cookie secret, so a store dump reveals neither the cookie nor the
tokens. A session and its lock share one Redis Cluster hash slot through the ``{<id>}`` tag.

**Indexes are per issuer** (issue 12, point 5): ``<h>`` hashes the issuer with the value, so
``sub`` "alice" at one OP and "alice" at another are two users, and one issuer's logout token
cannot find another issuer's sessions. A session names its provider in ``idp`` (its config name);
a record without one (written before several providers existed) belongs to the default provider,
whose index is also read, and cleaned, under the issuer-less key such records were indexed under
(``_index_key(..., None)``), until they are gone. A session whose ``idp`` is no longer configured
has no OP to refresh or end it at: it is ended when read.

Reads go through a small per-process cache (``session.cache_ttl``, 1 s by default) so the hot
path needs neither a store round trip nor a decryption per request; a logout on another instance
is therefore seen within that time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bff import dpop
from bff.errors import LoginFailed
from bff.keys import (
    DecryptError,
    SessionSecret,
    StoreKey,
    new_secret,
    open_sealed,
    public_handle,
    seal,
    secret_key,
    store_id,
)
from bff.store import SessionStore

__all__ = [
    "LoginTooSlow",
    "LoginTransaction",
    "Session",
    "SessionData",
    "SessionManager",
    "exchange_key",
    "lock_key",
    "refresh_failure_key",
    "session_key",
]

log = logging.getLogger(__name__)

_CACHE_MAX = 50_000


def session_key(sid: StoreKey) -> str:
    return f"bff:{{{sid}}}:s"


def lock_key(sid: StoreKey) -> str:
    return f"bff:{{{sid}}}:lock"


def refresh_failure_key(sid: StoreKey) -> str:
    return f"bff:{{{sid}}}:lock:failed"


def exchange_key(sid: StoreKey, route: str) -> str:
    """A route's exchanged token; ``route`` is a hash of the route's exchange parameters. The
    ``{<id>}`` tag keeps it in the session's Redis Cluster slot."""
    return f"bff:{{{sid}}}:x:{route}"


def _index_key(kind: str, value: str, issuer: str | None = None) -> str:
    """``issuer`` None: the issuer-less key of records from before per-issuer indexes."""
    material = value if issuer is None else f"{issuer}\x00{value}"
    digest = hashlib.sha256(material.encode()).hexdigest()[:32]
    return f"bff:{{{kind}:{digest}}}:sessions"


@dataclass(slots=True)
class SessionData:
    """What a session holds. Tokens appear only here and only ever encrypted at rest."""

    sub: str
    claims: dict[str, Any]
    access_token: str = field(repr=False)  # tokens never reach a repr, a log or a traceback
    access_expires_at: float | None  # epoch seconds; None when the OP said nothing
    refresh_token: str | None = field(repr=False)
    id_token: str | None = field(repr=False)
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float  # absolute end of the session, epoch seconds
    sid: str | None = None  # the OP's session id, for back-channel logout
    version: int = 1
    # The access token's expires_in when issued: caps the refresh skew (refresh.py). None for
    # an OP that sent none, and in sessions stored before this field existed.
    access_lifetime: float | None = None
    # The private JWK the session's tokens are DPoP-bound to (bff/dpop.py); None for a session
    # without DPoP, and in records from before it existed. Sealed with the rest, never logged.
    dpop_jwk: dict[str, Any] | None = field(default=None, repr=False)
    # Issue 12: tokens for the routes' RFC 8707 resources, keyed by the route's resource list
    # (route_tokens.py): {"t": token, "e": expires_at or None, "l": lifetime or None}. Empty in
    # sessions stored before this field existed; refreshed one by one, each on its own expiry.
    resource_tokens: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    # The provider (its name in the config) the session was logged in at; None in records from
    # before several providers existed: the default provider.
    idp: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SessionData:
        """Missing fields take their defaults (records from before they existed); unknown ones
        are ignored (records from a newer version, during a rolling upgrade)."""
        values = json.loads(raw)
        values["scopes"] = tuple(values["scopes"])
        return cls(**{k: v for k, v in values.items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in dataclasses.fields(SessionData))


@dataclass(slots=True)
class Session:
    secret: SessionSecret = field(repr=False)  # the cookie's secret: never in a repr or log
    id: StoreKey
    data: SessionData
    blob: bytes = field(repr=False)  # the stored bytes read: the compare-and-set base
    handle: str = field(default="")  # public value the SPA passes to /bff/logout?sid=

    @property
    def key(self) -> str:
        return session_key(self.id)


@dataclass(frozen=True, slots=True)
class LoginTransaction:
    state: str
    nonce: str
    code_verifier: str
    return_to: str
    created_at: float
    # The store id of the session this browser had when the login started: it ends when the new
    # one begins. Taken at /bff/login: the cross-site callback never carries a Strict cookie.
    previous: str | None = None
    # The provider (its config name) the login went to: the callback finishes it there only.
    idp: str | None = None


class LoginTooSlow(LoginFailed):
    """A login transaction older than ``login_timeout``: refused, but its ``returnTo`` is known."""

    def __init__(self, return_to: str) -> None:
        super().__init__("the login took too long; start again")
        self.return_to = return_to


@dataclass(slots=True)
class _Cached:
    session: Session
    fetched_at: float


class SessionManager:
    def __init__(
        self,
        store: SessionStore,
        *,
        idle_timeout: float,
        absolute_timeout: float,
        login_timeout: float = 600.0,
        cache_ttl: float = 1.0,
        clock: Callable[[], float] = time.time,
        issuers: Mapping[str, str] | None = None,
    ) -> None:
        """``issuers``: each provider's name -> its issuer, the default first. Without it
        (one-provider tools and tests) the indexes use the issuer-less keys."""
        self.store = store
        self._issuers: dict[str, str] = dict(issuers or {})
        self.default_idp: str | None = next(iter(self._issuers), None)
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.login_timeout = login_timeout
        self.cache_ttl = cache_ttl
        self._clock = clock
        # Keyed by store id, so a session ended by id (back-channel, a new login) leaves at once.
        self._cache: dict[StoreKey, _Cached] = {}
        self._loading: dict[StoreKey, asyncio.Future[Session | None]] = {}
        self._touched: dict[StoreKey, float] = {}
        self._ids: dict[SessionSecret, StoreKey] = {}  # store_id(secret), bounded
        # Sliding the idle timeout costs a store write; once per interval is precise enough.
        self._touch_interval = min(60.0, idle_timeout / 20)

    # -- sessions -------------------------------------------------------------------------

    async def create(self, data: SessionData) -> Session:
        """Store a brand-new session under a brand-new secret (no fixation)."""
        secret = new_secret()
        sid = store_id(secret)
        blob = self._seal(secret, sid, data)
        await self.store.set(session_key(sid), blob, self._ttl(data))
        await self._index(sid, data)
        session = Session(secret, sid, data, blob, public_handle(secret))
        self._remember(session, self._clock())
        self._touch(sid, self._clock())
        log.info("session.created", extra={"event": "session.created", "session": sid[:8]})
        return session

    def _sid(self, secret: SessionSecret) -> StoreKey:
        sid = self._ids.get(secret)
        if sid is None:  # a hash per cookie per process, not per request (hot path)
            sid = store_id(secret)
            if len(self._ids) >= _CACHE_MAX:
                self._ids.pop(next(iter(self._ids)))
            self._ids[secret] = sid
        return sid

    def cached(self, secret: SessionSecret) -> Session | None:
        """The session as this process's cache holds it (younger than ``cache_ttl``, not
        expired), or None: then only :meth:`load` can tell. No I/O, so the front door's fast
        lane (:mod:`bff.server`) can answer from it without a task; :meth:`load` reads it too."""
        sid = self._sid(secret)
        cached = self._cache.get(sid)
        if cached is None:
            return None
        now = self._clock()
        if now - cached.fetched_at < self.cache_ttl:
            if cached.session.data.expires_at > now:
                return cached.session
            self._cache.pop(sid, None)
        return None

    async def load(self, secret: SessionSecret | None, *, fresh: bool = False) -> Session | None:
        """The live session of a cookie secret, or None. ``fresh`` skips the local cache."""
        if secret is None:
            return None
        sid = self._sid(secret)
        if not fresh:
            session = self.cached(secret)
            if session is not None:
                return session
            now = self._clock()
            # When the cached copy lapses, every concurrent request of the session would read
            # the store at once (hundreds, under load); one read serves them all instead.
            pending = self._loading.get(sid)
            if pending is None:
                pending = asyncio.ensure_future(self._read(secret, sid, now))
                self._loading[sid] = pending
                pending.add_done_callback(lambda _: self._loading.pop(sid, None))
            return await asyncio.shield(pending)
        return await self._read(secret, sid, self._clock())

    async def _read(self, secret: SessionSecret, sid: StoreKey, now: float) -> Session | None:
        # ``now`` is taken before the read: the cached copy ages from when the store answered
        # for it at the earliest, so a logout elsewhere is never hidden for longer than cache_ttl.
        blob = await self.store.get(session_key(sid))
        if blob is None:
            self._forget(sid)
            return None
        try:
            data = SessionData.from_bytes(open_sealed(secret_key(secret), blob, sid.encode()))
        except (DecryptError, ValueError, TypeError, KeyError):
            log.warning("session.undecryptable", extra={"event": "session.undecryptable"})
            return None
        if data.expires_at <= now:
            await self.end_ids(sid)
            return None
        if self._issuers and not self._provider_unchanged(data):
            # Its provider left the config, or its name now stands for another issuer: nothing
            # could refresh, revoke or end it there, and its tokens must not go to another OP.
            log.warning(
                "session.unknown_idp", extra={"event": "session.unknown_idp", "idp": data.idp}
            )
            await self.end_ids(sid)
            return None
        if now - self._touched.get(sid, 0.0) >= self._touch_interval:
            await self.store.expire(session_key(sid), self._ttl(data))
            await self._index(sid, data)  # index entries idle out with the session, not later
            self._touch(sid, now)
        session = Session(secret, sid, data, blob, public_handle(secret))
        self._remember(session, now)
        return session

    def _provider_unchanged(self, data: SessionData) -> bool:
        """The session's provider is configured, with the issuer its ID token named (when the
        record holds one: ``iss`` is kept among the claims)."""
        if data.idp is not None and data.idp not in self._issuers:
            return False
        iss = data.claims.get("iss")
        return not isinstance(iss, str) or iss == self.issuer_of(data.idp)

    async def save(self, session: Session, data: SessionData) -> Session | None:
        """Replace ``session`` with ``data`` unless someone wrote a newer version first."""
        data.version = session.data.version + 1
        blob = self._seal(session.secret, session.id, data)
        if not await self.store.replace(session.key, session.blob, blob, self._ttl(data)):
            self._cache.pop(session.id, None)
            return None
        updated = Session(session.secret, session.id, data, blob, session.handle)
        self._remember(updated, self._clock())
        return updated

    async def end(self, session: Session) -> None:
        await self.end_ids(session.id)
        data = session.data
        for key in self._index_keys("sub", data.sub, data.idp):
            await self.store.index_remove(key, session.id)
        if data.sid:
            for key in self._index_keys("sid", data.sid, data.idp):
                await self.store.index_remove(key, session.id)

    def issuer_of(self, idp: str | None) -> str | None:
        """The issuer of a provider (None: the default); None when no issuers are configured.
        KeyError for a name that is not configured."""
        if not self._issuers:
            return None
        return self._issuers[idp or self.default_idp or ""]

    def _index_keys(self, kind: str, value: str, idp: str | None) -> list[str]:
        """The index keys that may hold a provider's sessions under ``value``: its per-issuer
        key, and for the default provider the issuer-less key of older records too."""
        issuer = self.issuer_of(idp)
        keys = [_index_key(kind, value, issuer)]
        if issuer is not None and (idp or self.default_idp) == self.default_idp:
            keys.append(_index_key(kind, value, None))
        return keys

    async def end_ids(self, *ids: StoreKey) -> int:
        """End sessions by id, without their cookie (back-channel logout, operators)."""
        for sid in ids:
            self._forget(sid)
        return await self.store.delete(*(session_key(sid) for sid in ids))

    async def ids_for(
        self, *, sub: str | None = None, sid: str | None = None, idp: str | None = None
    ) -> list[StoreKey]:
        """Ids of the live sessions of a subject and/or an OP session at provider ``idp``
        (None: the default provider)."""
        found: set[str] = set()
        for kind, value in (("sub", sub), ("sid", sid)):
            if value is not None:
                for key in self._index_keys(kind, value, idp):
                    found.update(await self.store.index_members(key))
        live = [
            StoreKey(i) for i in sorted(found) if await self.store.ttl(session_key(StoreKey(i)))
        ]
        return live

    async def end_matching(
        self, *, sub: str | None = None, sid: str | None = None, idp: str | None = None
    ) -> int:
        ids = await self.ids_for(sub=sub, sid=sid, idp=idp)
        ended = await self.end_ids(*ids) if ids else 0
        await self._unindex(ids, sub=sub, sid=sid, idp=idp)
        return ended

    async def _unindex(
        self, ids: list[StoreKey], *, sub: str | None, sid: str | None, idp: str | None
    ) -> None:
        for kind, value in (("sub", sub), ("sid", sid)):
            if value is not None and ids:
                for key in self._index_keys(kind, value, idp):
                    await self.store.index_remove(key, *ids)

    async def end_op_session(
        self, *, sid: str | None, sub: str | None, idp: str | None = None
    ) -> int:
        """Back-Channel Logout 1.0, 2.7: end the sessions a logout token names.

        With ``sid``, only the sessions of that OP session (and, when ``sub`` is given too, only
        those also indexed under that subject, so a token cannot end another user's session);
        with ``sub`` alone, every session of the subject.
        """
        if sid is None:
            return await self.end_matching(sub=sub, idp=idp) if sub is not None else 0
        ids = await self.ids_for(sid=sid, idp=idp)
        if sub is not None:
            of_sub = set(await self.ids_for(sub=sub, idp=idp))
            ids = [i for i in ids if i in of_sub]
        if not ids:
            return 0
        ended = await self.end_ids(*ids)
        await self._unindex(ids, sub=sub, sid=sid, idp=idp)
        return ended

    async def jti_seen(self, jti: str, idp: str | None = None) -> bool:
        """Whether a logout token of this provider with this ``jti`` was already acted on
        (``jti`` is unique per issuer only)."""
        return await self.store.get(_jti_key(jti, self.issuer_of(idp))) is not None

    async def record_jti(self, jti: str, ttl: float, idp: str | None = None) -> None:
        """Remember a logout token's ``jti`` for as long as the token could be accepted."""
        await self.store.add(_jti_key(jti, self.issuer_of(idp)), b"1", max(1.0, ttl))

    def idle_deadline(self, session: Session) -> float:
        """When the session ends if the user does nothing more (bounded by its absolute end)."""
        touched = self._touched.get(session.id, self._clock())
        return min(session.data.expires_at, touched + self.idle_timeout)

    async def _index(self, sid: StoreKey, data: SessionData) -> None:
        ttl = self._ttl(data)
        issuer = self.issuer_of(data.idp)
        await self.store.index_add(_index_key("sub", data.sub, issuer), sid, ttl)
        if data.sid:
            await self.store.index_add(_index_key("sid", data.sid, issuer), sid, ttl)

    def _ttl(self, data: SessionData) -> float:
        return max(0.001, min(self.idle_timeout, data.expires_at - self._clock()))

    def _seal(self, secret: SessionSecret, sid: StoreKey, data: SessionData) -> bytes:
        # The store id is the associated data: a blob moved to another key does not open.
        return seal(secret_key(secret), data.to_bytes(), sid.encode())

    def _remember(self, session: Session, fetched_at: float) -> None:
        if self.cache_ttl <= 0:
            return
        if len(self._cache) >= _CACHE_MAX:
            self._cache.pop(next(iter(self._cache)))
        self._cache[session.id] = _Cached(session, fetched_at)

    def _touch(self, sid: StoreKey, now: float) -> None:
        # Sessions that simply expire are never ended here: bound their traces like the cache.
        self._touched.pop(sid, None)
        if len(self._touched) >= _CACHE_MAX:
            self._touched.pop(next(iter(self._touched)))
        self._touched[sid] = now

    def _forget(self, sid: StoreKey) -> None:
        self._cache.pop(sid, None)
        self._touched.pop(sid, None)
        dpop.forget(sid)  # its DPoP key object, if any, leaves with it

    # -- login transactions ---------------------------------------------------------------

    async def begin_login(self, browser: SessionSecret, tx: LoginTransaction) -> None:
        key = _tx_key(tx.state)
        raw = json.dumps(dataclasses.asdict(tx)).encode()
        await self.store.set(
            key, seal(secret_key(browser, "tx"), raw, key.encode()), self.login_timeout
        )

    async def finish_login(
        self, browser: SessionSecret | None, state: str | None
    ) -> LoginTransaction:
        """The transaction ``state`` names, consumed: single use and bound to this browser."""
        if not state:
            raise LoginFailed("the state parameter is missing")
        key = _tx_key(state)
        blob = await self.store.get(key)
        if blob is None:
            raise LoginFailed("unknown, expired or already used state")
        if browser is None:
            raise LoginFailed("this login was not started in this browser")
        try:
            tx = LoginTransaction(
                **json.loads(open_sealed(secret_key(browser, "tx"), blob, key.encode()))
            )
        except (DecryptError, ValueError, TypeError):
            raise LoginFailed("this login was not started in this browser") from None
        # GETDEL decides between two racing callbacks with the same state: one wins.
        if await self.store.take(key) != blob or tx.state != state:
            raise LoginFailed("unknown, expired or already used state")
        if tx.created_at + self.login_timeout < self._clock():
            raise LoginTooSlow(tx.return_to)
        return tx


def _jti_key(jti: str, issuer: str | None) -> str:
    material = jti if issuer is None else f"{issuer}\x00{jti}"
    return f"bff:{{jti:{hashlib.sha256(material.encode()).hexdigest()[:32]}}}:seen"


def _tx_key(state: str) -> str:
    return f"bff:{{{store_id(SessionSecret(state), 'tx')}}}:tx"
