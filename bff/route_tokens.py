"""Per-route tokens (issue 12): RFC 8707 resource indicators and RFC 8693 token exchange.

A route with ``resource:`` (``token: user`` or ``user_or_none``) gets an access token for that
resource alone, obtained with the session's refresh token (the refresh grant with ``resource``,
or ``audience`` for OPs that name it so: ``oidc.resource_parameter``). A ``token: exchange`` route
gets the user's access token exchanged for one scoped to its ``audience``/``resource``. Either
token goes to that route's upstream only; a route without them gets the session's normal token.

**Resource tokens live in the session record** (``SessionData.resource_tokens``, sealed with the
rest), each refreshed on its own expiry (``min(refresh_skew, lifetime / 2)`` before it). Every
refresh of a session, for its main token or for any resource, presents the one refresh token the
session holds, and a rotating OP takes a refresh token presented twice for theft and revokes the
grant. So they all share **the session's single flight across instances**: the store lock
``bff:{<id>}:lock`` of :mod:`bff.refresh`; the holder re-reads the session after locking and
writes with compare-and-set, and stores the rotated refresh token for everyone. In one process,
concurrent callers share one future per (session, resource); like the main refresh, the lock
holder goes on waiting for the OP's answer after its callers got their 503, so a late answer's
rotated refresh token is not lost.

**Exchanged tokens live under their own key** ``bff:{<id>}:x:<route hash>`` (same hash tag as the
session, so Redis Cluster keeps them in its slot), AES-GCM under a key derived from the session's
cookie secret, with the store key as associated data, and die with their own expiry. Not in the
session record: a cache entry per route would make every exchange a compare-and-set race with the
refreshes of the record. The route hash covers the exchange's parameters, so a changed config
never serves a token minted for another audience. A per-process dict answers the hot path;
across instances a store lock on ``bff:{<id>}:x:<route hash>:lock`` lets one instance exchange.

Failures never fall back to the user's own token: an OP that is down or slow is 503, a refusal
(``invalid_grant``, ``invalid_target``, ``unauthorized_client``, ...) is 403 ``token_refused``,
and ``invalid_grant`` on a resource refresh ends the session (401) like the main refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from bff import dpop
from bff.background import Background
from bff.errors import Forbidden, ProviderUnavailable, SessionExpired, StoreUnavailable
from bff.keys import DecryptError, open_sealed, seal, secret_key
from bff.locks import StoreLock, poll_delays
from bff.metrics import Metrics
from bff.oidc import TOKEN_EXCHANGE_GRANT, InvalidGrant, OidcClient, TokenRequestRefused, TokenSet
from bff.sessions import Session, SessionData, SessionManager, exchange_key, lock_key

if TYPE_CHECKING:
    from bff.config import OidcSettings, Settings, Upstream
    from bff.refresh import TokenRefresher

__all__ = [
    "RoutePlan",
    "RouteTokens",
    "TokenRefused",
    "login_resources",
    "plan_for",
    "required_grants",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CACHE_MAX: Final = 50_000
#: OAuth errors that mean "the OP is not answering properly", not "the OP says no".
_UNAVAILABLE_ERRORS: Final = frozenset(
    {"temporarily_unavailable", "server_error", "invalid_response"}
)


class TokenRefused(Forbidden):
    """The OP refused a token for this route (403): never the user's own token instead."""

    error = "token_refused"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What token a route needs, computed once per route."""

    kind: Literal["resource", "exchange"]
    key: str  # resource: the resource list; exchange: a hash of the exchange's parameters
    resources: tuple[str, ...]
    audience: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()


def plan_for(upstream: Upstream) -> RoutePlan | None:
    """The route's plan, or None when it gets the session's normal token (or none)."""
    if upstream.token == "exchange":  # noqa: S105 (a mode name)
        material = json.dumps(
            [upstream.audience, upstream.resource, sorted(upstream.exchange_scopes)]
        )
        digest = hashlib.sha256(material.encode()).hexdigest()[:24]
        return RoutePlan(
            "exchange", digest, upstream.resource, upstream.audience, upstream.exchange_scopes
        )
    if upstream.resource and upstream.token in ("user", "user_or_none"):
        return RoutePlan("resource", " ".join(upstream.resource), upstream.resource)
    return None


def login_resources(settings: Settings, provider: OidcSettings | None = None) -> tuple[str, ...]:
    """The resources a login at ``provider`` (None: the default) asks for (RFC 8707 2.1): those
    of the user routes, when that OP takes the ``resource`` parameter and its
    ``login_resources`` is on; each provider by its own settings, never the default's. An OP
    ignores parameters it does not know (RFC 6749 3.1), so this is safe where resource
    indicators are unsupported."""
    oidc = provider if provider is not None else settings.oidc
    if oidc.resource_parameter != "resource" or not oidc.login_resources:
        return ()
    found: dict[str, None] = {}
    for upstream in settings.upstreams:
        plan = plan_for(upstream)
        if plan is not None and plan.kind == "resource":
            found.update(dict.fromkeys(plan.resources))
    return tuple(found)


def required_grants(settings: Settings) -> dict[str, str]:
    """Grant types discovery must advertise: the token exchange, when a route needs it."""
    routes = [u.path for u in settings.upstreams if u.token == "exchange"]  # noqa: S105
    if not routes:
        return {}
    return {TOKEN_EXCHANGE_GRANT: f"token: exchange on {', '.join(routes)}"}


@dataclass(frozen=True, slots=True)
class _Exchanged:
    token: str = dataclasses.field(repr=False)  # never in a repr or a log line
    expires_at: float
    renew_at: float

    def to_bytes(self) -> bytes:
        return json.dumps({"t": self.token, "e": self.expires_at, "r": self.renew_at}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> _Exchanged:
        v = json.loads(raw)
        return cls(str(v["t"]), float(v["e"]), float(v["r"]))


class RouteTokens:
    def __init__(
        self,
        sessions: SessionManager,
        oidc: OidcClient,
        refresher: TokenRefresher,
        *,
        skew: float = 60.0,
        lease: float = 5.0,
        default_lifetime: float = 300.0,
        min_forced_interval: float = 10.0,
        answer_timeout: float = 60.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessions = sessions
        self._oidc = oidc
        self._refresher = refresher
        self.skew = skew
        self.lease = lease
        self.default_lifetime = default_lifetime  # an exchange answer without expires_in
        self.min_forced_interval = min_forced_interval  # between renewals an upstream forced
        self.caller_timeout = oidc.settings.http_timeout
        self.wait_timeout = oidc.settings.http_timeout + 2 * lease
        self.answer_timeout = answer_timeout
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._plans: dict[int, RoutePlan | None] = {}
        self._inflight: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._background = Background()  # refreshes that outlive their callers
        self._local: dict[tuple[str, str], _Exchanged] = {}
        self._forced_at: dict[tuple[str, str], float] = {}

    def plan(self, upstream: Upstream) -> RoutePlan | None:
        key = id(upstream)
        if key not in self._plans:
            self._plans[key] = plan_for(upstream)
        return self._plans[key]

    async def token(self, session: Session, plan: RoutePlan) -> tuple[Session, str, bool]:
        """The route's token (and the session, perhaps updated), and whether it is brand new."""
        if plan.kind == "resource":
            entry = self._entry(session.data, plan.key)
            if entry is not None and self._resource_fresh(entry):
                return session, entry["t"], False
            session = await self._single_flight(
                ("r", session.id, plan.key),
                functools.partial(self._refresh_resource, session, plan, None),
            )
            return session, self._resource_of(session, plan), True
        cached = self._local.get((session.id, plan.key))
        if cached is not None and cached.renew_at > self._clock():
            return session, cached.token, False
        exchanged = await self._single_flight(
            ("x", session.id, plan.key),
            functools.partial(self._exchange_across, session, plan, None),
        )
        return session, exchanged.token, True

    async def renew(self, session: Session, plan: RoutePlan, rejected: str) -> str | None:
        """A new token after the upstream refused ``rejected``; None to pass the 401 on."""
        key = (session.id, plan.key)
        now = self._clock()
        if now - self._forced_at.get(key, float("-inf")) < self.min_forced_interval:
            return None  # refused again right away: asking the OP again would not help
        if len(self._forced_at) >= _CACHE_MAX:
            self._forced_at.pop(next(iter(self._forced_at)))
        self._forced_at[key] = now
        if plan.kind == "resource":
            session = await self._single_flight(
                ("r", session.id, plan.key),
                functools.partial(self._refresh_resource, session, plan, rejected),
            )
            new = self._resource_of(session, plan)
        else:
            self._local.pop(key, None)
            new = (
                await self._single_flight(
                    ("x", session.id, plan.key),
                    functools.partial(self._exchange_across, session, plan, rejected),
                )
            ).token
        return new if new != rejected else None

    # -- single flight in the process ---------------------------------------------------------

    async def _single_flight(
        self, key: tuple[str, ...], work: Callable[[], Coroutine[Any, Any, T]]
    ) -> T:
        pending = self._inflight.get(key)
        if pending is None:
            # A task of its own: a caller that goes away must not cancel the others' result.
            pending = asyncio.ensure_future(work())
            self._inflight[key] = pending
            pending.add_done_callback(functools.partial(self._finished, key))
        result: T = await asyncio.shield(pending)
        return result

    def _finished(self, key: tuple[str, ...], task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away

    # -- resource tokens: the session's single flight -------------------------------------------

    @staticmethod
    def _entry(data: SessionData, key: str) -> dict[str, Any] | None:
        entry = data.resource_tokens.get(key)
        return entry if isinstance(entry, dict) and isinstance(entry.get("t"), str) else None

    def _resource_fresh(self, entry: dict[str, Any]) -> bool:
        expires_at, lifetime = entry.get("e"), entry.get("l")
        if expires_at is None:
            return True
        skew = self.skew if lifetime is None else min(self.skew, float(lifetime) / 2)
        return float(expires_at) - skew > self._clock()

    def _resource_of(self, session: Session, plan: RoutePlan) -> str:
        entry = self._entry(session.data, plan.key)
        if entry is None:  # only when another writer won a race we lost: try again later
            raise ProviderUnavailable("the route's token could not be stored")
        token: str = entry["t"]
        return token

    def _resource_good(self, data: SessionData, key: str, rejected: str | None) -> bool:
        entry = self._entry(data, key)
        if entry is None:
            return False
        if rejected is not None:
            return bool(entry["t"] != rejected)
        return self._resource_fresh(entry)

    async def _reload(self, session: Session) -> Session:
        fresh = await self._sessions.load(session.secret, fresh=True)
        if fresh is None:
            raise SessionExpired()
        return fresh

    async def _refresh_resource(
        self, session: Session, plan: RoutePlan, rejected: str | None
    ) -> Session:
        """Like ``TokenRefresher._refresh_across_instances``, on the same lock."""
        lock = StoreLock(self._sessions.store, lock_key(session.id), self.lease)
        deadline = self._clock() + self.wait_timeout
        delays = poll_delays()
        while True:
            if await lock.acquire():
                work = self._background.spawn(
                    self._resource_then_release(lock, session, plan, rejected)
                )
                try:
                    return await asyncio.wait_for(asyncio.shield(work), self.caller_timeout)
                except TimeoutError:
                    # The holder goes on waiting for the OP's answer (its rotated refresh token).
                    raise ProviderUnavailable("the OP is slow to issue the route's token") from None
            await asyncio.sleep(next(delays))
            fresh = await self._reload(session)
            if self._resource_good(fresh.data, plan.key, rejected):
                return fresh
            if self._clock() > deadline:
                raise ProviderUnavailable("a token refresh is taking too long")

    async def _resource_then_release(
        self, lock: StoreLock, session: Session, plan: RoutePlan, rejected: str | None
    ) -> Session:
        async with lock:
            return await self._resource_holding_lock(session, plan, rejected)

    async def _resource_holding_lock(
        self, session: Session, plan: RoutePlan, rejected: str | None
    ) -> Session:
        fresh = await self._reload(session)  # the newest refresh token, whoever rotated it
        if self._resource_good(fresh.data, plan.key, rejected):
            return fresh
        refresh_token = fresh.data.refresh_token
        if refresh_token is None:
            raise TokenRefused("the session has no refresh token to obtain this route's token")
        try:
            # A DPoP session's resource tokens are bound to its key too (invariant 22).
            key = dpop.session_key(fresh)
            bound: dict[str, Any] = {"dpop_key": key} if key is not None else {}
            tokens = await self._refresher.oidc_for(fresh.data).refresh(
                refresh_token, answer_timeout=self.answer_timeout, resources=plan.resources, **bound
            )
        except InvalidGrant:
            self._metrics.inc("bff_refreshes_total", outcome="invalid_grant")
            log.info("route_token.invalid_grant", extra={"event": "route_token.invalid_grant"})
            await self._sessions.end(fresh)
            raise SessionExpired("the OP no longer accepts this session's refresh token") from None
        except TokenRequestRefused as exc:
            self._metrics.inc("bff_refreshes_total", outcome="refused")
            log.warning(
                "route_token.refused", extra={"event": "route_token.refused", "error": exc.error}
            )
            if exc.error in _UNAVAILABLE_ERRORS:
                raise ProviderUnavailable("the OP failed to issue the route's token") from None
            raise TokenRefused("the OP refused a token for this route's resource") from None
        except ProviderUnavailable:
            self._metrics.inc("bff_refreshes_total", outcome="unavailable")
            raise
        entry = {"t": tokens.access_token, "e": tokens.expires_at, "l": tokens.lifetime}
        data = dataclasses.replace(
            fresh.data,
            # A rotating OP's new refresh token is the session's from now on, for every token.
            refresh_token=tokens.refresh_token or refresh_token,
            resource_tokens={**fresh.data.resource_tokens, plan.key: entry},
        )
        saved = await self._sessions.save(fresh, data)
        if saved is None:
            current = await self._sessions.load(session.secret, fresh=True)
            if current is None:  # logged out meanwhile: these tokens must not outlive it
                await self._revoke(tokens, fresh.data)
                raise SessionExpired()
            log.warning("route_token.lost_race", extra={"event": "route_token.lost_race"})
            return current
        self._metrics.inc("bff_refreshes_total", outcome="ok")
        log.info(
            "route_token.refreshed",
            extra={"event": "route_token.refreshed", "session": fresh.id[:8]},
        )
        return saved

    async def _revoke(self, tokens: TokenSet, data: SessionData) -> None:
        oidc = self._refresher.oidc_for(data)  # the provider that minted them
        if tokens.refresh_token:
            await oidc.revoke(tokens.refresh_token, "refresh_token")
        await oidc.revoke(tokens.access_token, "access_token")

    # -- exchanged tokens: their own sealed key ---------------------------------------------------

    def _usable(self, token: _Exchanged | None, rejected: str | None) -> bool:
        return token is not None and token.renew_at > self._clock() and token.token != rejected

    def _remember(self, session: Session, plan: RoutePlan, token: _Exchanged) -> _Exchanged:
        if len(self._local) >= _CACHE_MAX:
            self._local.pop(next(iter(self._local)))
        self._local[(session.id, plan.key)] = token
        return token

    async def _read(self, session: Session, key: str) -> _Exchanged | None:
        blob = await self._sessions.store.get(key)
        if blob is None:
            return None
        try:
            raw = open_sealed(secret_key(session.secret, "exchange"), blob, key.encode())
            return _Exchanged.from_bytes(raw)
        except (DecryptError, ValueError, KeyError, TypeError):
            return None  # damaged or from another session's secret: exchange again

    async def _write(self, session: Session, key: str, token: _Exchanged) -> None:
        ttl = min(token.expires_at - self._clock(), self._sessions.idle_timeout)
        if ttl > 0:
            blob = seal(secret_key(session.secret, "exchange"), token.to_bytes(), key.encode())
            await self._sessions.store.set(key, blob, ttl)

    async def _exchange_across(
        self, session: Session, plan: RoutePlan, rejected: str | None
    ) -> _Exchanged:
        key = exchange_key(session.id, plan.key)
        try:
            stored = await self._read(session, key)
            if stored is not None and self._usable(stored, rejected):
                return self._remember(session, plan, stored)
            lock = StoreLock(self._sessions.store, key + ":lock", self.lease)
            deadline = self._clock() + self.wait_timeout
            delays = poll_delays()
            while True:
                if await lock.acquire():
                    async with lock:
                        stored = await self._read(session, key)  # written since our read?
                        if stored is not None and self._usable(stored, rejected):
                            return self._remember(session, plan, stored)
                        fetched = await self._exchange(session, plan)
                        with contextlib.suppress(StoreUnavailable):  # good for this process
                            await self._write(session, key, fetched)
                        return self._remember(session, plan, fetched)
                await asyncio.sleep(next(delays))  # another instance exchanges: use its token
                stored = await self._read(session, key)
                if stored is not None and self._usable(stored, rejected):
                    return self._remember(session, plan, stored)
                if self._clock() > deadline:
                    raise ProviderUnavailable("a token exchange is taking too long")
        except StoreUnavailable:
            log.warning("exchange.store_unavailable", extra={"event": "exchange.no_store"})
            return self._remember(session, plan, await self._exchange(session, plan))

    async def _exchange(self, session: Session, plan: RoutePlan) -> _Exchanged:
        if session.data.dpop_jwk is not None:
            # Config refuses exchange with oidc.dpop, but a session logged in while DPoP was on
            # outlives a config without it: a bound token is never traded, without a proof, for
            # an unbound one (invariant 22).
            raise TokenRefused("a DPoP-bound session's token is not exchanged")
        _, subject = await self._refresher.access_token(session)
        try:
            tokens = await self._refresher.oidc_for(session.data).token_exchange(
                subject, audience=plan.audience, resources=plan.resources, scopes=plan.scopes
            )
        except (InvalidGrant, TokenRequestRefused) as exc:
            error = exc.error if isinstance(exc, TokenRequestRefused) else "invalid_grant"
            self._metrics.inc("bff_token_exchanges_total", outcome="refused")
            log.warning(
                "exchange.refused",
                extra={"event": "exchange.refused", "grant": TOKEN_EXCHANGE_GRANT, "error": error},
            )
            if error in _UNAVAILABLE_ERRORS:
                raise ProviderUnavailable("the OP failed to exchange the token") from None
            refused = "the OP refused to exchange the user's token for this route"
            raise TokenRefused(refused) from None
        except ProviderUnavailable:
            self._metrics.inc("bff_token_exchanges_total", outcome="unavailable")
            raise
        self._metrics.inc("bff_token_exchanges_total", outcome="ok")
        now = self._clock()
        expires_at = tokens.expires_at or now + self.default_lifetime
        lifetime = max(0.0, expires_at - now)
        renew_at = expires_at - min(self.skew, lifetime / 2)
        return _Exchanged(tokens.access_token, expires_at, renew_at)
