"""Shared by the logout, back-channel and user-expiry unit tests (it holds no tests itself).

A fake OP answers the OIDC client's HTTP calls in memory (discovery, JWKS, revocation), signs
logout tokens with its own key, and records what the client sent; ``build_services`` wires the
real session manager, cookie policy and OIDC client around it, and ``call`` runs a handler through
the real error middleware with a mocked request: no sockets.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import cache
from http.cookies import SimpleCookie
from types import TracebackType
from typing import Any, cast
from unittest import mock

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from bff.config import Settings, parse_settings
from bff.cookies import CookiePolicy
from bff.keys import Keyring
from bff.metrics import Metrics
from bff.middlewares import error_middleware
from bff.oidc import BACKCHANNEL_EVENT, OidcClient
from bff.refresh import TokenRefresher
from bff.services import SERVICES, Services
from bff.sessions import Session, SessionData, SessionManager
from bff.store import SessionStore

ISSUER = "https://op.example"
CLIENT_ID = "bff-client"
PUBLIC_URL = "http://127.0.0.1:8080"
KEY = "k" * 32


@cache
def op_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "op-1", "use": "sig"})


@cache
def attacker_key() -> RSAKey:
    # Same kid as the OP's: only the signature can tell them apart.
    return RSAKey.generate_key(2048, parameters={"kid": "op-1", "use": "sig"})


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"") -> None:
        self.status = status
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class FakeOp:
    """The OP's HTTP endpoints as the OIDC client sees them, in memory."""

    def __init__(self, *, end_session: bool = True, revocation: bool = True) -> None:
        self.metadata: dict[str, Any] = {
            "issuer": ISSUER,
            "authorization_endpoint": f"{ISSUER}/auth",
            "token_endpoint": f"{ISSUER}/token",
            "jwks_uri": f"{ISSUER}/jwks",
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        if end_session:
            self.metadata["end_session_endpoint"] = f"{ISSUER}/session/end"
        if revocation:
            self.metadata["revocation_endpoint"] = f"{ISSUER}/token/revocation"
        self.revocations: list[dict[str, str]] = []
        self.revocation_status = 200
        self.down = False

    def get(self, url: str, **_: Any) -> FakeResponse:
        if self.down:
            return FakeResponse(503)
        if url == f"{ISSUER}/.well-known/openid-configuration":
            return FakeResponse(200, json.dumps(self.metadata).encode())
        if url == f"{ISSUER}/jwks":
            jwks = KeySet([op_key()]).as_dict(private=False)
            return FakeResponse(200, json.dumps(jwks).encode())
        return FakeResponse(404)

    def post(self, url: str, *, data: Mapping[str, str], **_: Any) -> FakeResponse:
        if url == self.metadata.get("revocation_endpoint"):
            self.revocations.append(dict(data))
            return FakeResponse(self.revocation_status)
        return FakeResponse(404)


def settings(**oidc: Any) -> Settings:
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in oidc.items())
    return parse_settings(
        f"""
public_url: {PUBLIC_URL}
oidc: {{issuer: "{ISSUER}", client_id: {CLIENT_ID}, client_secret: s3cret,
        post_logout_redirect: /signed-out{extra}}}
session: {{idle_timeout: 60s, absolute_timeout: 300s}}
keys: [{KEY}]
"""
    )


def build_services(
    store: SessionStore,
    op: FakeOp,
    *,
    clock: Callable[[], float] = time.time,
    config: Settings | None = None,
) -> Services:
    cfg = config or settings()
    keyring = Keyring([KEY])
    http = cast(aiohttp.ClientSession, op)
    oidc = OidcClient(cfg.oidc, http, redirect_uri=cfg.redirect_uri)
    sessions = SessionManager(
        store,
        idle_timeout=cfg.session.idle_timeout,
        absolute_timeout=cfg.session.absolute_timeout,
        cache_ttl=cfg.session.cache_ttl,
        clock=clock,
    )
    return Services(
        settings=cfg,
        keyring=keyring,
        cookies=CookiePolicy(keyring, secure=False),
        store=store,
        sessions=sessions,
        oidc=oidc,
        http=http,
        refresher=TokenRefresher(sessions, oidc),
        metrics=Metrics(),
    )


def session_data(
    now: float, *, sub: str = "alice", sid: str | None = "op-sid-1", absolute: float = 300
) -> SessionData:
    return SessionData(
        sub=sub,
        claims={"sub": sub, "name": "Alice"},
        access_token=f"AT-{uuid.uuid4().hex}",
        access_expires_at=now + 300,
        refresh_token=f"RT-{uuid.uuid4().hex}",
        id_token=f"eyJhbGciOiJSUzI1NiJ9.ID-{uuid.uuid4().hex}.sig",
        scopes=("openid",),
        created_at=now,
        expires_at=now + absolute,
        sid=sid,
    )


def cookie_header(services: Services, session: Session) -> dict[str, str]:
    return {"Cookie": f"{services.cookies.name}={services.keyring.sign(session.secret)}"}


def app_for(services: Services) -> web.Application:
    app = web.Application()
    app[SERVICES] = services
    return app


async def call(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    services: Services,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> web.Response:
    """Run ``handler`` behind the real error middleware on a mocked request."""
    payload: Any = None
    if body is not None:
        payload = StreamReader(mock.Mock(), 2**16, loop=mock.Mock())
        payload.feed_data(body)
        payload.feed_eof()
    request = make_mocked_request(
        method, path, headers=dict(headers or {}), app=app_for(services), payload=payload
    )
    middleware = error_middleware(api_prefixes=("/bff",))
    response = await middleware(request, handler)
    assert isinstance(response, web.Response)
    return response


def json_body(response: web.Response) -> dict[str, Any]:
    assert response.body is not None
    data: dict[str, Any] = json.loads(cast(bytes, response.body))
    return data


def set_cookies(response: web.Response) -> SimpleCookie:
    """The cookies the response sets (aiohttp adds the Set-Cookie headers only when sending)."""
    return response.cookies


def logout_token(
    claims: Mapping[str, Any] | None = None,
    *,
    drop: tuple[str, ...] = (),
    key: RSAKey | None = None,
) -> str:
    """A back-channel logout token for this client; ``claims`` override, ``drop`` removes."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sub": "alice",
        "sid": "op-sid-1",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    values.update(claims or {})
    for name in drop:
        values.pop(name, None)
    signing = key or op_key()
    return jwt.encode({"alg": "RS256", "kid": signing.kid, "typ": "logout+jwt"}, values, signing)
