"""DPoP (RFC 9449): sender-constrained access tokens, held and proven by bff for each session.

With ``oidc.dpop: true`` every login makes a fresh key pair (ES256 unless the OP supports none
of :data:`PREFERRED_ALGS` but another), asks the OP for tokens bound to it (a proof on the code
exchange and on every refresh), and sends each upstream request with ``Authorization: DPoP
<token>`` and a fresh proof. The private key is sealed in the session record with the tokens
(``SessionData.dpop_jwk``, AES-GCM under the cookie-derived key): a stolen store dump or a
leaked access token is useless without it, and the browser never sees either.

Why global and not per route: the OP binds the *token*, and a session holds one access token for
every route. A DPoP-bound token is refused without a proof (RFC 9449 7.1), and sending it as
``Bearer`` to an upstream that does not check DPoP would throw away the binding there; so every
route that carries the session's token carries a proof. ``token: client`` routes keep their
Bearer client-credentials tokens (they are not the session's). A route that must get an unbound
token needs a token of its own (token exchange, resource indicators), not a switch here.

Nonces (RFC 9449 8 and 9): the OP's latest ``DPoP-Nonce`` and each upstream origin's are kept
per process (:class:`Nonces`) and put in every proof, so the ``use_dpop_nonce`` retry happens
once per server and nonce rotation, not once per request.

Cost: the key object is imported once per session and process (:func:`session_key`, bounded like
the session cache: importing a JWK costs about as much as a signature), and a proof is one
ES256 signature through joserfc (measured in ``docs/design.md``).
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey
from yarl import URL

if TYPE_CHECKING:
    from bff.sessions import Session

__all__ = [
    "PREFERRED_ALGS",
    "DpopKey",
    "Nonces",
    "choose_alg",
    "feature_line",
    "forget",
    "generate",
    "htu",
    "is_nonce_challenge",
    "proof",
    "session_key",
    "upstream_auth",
]

#: The algorithms bff signs proofs with, best first; the first the OP lists is used.
PREFERRED_ALGS: Final = ("ES256", "EdDSA", "ES384", "ES512", "PS256", "RS256")
_CURVES: Final = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_CACHE_MAX: Final = 50_000
_NONCE_MAX: Final = 1024  # characters: a longer DPoP-Nonce is not remembered
_ORIGINS_MAX: Final = 4096


def choose_alg(supported: Sequence[str]) -> str | None:
    """The first of :data:`PREFERRED_ALGS` the OP lists, or None."""
    for alg in PREFERRED_ALGS:
        if alg in supported:
            return alg
    return None


@dataclass(frozen=True, slots=True)
class DpopKey:
    """A session's proof key: the private key object, its alg and its public JWK (header)."""

    key: ECKey | OKPKey | RSAKey
    alg: str
    public: Mapping[str, Any]

    def __repr__(self) -> str:  # the private key never reaches a log line or a traceback
        return f"DpopKey(alg={self.alg!r}, jkt={self.thumbprint()!r})"

    def thumbprint(self) -> str:
        """RFC 7638 SHA-256 thumbprint: the ``cnf.jkt`` the OP binds tokens to."""
        return self.key.thumbprint()

    def record(self) -> dict[str, Any]:
        """The private JWK (with ``alg``) as stored, sealed, in the session record."""
        return {**self.key.as_dict(private=True), "alg": self.alg}

    @classmethod
    def from_record(cls, jwk: Mapping[str, Any]) -> DpopKey:
        alg = str(jwk.get("alg", "ES256"))
        material = {k: v for k, v in jwk.items() if k != "alg"}
        key: ECKey | OKPKey | RSAKey
        if alg in _CURVES:
            key = ECKey.import_key(material)
        elif alg == "EdDSA":
            key = OKPKey.import_key(material)
        else:
            key = RSAKey.import_key(material)
        return cls(key, alg, key.as_dict(private=False))


def generate(alg: str) -> DpopKey:
    """A brand-new key pair for one session (one per login, never shared)."""
    key: ECKey | OKPKey | RSAKey
    if alg in _CURVES:
        key = ECKey.generate_key(_CURVES[alg], private=True)
    elif alg == "EdDSA":
        key = OKPKey.generate_key("Ed25519", private=True)
    elif alg in ("PS256", "RS256"):
        key = RSAKey.generate_key(2048, private=True)
    else:
        raise ValueError(f"bff cannot sign DPoP proofs with {alg!r}")
    return DpopKey(key, alg, key.as_dict(private=False))


def htu(url: str | URL) -> str:
    """RFC 9449 4.2: the target URI without query and fragment. A string is taken as sent
    (already encoded; the proxy's target was normalised by routing.py): cut at ``?`` or ``#``."""
    if isinstance(url, URL):
        return str(url.with_query(None).with_fragment(None))
    return url.partition("#")[0].partition("?")[0]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def proof(
    key: DpopKey,
    method: str,
    url: str | URL,
    *,
    access_token: str | None = None,
    nonce: str | None = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """A DPoP proof JWT (RFC 9449 4.2) for one request; a new ``jti`` every time."""
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex,
        "htm": method,
        "htu": htu(url),
        "iat": int(clock()),
    }
    if access_token is not None:
        claims["ath"] = _b64(hashlib.sha256(access_token.encode()).digest())
    if nonce is not None:
        claims["nonce"] = nonce
    header = {"typ": "dpop+jwt", "alg": key.alg, "jwk": dict(key.public)}
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


def feature_line(op_algs: Sequence[str], enabled: bool) -> str:
    """The DPoP line of ``bff check-config``'s report on the OP (an info line)."""
    listed = ", ".join(op_algs)
    if enabled:
        alg = choose_alg(op_algs)  # discovery refused an OP without one already
        return f"DPoP: tokens bound to one {alg} key per session (the OP lists {listed})"
    if op_algs:
        return f"DPoP: off (oidc.dpop); the OP would bind tokens ({listed})"
    return "DPoP: off (oidc.dpop); the OP does not advertise it"


class Nonces:
    """The latest ``DPoP-Nonce`` each server (by origin) sent; per process, bounded."""

    def __init__(self) -> None:
        self._latest: dict[str, str] = {}

    def get(self, origin: str) -> str | None:
        return self._latest.get(origin)

    def note(self, origin: str, headers: Mapping[str, str]) -> bool:
        """Remember the nonce a response carries; True when it brought a new one."""
        nonce = headers.get("DPoP-Nonce")
        if not nonce or len(nonce) > _NONCE_MAX or not nonce.isascii():
            return False
        if self._latest.get(origin) == nonce:
            return False
        if origin not in self._latest and len(self._latest) >= _ORIGINS_MAX:
            self._latest.pop(next(iter(self._latest)))
        self._latest[origin] = nonce
        return True


#: The upstreams' nonces (the OP's are :class:`bff.oidc.OidcClient`'s own).
UPSTREAM_NONCES: Final = Nonces()


def is_nonce_challenge(status: int, headers: Mapping[str, str]) -> bool:
    """A resource server's RFC 9449 9 answer: 401, ``use_dpop_nonce`` and a ``DPoP-Nonce``."""
    if status != 401 or "DPoP-Nonce" not in headers:
        return False
    return "use_dpop_nonce" in headers.get("WWW-Authenticate", "")


def upstream_auth(
    key: DpopKey, method: str, url: str | URL, origin: str, token: str
) -> tuple[tuple[str, str], tuple[str, str]]:
    """``Authorization: DPoP <token>`` and a fresh proof for one upstream request."""
    nonce = UPSTREAM_NONCES.get(origin)
    return (
        ("Authorization", "DPoP " + token),
        ("DPoP", proof(key, method, url, access_token=token, nonce=nonce)),
    )


_keys: dict[str, tuple[str, DpopKey]] = {}


def forget(session_id: str) -> None:
    """Drop an ended session's key object (sessions.py, when a session ends here)."""
    _keys.pop(session_id, None)


def session_key(session: Session) -> DpopKey | None:
    """The session's proof key (None for a session without one: logged in before DPoP was on).

    Imported once per session and process; the cached object is used only while the record
    still holds the same private key.
    """
    jwk = session.data.dpop_jwk
    if jwk is None:
        return None
    private = str(jwk.get("d", ""))
    cached = _keys.get(session.id)
    if cached is not None and cached[0] == private:
        return cached[1]
    key = DpopKey.from_record(jwk)
    if len(_keys) >= _CACHE_MAX:
        _keys.pop(next(iter(_keys)))
    _keys[session.id] = (private, key)
    return key
