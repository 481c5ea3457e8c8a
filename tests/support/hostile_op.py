"""A small in-process OpenID Provider that misbehaves on purpose, for tests of bff's defences.

It serves discovery, JWKS, an authorization endpoint that answers at once (no login form), a token
endpoint that really checks client authentication (``client_secret_basic``, ``client_secret_post``
or a ``private_key_jwt`` assertion), the code, the redirect URI and PKCE S256, and a userinfo
endpoint. Knobs on the instance make it lie in one precise way at a time, so a test proves that
bff refuses exactly that lie:

* ``id_token_defect``: one of :data:`ID_TOKEN_DEFECTS` (bad signature, ``alg: none``, HS256 keyed
  with the OP's public key, wrong ``iss``/``aud``/``azp``, expired, ``iat`` in the future, ...).
* ``response_defect``: ``"wrong_iss"``, ``"no_iss"`` or ``"access_denied"`` on the authorization
  response.
* ``token_status`` / ``token_error`` / ``token_delay``: a failing, refusing or slow token endpoint.
* ``expires_in``: the access tokens' lifetime (0: bff refreshes at the next proxied call).
* ``discovery_issuer``: a discovery document that names another issuer.
* ``jwks_delay``: a slow JWKS endpoint (to see concurrent verifications share one fetch);
  ``rotate_signing_key`` / ``replace_key_material`` rotate the keys (new kid / same kid).
* ``revocation_in``: where the revocation endpoint is published: ``"discovery"``, ``"rfc8414"``
  (only in ``/.well-known/oauth-authorization-server``, RFC 8414, as some OPs do) or ``None``.
  ``rfc8414_issuer`` makes that document name another issuer, ``rfc8414_status`` /
  ``rfc8414_drop`` fail it.
  ``path`` gives the issuer a path (``http://127.0.0.1:PORT/tenant``), to exercise RFC 8414's
  path insertion.

Everything it saw is recorded (``authorize_requests``, ``token_requests``, ``jwks_fetches``,
``issued``) for assertions. Listens on 127.0.0.1 only; ``port`` may be fixed so that a test can
start it *late* on a port bff was already told about. Revoked tokens are in ``revoked``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import unquote_plus, urlencode

from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

__all__ = ["ID_TOKEN_DEFECTS", "HostileOp", "TokenRequest", "b64url"]

HOST = "127.0.0.1"

ID_TOKEN_DEFECTS = (
    "bad_signature",  # signed by a key the OP does not publish, under a published kid
    "tampered",  # a valid signature over other claims (payload swapped after signing)
    "alg_none",  # unsigned: {"alg": "none"}
    "hs256_public_key",  # HMAC-SHA256 keyed with the PEM bytes of the OP's public RSA key
    "wrong_iss",
    "wrong_aud",
    "extra_aud",  # our client_id plus an audience we do not trust
    "wrong_azp",
    "expired",
    "iat_future",
    "wrong_nonce",
    "missing_nonce",
    "unknown_kid",  # signed by a key with a kid absent from the JWKS, even after a refetch
)


_MATERIAL: list[dict[str, Any]] = []


def _rsa_key(slot: int, kid: str) -> RSAKey:
    """RSA key number ``slot`` of this process under a new ``kid``: generating 2048-bit keys is
    slow, and distinct slots are all a test needs to tell keys apart."""
    while len(_MATERIAL) <= slot:
        _MATERIAL.append(RSAKey.generate_key(2048).as_dict(private=True))
    return RSAKey.import_key(dict(_MATERIAL[slot]), parameters={"kid": kid, "use": "sig"})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class TokenRequest:
    """One POST to the token endpoint, as the OP saw it."""

    form: dict[str, str]
    headers: dict[str, str]
    status: int = 0


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    scope: str


@dataclass
class _Issued:
    access_token: str
    refresh_token: str
    id_token: str
    claims: dict[str, Any] = field(default_factory=dict)


class HostileOp:
    """``async with HostileOp(...) as op:``; then ``op.issuer`` is its issuer URL."""

    def __init__(
        self,
        *,
        port: int = 0,
        client_id: str = "bff-client",
        client_secret: str = "hostile-op-client-secret",
        auth_method: str = "client_secret_basic",
        client_public_key: RSAKey | ECKey | OKPKey | None = None,
        subject: str = "alice",
        path: str = "",
    ) -> None:
        self.port = port
        self.path = path
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth_method = auth_method
        self.client_public_key = client_public_key
        self.subject = subject
        # knobs
        self.id_token_defect: str | None = None
        self.response_defect: str | None = None
        self.token_status: int | None = None
        self.token_error: str | None = None
        self.token_delay: float = 0.0
        self._closing = asyncio.Event()  # ends every delay: a closing OP keeps no one waiting
        self.token_raw: bytes | None = None  # answer these bytes as the token response (200)
        self.expires_in = 300  # access token lifetime; 0 makes bff refresh on its next use
        self.discovery_issuer: str | None = None
        self.iss_parameter_supported = True
        self.advertised_algs: list[str] = ["RS256"]
        self.extra_claims: dict[str, Any] = {}
        self.jwks_delay: float = 0.0
        self.revocation_in: str | None = None
        self.rfc8414_issuer: str | None = None
        self.rfc8414_status: int | None = None  # answer the RFC 8414 document with this status
        self.rfc8414_drop = False  # or close the connection without an answer
        # records
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[TokenRequest] = []
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.rfc8414_fetches = 0
        self.revoked: list[tuple[str, str]] = []  # (token, token_type_hint)
        self.issued: list[_Issued] = []
        self.used_codes: set[str] = set()
        # keys: the published signing key, plus keys that sign but are never published
        self.signing_key = _rsa_key(0, self._kid())
        self.published: list[RSAKey] = [self.signing_key]
        self.rogue_key = _rsa_key(1, self._kid())
        self._rotations = 0
        self._codes: dict[str, _Code] = {}
        self._assertion_jtis: set[str] = set()
        self._runner: web.AppRunner | None = None

    @staticmethod
    def _kid() -> str:
        return f"hostile-{secrets.token_hex(4)}"

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    async def start(self) -> None:
        self._closing.clear()
        app = web.Application()
        p = self.path
        app.router.add_get(f"{p}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"/.well-known/oauth-authorization-server{p}", self._rfc8414)
        app.router.add_get(f"{p}/jwks", self._jwks)
        app.router.add_get(f"{p}/authorize", self._authorize)
        app.router.add_post(f"{p}/token", self._token)
        app.router.add_post(f"{p}/revoke", self._revoke)
        app.router.add_get(f"{p}/userinfo", self._userinfo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        await site.start()
        if self.port == 0:
            addresses = self._runner.addresses
            self.port = int(addresses[0][1])

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def rotate_signing_key(self) -> RSAKey:
        """Sign with a brand-new key from now on, and publish it (next to the old one)."""
        self._rotations += 1
        self.signing_key = _rsa_key(2 + self._rotations, self._kid())
        self.published.append(self.signing_key)
        return self.signing_key

    def replace_key_material(self) -> RSAKey:
        """Sign with new key material under the *same* kid, and publish only that (some OPs
        reuse kids such as ``"1"`` across rotations)."""
        self._rotations += 1
        kid = self.signing_key.kid
        assert kid is not None
        self.signing_key = _rsa_key(2 + self._rotations, kid)
        self.published = [self.signing_key]
        return self.signing_key

    # -- tokens ----------------------------------------------------------------------------------

    def claims(self, nonce: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Claims of a valid ID token for our client; ``overrides`` set or (with None) drop."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.client_id,
            "exp": now + 300,
            "iat": now,
            "auth_time": now,
            "name": f"Test User {self.subject}",
            "email": f"{self.subject}@example.com",
            **self.extra_claims,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        for key, value in overrides.items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        return claims

    def sign(self, claims: dict[str, Any], key: RSAKey | None = None, **header: Any) -> str:
        key = key or self.signing_key
        return jwt.encode({"alg": "RS256", "kid": key.kid, **header}, claims, key)

    def id_token(self, nonce: str | None, defect: str | None = None) -> str:
        """An ID token for ``nonce``; valid unless ``defect`` (see ID_TOKEN_DEFECTS)."""
        now = int(time.time())
        published_kid = self.signing_key.kid
        match defect:
            case None:
                return self.sign(self.claims(nonce))
            case "bad_signature":
                return self.sign(self.claims(nonce), self.rogue_key, kid=published_kid)
            case "tampered":
                good = self.sign(self.claims(nonce))
                head, _, sig = good.split(".")
                forged = _b64json(self.claims(nonce, sub="mallory", name="Mallory"))
                return f"{head}.{forged}.{sig}"
            case "alg_none":
                header = {"alg": "none", "typ": "JWT", "kid": published_kid}
                return f"{_b64json(header)}.{_b64json(self.claims(nonce))}."
            case "hs256_public_key":
                header = {"alg": "HS256", "typ": "JWT", "kid": published_kid}
                signing_input = f"{_b64json(header)}.{_b64json(self.claims(nonce))}"
                secret = self.signing_key.as_pem(private=False)
                mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
                return f"{signing_input}.{b64url(mac)}"
            case "wrong_iss":
                return self.sign(self.claims(nonce, iss="https://evil.example"))
            case "wrong_aud":
                return self.sign(self.claims(nonce, aud="another-client"))
            case "extra_aud":
                return self.sign(self.claims(nonce, aud=[self.client_id, "untrusted-api"]))
            case "wrong_azp":
                return self.sign(self.claims(nonce, azp="another-client"))
            case "expired":
                return self.sign(self.claims(nonce, exp=now - 3600, iat=now - 7200))
            case "iat_future":
                return self.sign(self.claims(nonce, iat=now + 3600, exp=now + 7200))
            case "wrong_nonce":
                return self.sign(self.claims(secrets.token_urlsafe(16)))
            case "missing_nonce":
                return self.sign(self.claims(None))
            case "unknown_kid":
                return self.sign(self.claims(nonce), _rsa_key(2, self._kid()))
        raise ValueError(f"unknown ID token defect {defect!r}")

    # -- endpoints -------------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        revocation = {"revocation_endpoint": f"{self.issuer}/revoke"}
        return web.json_response(
            {
                **(revocation if self.revocation_in == "discovery" else {}),
                "issuer": self.discovery_issuer or self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": self.token_endpoint,
                "jwks_uri": f"{self.issuer}/jwks",
                "userinfo_endpoint": f"{self.issuer}/userinfo",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": self.advertised_algs,
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                ],
                "authorization_response_iss_parameter_supported": self.iss_parameter_supported,
            }
        )

    async def _rfc8414(self, request: web.Request) -> web.Response:
        self.rfc8414_fetches += 1
        if self.rfc8414_drop and request.transport is not None:
            request.transport.close()
            raise web.HTTPInternalServerError()  # never sent: the connection is gone
        if self.rfc8414_status is not None:
            return web.json_response({"error": "told to fail"}, status=self.rfc8414_status)
        if self.revocation_in != "rfc8414":
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(
            {
                "issuer": self.rfc8414_issuer or self.issuer,
                "token_endpoint": self.token_endpoint,
                "revocation_endpoint": f"{self.issuer}/revoke",
            }
        )

    async def _revoke(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if self._authenticate(form, dict(request.headers)):
            return web.json_response({"error": "invalid_client"}, status=401)
        self.revoked.append((form.get("token", ""), form.get("token_type_hint", "")))
        return web.Response(status=200)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        if self.jwks_delay:
            await asyncio.sleep(self.jwks_delay)
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.published]})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.authorize_requests.append(q)
        redirect_uri = q.get("redirect_uri", "")
        if q.get("client_id") != self.client_id or not redirect_uri:
            return web.json_response({"error": "invalid_request"}, status=400)
        params: dict[str, str] = {}
        if self.response_defect == "access_denied":
            params = {"error": "access_denied", "error_description": "the user said no"}
        else:
            if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
                return web.json_response({"error": "invalid_request"}, status=400)
            code = secrets.token_urlsafe(24)
            self._codes[code] = _Code(
                client_id=q["client_id"],
                redirect_uri=redirect_uri,
                nonce=q.get("nonce"),
                code_challenge=q.get("code_challenge", ""),
                code_challenge_method=q["code_challenge_method"],
                scope=q.get("scope", ""),
            )
            params["code"] = code
        if "state" in q:
            params["state"] = q["state"]
        if self.response_defect == "wrong_iss":
            params["iss"] = "https://evil.example"
        elif self.response_defect != "no_iss":
            params["iss"] = self.issuer
        sep = "&" if "?" in redirect_uri else "?"
        raise web.HTTPFound(f"{redirect_uri}{sep}{urlencode(params)}")

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        headers = dict(request.headers)
        status, body = await self._token_answer(form, headers)
        self.token_requests.append(TokenRequest(form, headers, status))
        if self.token_raw is not None:
            return web.Response(body=self.token_raw, content_type="application/json")
        return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})

    async def _token_answer(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        if self.token_delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.token_delay)
        if self.token_status is not None:
            return self.token_status, {"error": "server_error"}
        problem = self._authenticate(form, headers)
        if problem:
            return 401, {"error": "invalid_client", "error_description": problem}
        if self.token_error is not None:
            return 400, {"error": self.token_error, "error_description": "told to refuse"}
        grant = form.get("grant_type")
        if grant == "authorization_code":
            code = form.get("code", "")
            record = self._codes.pop(code, None)
            if record is None:
                reason = "code already used" if code in self.used_codes else "unknown code"
                return 400, {"error": "invalid_grant", "error_description": reason}
            self.used_codes.add(code)
            if form.get("redirect_uri") != record.redirect_uri:
                return 400, {"error": "invalid_grant", "error_description": "redirect_uri"}
            verifier = form.get("code_verifier", "")
            challenge = b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
            if not verifier or not hmac.compare_digest(challenge, record.code_challenge):
                return 400, {"error": "invalid_grant", "error_description": "PKCE failed"}
            return 200, self._issue(record.nonce, record.scope)
        if grant == "refresh_token":
            if not any(i.refresh_token == form.get("refresh_token") for i in self.issued):
                return 400, {"error": "invalid_grant", "error_description": "unknown token"}
            return 200, self._issue(None, "openid")
        return 400, {"error": "unsupported_grant_type"}

    def _issue(self, nonce: str | None, scope: str) -> dict[str, Any]:
        id_token = self.id_token(nonce, self.id_token_defect)
        issued = _Issued(
            access_token=f"hostile-at-{secrets.token_urlsafe(24)}",
            refresh_token=f"hostile-rt-{secrets.token_urlsafe(24)}",
            id_token=id_token,
        )
        self.issued.append(issued)
        return {
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": issued.refresh_token,
            "id_token": id_token,
            "scope": scope,
        }

    def _authenticate(self, form: dict[str, str], headers: dict[str, str]) -> str | None:
        """Why the client failed to authenticate with the configured method, or None."""
        auth = headers.get("Authorization", "")
        if self.auth_method == "client_secret_basic":
            if not auth.startswith("Basic ") or "client_secret" in form:
                return "expected client_secret_basic"
            try:
                pair = base64.b64decode(auth[6:], validate=True).decode()
            except ValueError:
                return "malformed Basic credentials"
            user, _, password = pair.partition(":")
            # RFC 6749 2.3.1: both halves are application/x-www-form-urlencoded.
            if unquote_plus(user) != self.client_id or unquote_plus(password) != self.client_secret:
                return "wrong client credentials"
            return None
        if self.auth_method == "client_secret_post":
            if auth:
                return "expected client_secret_post, got an Authorization header"
            if form.get("client_id") != self.client_id:
                return "wrong client_id"
            if form.get("client_secret") != self.client_secret:
                return "wrong client_secret"
            return None
        if self.auth_method == "private_key_jwt":
            return self._check_assertion(form, auth)
        return f"unsupported auth method {self.auth_method}"

    def _check_assertion(self, form: dict[str, str], auth: str) -> str | None:
        if auth or "client_secret" in form:
            return "expected private_key_jwt only"
        if form.get("client_assertion_type") != (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ):
            return "wrong client_assertion_type"
        if self.client_public_key is None:
            return "no client key registered"
        try:
            token = jwt.decode(form.get("client_assertion", ""), self.client_public_key)
        except (JoseError, ValueError) as exc:
            return f"assertion signature: {exc}"
        c = token.claims
        now = time.time()
        if c.get("iss") != self.client_id or c.get("sub") != self.client_id:
            return "assertion iss/sub must be the client_id"
        aud = c.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.token_endpoint not in audiences and self.issuer not in audiences:
            return "assertion aud must be the token endpoint or the issuer"
        if not isinstance(c.get("exp"), int) or c["exp"] < now or c["exp"] > now + 600:
            return "assertion exp missing, past, or too far ahead"
        jti = c.get("jti")
        if not isinstance(jti, str) or not jti or jti in self._assertion_jtis:
            return "assertion jti missing or replayed"
        if form.get("client_id", self.client_id) != self.client_id:
            return "client_id does not match the assertion"
        self._assertion_jtis.add(jti)
        return None

    async def _userinfo(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not any(auth == f"Bearer {i.access_token}" for i in self.issued):
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response(
            {"sub": self.subject, "name": f"Test User {self.subject}", "locale": "en"}
        )
