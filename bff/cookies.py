"""The browser's two cookies. They carry signed random secrets; no storage, no tokens.

* The session cookie (``__Host-bff``): HttpOnly, Secure, SameSite=Strict by default, Path=/, no
  Domain. Its value is ``sign(secret)``; the secret is 256 random bits.
* The login cookie (``<name>-tx``): binds a login transaction to the browser that started it. It
  must be SameSite=Lax, because the OP's redirect back to ``/bff/callback`` is a cross-site
  navigation on which a Strict cookie is never sent.

A request that carries either cookie's name more than once (in one ``Cookie`` line or across
several) has no such cookie: one of them was planted, by a sibling subdomain, an older path or
a script, and neither "first wins" nor "last wins" may let a planted value choose the session.
"More than once" is counted the way browsers write the header (:func:`browser_pairs`): split on
``;``, no quoted strings. aiohttp's parser reads ``a="x; bff=L"`` as one cookie ``a``, so with
it planted cookies whose values open and close a quote around the real one would hide it, and
a planted one next to them would choose the session.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from aiohttp import web

from bff.access import SESSION_SECRET
from bff.keys import Keyring, SessionSecret

__all__ = ["CookiePolicy", "browser_pairs", "session_cookie_names"]

_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_.-]+")
_VERIFIED_MAX = 10_000  # ~6 MB at most: only values that verified get in
_LINE_MAX = 1024  # Cookie lines remembered with their verified secret: ~10 MB at most
#: Every (name, value) of every Cookie line, in order, once a request needs them all.
_PAIRS: Final = web.RequestKey("bff_cookie_pairs", tuple[tuple[str, str], ...])


def session_cookie_names(name: str) -> tuple[str, str]:
    """The session cookie's name and the login cookie's (``<name>-tx``): the log masks both."""
    return name, f"{name}-tx"


class CookiePolicy:
    def __init__(
        self,
        keyring: Keyring,
        *,
        name: str = "__Host-bff",
        same_site: Literal["strict", "lax"] = "strict",
        secure: bool = True,
        max_age: float = 86400,
        login_max_age: float = 600,
    ) -> None:
        self._keyring = keyring
        self.name, self.tx_name = session_cookie_names(name)
        self._same_site = "Strict" if same_site == "strict" else "Lax"
        self._secure = secure
        self._max_age = int(max_age)
        self._login_max_age = int(login_max_age)
        self._verified: dict[tuple[str, str], SessionSecret] = {}
        self._lines: dict[tuple[str, str], SessionSecret] = {}  # (purpose, Cookie line)

    def session_secret(self, request: web.Request) -> SessionSecret | None:
        """The verified secret of the session cookie; None when absent, tampered or foreign."""
        secret = self._read(request, self.name, "session")
        if secret is not None:
            request[SESSION_SECRET] = secret  # the access log's session handle (bff.access)
        return secret

    def browser_secret(self, request: web.Request) -> SessionSecret | None:
        return self._read(request, self.tx_name, "login")

    def set_session(self, response: web.StreamResponse, secret: SessionSecret) -> None:
        self._set(response, self.name, secret, self._max_age, self._same_site)

    def clear_session(self, response: web.StreamResponse) -> None:
        self._set(response, self.name, "", 0, self._same_site)

    def set_browser(self, response: web.StreamResponse, secret: SessionSecret) -> None:
        self._set(response, self.tx_name, secret, self._login_max_age, "Lax", "login")

    def clear_browser(self, response: web.StreamResponse) -> None:
        self._set(response, self.tx_name, "", 0, "Lax", "login")

    def _read(self, request: web.Request, name: str, purpose: str) -> SessionSecret | None:
        # Hotter path: a browser sends the same Cookie line call after call, and what one line
        # yields is fixed (its value, and whether that verifies); so a line that gave a verified
        # secret gives it again without the cookie parser. Only such lines, bounded, short.
        lines = request.headers.getall("Cookie", ())
        line = lines[0] if len(lines) == 1 and len(lines[0]) <= _LINE_MAX else None
        if line is not None:
            known = self._lines.get((purpose, line))
            if known is not None:
                return known
        secret = self._verify(_only_value(request, name), purpose)
        if secret is not None and line is not None:
            _remember(self._lines, (purpose, line), secret)
        return secret

    def _verify(self, raw: str | None, purpose: str) -> SessionSecret | None:
        if not raw:
            return None
        # Hot path: a value that verified before verifies again (keys change only at restart),
        # so each cookie pays for its HMAC once per process. Only valid values are remembered.
        known = self._verified.get((purpose, raw))
        if known is not None:
            return known
        # Only what we issue (base64url and dots): itsdangerous drops non-ASCII characters
        # from a signature before checking it, so "<valid>€" would otherwise still verify.
        if len(raw) > 512 or not _COOKIE_VALUE.fullmatch(raw):
            return None
        value = self._keyring.unsign(raw, purpose)
        if not value:
            return None
        secret = SessionSecret(value)
        _remember(self._verified, (purpose, raw), secret)
        return secret

    def _set(
        self,
        response: web.StreamResponse,
        name: str,
        value: str,
        max_age: int,
        same_site: str,
        purpose: str = "session",
    ) -> None:
        signed = self._keyring.sign(value, purpose) if value else ""
        # No Domain attribute and Path=/: required by the __Host- prefix, and the narrowest scope.
        response.set_cookie(
            name,
            signed,
            max_age=max_age,
            path="/",
            secure=self._secure,
            httponly=True,
            samesite=same_site,
        )


def browser_pairs(line: str) -> list[tuple[str, str]]:
    """A ``Cookie`` line's (name, value) pairs as browsers write it (RFC 6265 5.4, 6265bis 5.7):
    pairs split on ``;``, spaces stripped, the name up to the first ``=``. A double quote is just
    a character, as it is to the browser that stored the cookie; a pair without ``=`` counts
    under its whole text, so that it cannot hide a name either."""
    pairs = []
    for piece in line.split(";"):
        key, _, value = piece.partition("=")
        pairs.append((key.strip(" \t"), value.strip(" \t")))
    return pairs


def _only_value(request: web.Request, name: str) -> str | None:
    """The value of the one cookie called ``name``; None when absent or sent more than once."""
    lines = request.headers.getall("Cookie", ())
    if not lines:
        return None
    if len(lines) == 1 and lines[0].count(name) <= 1:
        # Hot path: the name occurs at most once as text, so at most once as a cookie. (If it
        # sits inside a quoted value, aiohttp finds no such cookie and the browser's reading
        # ends in a quote, which no issued value has: no cookie either way.)
        return request.cookies.get(name)
    pairs = request.get(_PAIRS)
    if pairs is None:  # split at most once per request, whichever cookie is read first
        pairs = tuple(pair for line in lines for pair in browser_pairs(line))
        request[_PAIRS] = pairs
    values = [value for key, value in pairs if key == name]
    return values[0] if len(values) == 1 else None


def _remember(
    cache: dict[tuple[str, str], SessionSecret], key: tuple[str, str], secret: SessionSecret
) -> None:
    """Bounded: the oldest entry goes first, so a flood of cookies cannot grow memory."""
    if len(cache) >= _VERIFIED_MAX:
        cache.pop(next(iter(cache)))
    cache[key] = secret
