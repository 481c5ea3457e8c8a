"""A resource server that checks DPoP (RFC 9449 7) the way a strict API would, for bff's tests.

Every request to it must carry ``Authorization: DPoP <token>`` and exactly one ``DPoP`` proof;
it checks, with joserfc (no hand-made JWS code): the proof's ``typ`` (``dpop+jwt``), its
asymmetric ``alg``, its signature against the public ``jwk`` in its header (which must hold no
private part), ``htm`` and ``htu`` against the request it came with (``htu`` without query and
fragment, as RFC 9449 4.3 compares it), ``ath`` against the token, ``iat`` within a minute,
``jti`` never seen before (a replayed proof is refused), the nonce when ``require_nonce`` is on
(401 ``use_dpop_nonce`` with a ``DPoP-Nonce`` otherwise), and that the token is active at the OP
and bound to that very key (``cnf.jkt`` from the OP's introspection endpoint equals the RFC 7638
thumbprint of the proof's key). ``Authorization: Bearer`` with a DPoP-bound token is refused.
With ``jwt_audience`` set, the token is a JWT access token for that audience (an RFC 8707
resource server's, which the OP does not introspect): it is verified with the OP's JWKS
(``jwks``), its ``aud`` must be ``jwt_audience``, and ``cnf.jkt`` is read from it.

A WebSocket handshake is checked the same way (a GET), then the socket echoes text.
Each request is recorded (:class:`Call`) with the verdict, for the tests to look at.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from tests.support.procs import free_port

__all__ = ["Call", "DpopUpstream"]

_ALGS = ("ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256")


@dataclass
class Call:
    method: str
    path: str  # raw path and query as received
    headers: dict[str, list[str]]
    verdict: str  # "ok" or why the request was refused
    proof: str | None = None
    token: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    jkt: str | None = None  # thumbprint of the proof's key

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class Refused(Exception):
    pass


@dataclass
class DpopUpstream:
    """Start with :meth:`start`; ``introspection`` is the OP's endpoint and ``client`` the
    (client_id, client_secret) this resource server introspects with."""

    introspection: str
    client: tuple[str, str]
    port: int = field(default_factory=free_port)
    require_nonce: bool = False
    calls: list[Call] = field(default_factory=list)
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    jwt_audience: str | None = None  # set: tokens are JWTs for it, checked with ``jwks``
    jwks: str | None = None  # the OP's JWKS URL (for ``jwt_audience``)
    _jtis: set[str] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    _http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rotate_nonce(self) -> str:
        self.nonce = secrets.token_urlsafe(16)
        return self.nonce

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        call = Call(request.method, request.raw_path, headers, verdict="?")
        self.calls.append(call)
        await request.read()
        try:
            await self._check(request, call)
        except Refused as exc:
            call.verdict = str(exc)
            return self._refuse(str(exc))
        call.verdict = "ok"
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:  # echo until the client closes
                await ws.send_str(f"echo {msg.data}")
            return ws
        return web.json_response({"ok": True, "path": request.raw_path, "sub": call.claims})

    def _refuse(self, why: str) -> web.Response:
        error = "use_dpop_nonce" if why.startswith("use_dpop_nonce") else "invalid_token"
        resp = web.json_response({"error": error, "why": why}, status=401)
        resp.headers["WWW-Authenticate"] = f'DPoP error="{error}", algs="{" ".join(_ALGS)}"'
        if error == "use_dpop_nonce":
            resp.headers["DPoP-Nonce"] = self.nonce
        return resp

    async def _check(self, request: web.Request, call: Call) -> None:
        auth = request.headers.getall("Authorization", [])
        if len(auth) != 1:
            raise Refused("exactly one Authorization header is needed")
        scheme, _, token = auth[0].partition(" ")
        call.token = token
        if scheme.lower() == "bearer":
            info = await self._token_info(token)
            if info.get("cnf", {}).get("jkt"):
                raise Refused("a DPoP-bound token used as a bearer token")
            raise Refused("this API only takes DPoP-bound tokens")
        if scheme != "DPoP" or not token:
            raise Refused("not a DPoP authorization")
        proofs = request.headers.getall("DPoP", [])
        if len(proofs) != 1:
            raise Refused(f"{len(proofs)} DPoP headers")
        proof = call.proof = proofs[0]
        try:
            header = jws.extract_compact(proof.encode()).headers()
        except (JoseError, ValueError) as exc:
            raise Refused("the proof is not a compact JWS") from exc
        if header.get("typ") != "dpop+jwt":
            raise Refused("typ is not dpop+jwt")
        alg = header.get("alg")
        if alg not in _ALGS:
            raise Refused(f"alg {alg!r} not allowed")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or "d" in jwk:
            raise Refused("no public jwk in the proof header")
        key = {"EC": ECKey, "OKP": OKPKey, "RSA": RSAKey}[jwk["kty"]].import_key(jwk)
        try:
            claims = dict(jwt.decode(proof, key, algorithms=[alg]).claims)
        except (JoseError, ValueError) as exc:
            raise Refused("bad proof signature") from exc
        call.claims = claims
        call.jkt = key.thumbprint()
        if claims.get("htm") != request.method:
            raise Refused("htm mismatch")
        if claims.get("htu") != f"{self.url}{request.path}":
            raise Refused(f"htu mismatch: {claims.get('htu')!r}")
        ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
        if claims.get("ath") != ath.decode():
            raise Refused("ath mismatch")
        iat = claims.get("iat")
        if not isinstance(iat, int) or abs(time.time() - iat) > 60:
            raise Refused("iat not fresh")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise Refused("no jti")
        if jti in self._jtis:
            raise Refused("replayed proof (jti seen before)")
        self._jtis.add(jti)
        if self.require_nonce and claims.get("nonce") != self.nonce:
            raise Refused("use_dpop_nonce")
        info = await self._token_info(token)
        if not info.get("active"):
            raise Refused("token not active")
        if info.get("cnf", {}).get("jkt") != call.jkt:
            raise Refused("the token is not bound to the proof's key (cnf.jkt)")

    async def _token_info(self, token: str) -> dict[str, Any]:
        """What introspection would say: for ``jwt_audience``, from the verified JWT itself."""
        if self.jwt_audience is None:
            return await self._introspect(token)
        assert self._http is not None and self.jwks is not None
        async with self._http.get(self.jwks) as resp:
            keys = KeySet.import_key_set(await resp.json())
        try:
            claims = dict(jwt.decode(token, keys).claims)
        except (JoseError, ValueError) as exc:
            raise Refused("the token is not a JWT the OP signed") from exc
        if claims.get("aud") != self.jwt_audience:
            raise Refused(f"the token is for another audience: {claims.get('aud')!r}")
        if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
            raise Refused("token expired")
        return {"active": True, **claims}

    async def _introspect(self, token: str) -> dict[str, Any]:
        assert self._http is not None
        headers = {"Authorization": aiohttp.encode_basic_auth(*self.client)}
        async with self._http.post(
            self.introspection, data={"token": token}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            info: dict[str, Any] = await resp.json()
            return info

    async def send(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """A request straight to this upstream (a test replaying a proof bff sent)."""
        assert self._http is not None
        async with self._http.request(method, self.url + path, headers=headers) as resp:
            return resp.status, await resp.json()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
