"""Test doubles shared by the unit tests."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from bff.oidc import InvalidGrant, TokenSet


class FakeClock:
    """A clock that stands still until ``advance``; starts at a realistic epoch time."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeOp:
    """The part of ``OidcClient`` that ``TokenRefresher`` uses, with a real OP's rotation rule.

    Each refresh issues ``AT-<n>``/``RT-<n>``; like an OP with refresh-token rotation and reuse
    detection, presenting a refresh token that is not the current one revokes the whole grant,
    so a test that refreshes twice with the same token loses the session (as a user would).
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        rotate: bool = True,
        lifetime: float = 300.0,
        current: str = "RT-0",
    ) -> None:
        self.settings = SimpleNamespace(http_timeout=5.0)
        self.delay = delay
        self.rotate = rotate
        self.lifetime = lifetime
        self.current: str | None = current
        self.fail_with: Exception | None = None
        self.id_tokens = False  # issue an ID token with each refresh ...
        self.id_token_error: Exception | None = None  # ... which validation refuses with this
        self.presented: list[str] = []
        self.revoked: list[tuple[str, str]] = []  # (token, hint) in the order revoked
        self.started = asyncio.Event()

    @property
    def refreshes(self) -> int:
        return len(self.presented)

    async def refresh(self, refresh_token: str, *, answer_timeout: float | None = None) -> TokenSet:
        self.presented.append(refresh_token)
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        if refresh_token != self.current:
            self.current = None  # reuse detected: the grant is revoked
            raise InvalidGrant("refresh token reused")
        n = self.refreshes
        if self.rotate:
            self.current = f"RT-{n}"
        return TokenSet(
            access_token=f"AT-{n}",
            token_type="Bearer",
            expires_at=time.time() + self.lifetime,
            refresh_token=f"RT-{n}" if self.rotate else None,
            id_token=f"IDT-{n}" if self.id_tokens else None,
            scope=None,
            lifetime=self.lifetime,
        )

    async def revoke(self, token: str, hint: str) -> bool:
        self.revoked.append((token, hint))
        return True

    async def validate_id_token(
        self, id_token: str, *, nonce: str | None, expected_sub: str | None = None
    ) -> dict[str, Any]:
        if not self.id_tokens:
            raise AssertionError("this FakeOp issues no ID tokens")
        if self.id_token_error is not None:
            raise self.id_token_error
        return {"sub": expected_sub, "iss": "fake"}
