"""Silent refresh, single-flight per session across tasks, processes and instances (invariant 8).

Shaped like oauth2-proxy's ``refreshSessionIfNeeded``:

1. In one process, concurrent requests of a session share one :class:`asyncio.Future`.
2. Across processes, a store lock (owner token + lease, renewed while the OP is slow) lets one
   refresh; the others poll, re-read the session and use the tokens the holder wrote.
3. The holder re-reads the session *after* taking the lock and checks again: it may already have
   been refreshed. It writes with compare-and-set, so a stale version never overwrites a newer one.

With refresh-token rotation this matters: a refresh token presented twice makes the OP revoke the
whole grant, so two refreshes racing would log the user out.

Outcomes: ``invalid_grant`` ends the session (401 ``session_expired``); an OP that is down, slow,
answers 5xx or refuses for another reason keeps the session (503 with ``Retry-After``).

**A slow answer is still awaited.** This was the cause of the once-flaky
``test_an_op_stopped_mid_refresh_gives_503_and_the_session_refreshes_once_it_is_back`` ("the OP
no longer accepts this session's refresh token"), and the same thing logs real users out under
load. A refresh request that reached the OP may be carried out there even when the answer comes
after ``oidc.http_timeout``: in that test the OP is SIGSTOPped with the request already in its
socket buffer, and on SIGCONT it reads and handles it; an overloaded OP does the same. We used
to drop the connection at the timeout, so the OP rotated the refresh token, we kept the old one,
and the next refresh presented a consumed token, which a rotating OP takes for theft: it revokes
the grant and the user is logged out. Whether the OP handled the abandoned request depended on
scheduling, hence a flaky test (reproduced under CPU load: 2 logouts in 6 runs before this fix,
0 after; ``test_an_op_answering_after_the_timeout_does_not_lose_the_rotated_refresh_token``
reproduces it deterministically). The code was wrong, not the test (which only also had to
accept 503 while the resumed OP catches up). Now the callers get their 503 after
``http_timeout``, but the lock holder goes on waiting for the OP's answer (up to
``answer_timeout``; its lock stays renewed, so nobody presents the same refresh token meanwhile)
and stores whatever tokens arrive. Only a request that never got a connection fails fast.

**Short-lived access tokens** (issue 9, point 8): the effective skew is ``min(skew, lifetime/2)``
with ``lifetime`` the token's ``expires_in`` at issue (kept in the session), so an OP issuing
8-second tokens costs one refresh per 4 seconds of use, not one per call.

**Each session refreshes at its own provider** (issue 12, point 5): ``providers`` maps the
config names to their clients; a session's ``idp`` picks one (none: the default, ``oidc``).

**A refresh that finishes after a logout** (point 10) finds its session gone: the tokens it just
got are revoked at the OP at once, so no token outlives the logout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from bff import dpop, metrics, tracing
from bff.background import Background
from bff.errors import ProviderUnavailable, SessionExpired, StoreUnavailable
from bff.locks import StoreLock, poll_delays
from bff.metrics import Metrics
from bff.oidc import (
    InvalidGrant,
    InvalidToken,
    OidcClient,
    TokenRequestRefused,
    TokenSet,
    user_claims,
)
from bff.sessions import Session, SessionData, SessionManager, lock_key, refresh_failure_key

__all__ = ["TokenRefresher"]

log = logging.getLogger(__name__)


class TokenRefresher:
    def __init__(
        self,
        sessions: SessionManager,
        oidc: OidcClient,
        *,
        skew: float = 60.0,
        lease: float = 5.0,
        wait_timeout: float | None = None,
        min_forced_interval: float = 10.0,
        answer_timeout: float = 60.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        providers: Mapping[str, OidcClient] | None = None,
    ) -> None:
        self._sessions = sessions
        self._oidc = oidc
        self._providers = dict(providers or {})
        self.skew = skew
        self.lease = lease
        # Waiting longer than the OP's own timeout plus a lease gains nothing.
        self.wait_timeout = wait_timeout or (oidc.settings.http_timeout + 2 * lease)
        self.min_forced_interval = min_forced_interval  # between refreshes an upstream forced
        # How long callers wait for the lock holder's refresh before their 503 ...
        self.caller_timeout: float = oidc.settings.http_timeout
        # ... and how long the holder itself goes on waiting for the OP's answer (see above).
        self.answer_timeout = answer_timeout
        self._background = Background()  # refreshes that outlive their callers
        self._short_lifetime_logged = False
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._inflight: dict[str, asyncio.Future[Session]] = {}
        self._forced_at: dict[str, float] = {}

    def oidc_for(self, data: SessionData) -> OidcClient:
        """The client of the provider the session was logged in at (the default: ``oidc``)."""
        if data.idp is None:
            return self._oidc
        return self._providers.get(data.idp, self._oidc)

    def effective_skew(self, data: SessionData) -> float:
        """``min(skew, lifetime / 2)``: a token shorter-lived than the skew is not refreshed at
        once and on every call, but once half of its life has passed."""
        oidc = self.oidc_for(data)
        # The default provider's skew is ``skew``; another provider's is its own refresh_skew.
        skew = self.skew if oidc is self._oidc else oidc.settings.refresh_skew
        if data.access_lifetime is None:
            return skew
        return min(skew, data.access_lifetime / 2)

    def needs_refresh(self, session: Session) -> bool:
        expires_at = session.data.access_expires_at
        return (
            expires_at is not None
            and expires_at - self.effective_skew(session.data) <= self._clock()
        )

    def note_lifetime(self, lifetime: float | None) -> None:
        """Say once per process when the OP's access tokens live shorter than the skew."""
        if lifetime is None or lifetime >= self.skew or self._short_lifetime_logged:
            return
        self._short_lifetime_logged = True
        log.warning(
            "oidc.short_lived_access_tokens",
            extra={
                "event": "oidc.short_lived_access_tokens",
                "lifetime": lifetime,
                "refresh_skew": self.skew,
                "effective_skew": lifetime / 2,
            },
        )

    async def access_token(self, session: Session) -> tuple[Session, str]:
        """The session (perhaps refreshed) and an access token that is not about to expire."""
        if self.needs_refresh(session):
            session = await self.refresh(session)
        return session, session.data.access_token

    async def refresh(self, session: Session, *, force: bool = False) -> Session:
        """Refresh once for everyone. ``force``: the upstream refused a token we thought valid."""
        pending = self._inflight.get(session.id)
        if pending is None and force:
            # An upstream refused a token again right after a forced refresh: another refresh
            # would not help, and a client could otherwise make us ask the OP on every call.
            now = self._clock()
            if now - self._forced_at.get(session.id, float("-inf")) < self.min_forced_interval:
                return session
            if len(self._forced_at) >= 50_000:
                self._forced_at.pop(next(iter(self._forced_at)))
            self._forced_at[session.id] = now
        if pending is None:
            # A task of its own: a caller that goes away (client disconnect, timeout) must not
            # cancel the refresh that the other waiters, and the rotated token, depend on.
            pending = asyncio.ensure_future(self._refresh_across_instances(session, force))
            self._inflight[session.id] = pending
            pending.add_done_callback(functools.partial(self._finished, session.id))
        return await asyncio.shield(pending)

    def _finished(self, session_id: str, task: asyncio.Future[Session]) -> None:
        if self._inflight.get(session_id) is task:
            del self._inflight[session_id]
        if not task.cancelled():
            task.exception()  # mark retrieved: no warning when every caller has gone away

    def _still_good(self, before: Session, after: Session, force: bool) -> bool:
        if force:
            # The main token itself must have changed: a resource token's refresh
            # (route_tokens.py) also writes a new version, and is no answer to this one.
            return after.data.access_token != before.data.access_token
        return not self.needs_refresh(after)

    async def _reload(self, session: Session) -> Session:
        fresh = await self._sessions.load(session.secret, fresh=True)
        if fresh is None:
            raise SessionExpired()
        return fresh

    @tracing.traced("bff.refresh")
    async def _refresh_across_instances(self, session: Session, force: bool) -> Session:
        store = self._sessions.store
        lock = StoreLock(store, lock_key(session.id), self.lease)
        failed_key = refresh_failure_key(session.id)
        deadline = self._clock() + self.wait_timeout
        delays = poll_delays()
        started = time.perf_counter()  # for bff_refresh_lock_wait_seconds
        failure_seen = await store.get(failed_key)
        wait = tracing.start_span("bff.refresh.lock_wait")  # ends with the lock or its result
        while True:
            # The holder we waited for could not reach the OP: answer 503 now rather than try
            # the OP again ourselves, one instance after another, each for a whole timeout.
            # Only a failure *during* our wait counts; a newcomer tries the OP afresh.
            if await store.get(failed_key) not in (None, failure_seen):
                raise ProviderUnavailable("the OpenID Provider failed to refresh the token")
            if await lock.acquire():
                tracing.end_span(wait)
                metrics.observe_lock_wait("acquired", started)
                work = self._background.spawn(self._refresh_then_release(lock, session, force))
                try:
                    return await asyncio.wait_for(asyncio.shield(work), self.caller_timeout)
                except (ProviderUnavailable, TimeoutError) as exc:
                    # Our waiters, here and on other instances, answer 503 now too. On a
                    # timeout the holder goes on waiting for the OP's answer in the background.
                    with contextlib.suppress(StoreUnavailable):
                        await store.set(
                            failed_key, lock.owner.encode(), max(1.0, self.wait_timeout)
                        )
                    if isinstance(exc, TimeoutError):
                        raise ProviderUnavailable("the OP is slow to refresh the token") from None
                    raise
            # Another instance is refreshing: wait for its result instead of racing it.
            await asyncio.sleep(next(delays))
            fresh = await self._reload(session)
            if self._still_good(session, fresh, force):
                tracing.end_span(wait)
                metrics.observe_lock_wait("joined", started)
                return fresh
            if self._clock() > deadline:
                raise ProviderUnavailable("a token refresh is taking too long")

    async def _refresh_then_release(
        self, lock: StoreLock, session: Session, force: bool
    ) -> Session:
        async with lock:
            return await self._refresh_holding_lock(session, force)

    async def _refresh_holding_lock(self, session: Session, force: bool) -> Session:
        fresh = await self._reload(session)
        if self._still_good(session, fresh, force):
            return fresh  # refreshed by someone else while we waited for the lock
        refresh_token = fresh.data.refresh_token
        if refresh_token is None:
            # Without a refresh token the session lives as long as its access token.
            expires_at = fresh.data.access_expires_at
            if expires_at is not None and expires_at <= self._clock():
                await self._sessions.end(fresh)
                raise SessionExpired("the access token expired and the OP gave no refresh token")
            return fresh
        tokens: TokenSet | None = None
        try:
            # A DPoP session's new tokens are bound to the same key (bff/dpop.py).
            oidc = self.oidc_for(fresh.data)
            key = dpop.session_key(fresh)
            bound: dict[str, Any] = {"dpop_key": key} if key is not None else {}
            tokens = await oidc.refresh(refresh_token, answer_timeout=self.answer_timeout, **bound)
            claims, id_token = fresh.data.claims, fresh.data.id_token
            if tokens.id_token:
                try:
                    validated = await oidc.validate_id_token(
                        tokens.id_token, nonce=None, expected_sub=fresh.data.sub
                    )
                except ProviderUnavailable:
                    # The OP has rotated already: dropping the new tokens because its JWKS is
                    # unreachable would end the session for good. Keep the old ID token/claims.
                    log.warning(
                        "refresh.id_token_unchecked", extra={"event": "refresh.id_token_unchecked"}
                    )
                else:
                    claims = {**claims, **user_claims(validated)}
                    id_token = tokens.id_token
        except InvalidGrant:
            self._metrics.inc("bff_refreshes_total", outcome="invalid_grant")
            log.info("refresh.invalid_grant", extra={"event": "refresh.invalid_grant"})
            await self._sessions.end(fresh)
            raise SessionExpired("the OP no longer accepts this session's refresh token") from None
        except InvalidToken as exc:
            # Refused even by a key set fetched after it failed (oidc.py): the session ends,
            # and the tokens that came with that ID token must not outlive it.
            self._metrics.inc("bff_refreshes_total", outcome="bad_id_token")
            await self._sessions.end(fresh)
            if tokens is not None:
                await self._revoke(tokens, fresh.data)
            raise SessionExpired(f"the refreshed ID token is invalid: {exc}") from None
        except TokenRequestRefused as exc:
            self._metrics.inc("bff_refreshes_total", outcome="refused")
            log.error("refresh.refused", extra={"event": "refresh.refused", "error": exc.error})
            raise ProviderUnavailable("the OP refused the refresh request") from None
        except ProviderUnavailable:
            self._metrics.inc("bff_refreshes_total", outcome="unavailable")
            raise
        data = dataclasses.replace(
            fresh.data,
            claims=claims,
            access_token=tokens.access_token,
            access_expires_at=tokens.expires_at,
            access_lifetime=tokens.lifetime,
            # An OP that does not rotate sends no new refresh token: keep the one we have.
            refresh_token=tokens.refresh_token or refresh_token,
            id_token=id_token,
            scopes=tokens.scope if tokens.scope is not None else fresh.data.scopes,
        )
        saved = await self._sessions.save(fresh, data)
        if saved is None:
            current = await self._sessions.load(session.secret, fresh=True)
            if current is None:
                # The session ended (logout, back-channel, admin) while the OP was minting these
                # tokens: the logout revoked the old ones; these must not outlive it either.
                log.info("refresh.after_logout", extra={"event": "refresh.after_logout"})
                self._metrics.inc("bff_refreshes_total", outcome="session_gone")
                await self._revoke(tokens, fresh.data)
                raise SessionExpired()
            # Only possible if our lease lapsed; whoever wrote holds the newer tokens.
            log.warning("refresh.lost_race", extra={"event": "refresh.lost_race"})
            return current
        self.note_lifetime(tokens.lifetime)
        self._metrics.inc("bff_refreshes_total", outcome="ok")
        log.info("session.refreshed", extra={"event": "session.refreshed", "session": fresh.id[:8]})
        return saved

    async def _revoke(self, tokens: TokenSet, data: SessionData) -> None:
        """RFC 7009 for tokens no session holds (refresh token first), at the provider that
        issued them; best effort."""
        oidc = self.oidc_for(data)
        if tokens.refresh_token:
            await oidc.revoke(tokens.refresh_token, "refresh_token")
        await oidc.revoke(tokens.access_token, "access_token")
