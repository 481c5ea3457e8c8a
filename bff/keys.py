"""Key material: the cookie signer, per-session AEAD, and server-side AEAD with rotation.

Design (invariant 3 of docs/design.md):

* Each session and each login transaction has a 256-bit random *secret* that lives only in the
  browser's cookie. From it we derive, with domain separation, the store key (a SHA-256 hash, so
  Redis never holds the secret) and the AES-256-GCM key that encrypts the record. A dump of Redis,
  even together with the configured keys, therefore decrypts no user token.
* The configured ``keys`` sign cookies (itsdangerous, HMAC-SHA256) and encrypt the few records that
  must be read without a cookie (client-credentials tokens). The first key signs and encrypts; the
  others still verify and decrypt, so operators rotate without logging anyone out.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from typing import NewType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadSignature, Signer

__all__ = [
    "DecryptError",
    "Keyring",
    "SessionSecret",
    "StoreKey",
    "new_secret",
    "open_sealed",
    "public_handle",
    "seal",
    "secret_key",
    "store_id",
]

#: The random value carried (signed) in a cookie; never written anywhere server-side.
SessionSecret = NewType("SessionSecret", str)
#: A hash of a secret, safe to use as (part of) a store key.
StoreKey = NewType("StoreKey", str)

_NONCE = 12
_VERSION = b"\x01"


class DecryptError(Exception):
    """A sealed blob was tampered with, truncated, or sealed under another key."""


def new_secret() -> SessionSecret:
    return SessionSecret(base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode())


def store_id(secret: SessionSecret, purpose: str = "session") -> StoreKey:
    """Hash a secret into a store id; one-way, so the store never learns the secret."""
    digest = hashlib.sha256(f"bff/{purpose}/id\x00{secret}".encode()).digest()
    return StoreKey(base64.urlsafe_b64encode(digest[:20]).rstrip(b"=").decode())


def secret_key(secret: SessionSecret, purpose: str = "session") -> bytes:
    """The AEAD key of one session or transaction, derived from its cookie secret."""
    return _hkdf(secret.encode(), f"bff/{purpose}/aead".encode())


def public_handle(secret: SessionSecret) -> str:
    """A value the SPA may see (the logout ``sid``) that proves nothing about the secret."""
    digest = hashlib.sha256(f"bff/session/handle\x00{secret}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def seal(key: bytes, plaintext: bytes, aad: bytes, prefix: bytes = b"") -> bytes:
    nonce = os.urandom(_NONCE)
    return _VERSION + prefix + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, prefix_len: int = 0) -> bytes:
    start = 1 + prefix_len
    if len(blob) < start + _NONCE + 16 or blob[:1] != _VERSION:
        raise DecryptError("malformed blob")
    nonce = blob[start : start + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, blob[start + _NONCE :], aad)
    except InvalidTag as exc:
        raise DecryptError("authentication failed") from exc


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


_SIGNING_SALTS = {"session": "bff.cookie", "login": "bff.login"}


class Keyring:
    """The operator's configured keys: cookie signing and server-side encryption, with rotation."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        # itsdangerous signs with the *last* key of the list and verifies with all of them. One
        # salt per purpose: a value signed as a login cookie is no session cookie, and back.
        self._signers = {
            purpose: Signer(
                list(reversed(keys)),
                salt=salt,
                key_derivation="hmac",
                digest_method=hashlib.sha256,
            )
            for purpose, salt in _SIGNING_SALTS.items()
        }
        self._aead: list[tuple[bytes, bytes]] = []
        for k in keys:
            derived = _hkdf(k.encode(), b"bff/server/aead")
            kid = hashlib.sha256(derived).digest()[:4]
            self._aead.append((kid, derived))

    def sign(self, value: str, purpose: str = "session") -> str:
        return self._signers[purpose].sign(value).decode()

    def unsign(self, signed: str, purpose: str = "session") -> str | None:
        """The original value, or None for anything tampered, truncated or foreign."""
        try:
            return self._signers[purpose].unsign(signed).decode()
        except (BadSignature, UnicodeError, ValueError):
            return None

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        kid, key = self._aead[0]
        return seal(key, plaintext, aad, prefix=kid)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        kid = blob[1:5]
        for candidate, key in self._aead:
            if candidate == kid:
                return open_sealed(key, blob, aad, prefix_len=4)
        raise DecryptError("sealed under a key that is no longer configured")
