"""The proxy's header policy: what crosses to the upstream and back, and what stays behind.

The browser's ``Cookie`` and ``Authorization`` never reach an upstream, an upstream's
``Set-Cookie`` never reaches the browser (bff owns the origin's cookies), and hop-by-hop headers,
including any named in ``Connection``, stop at each hop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "HOP_BY_HOP",
    "REQUEST_DROP",
    "WS_HANDSHAKE",
    "downstream_headers",
    "upstream_headers",
]

# RFC 9110 7.6.1 hop-by-hop headers, plus the non-standard ones still seen in the wild.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: To the upstream: also the browser's credentials, its Host (the upstream's comes from the URL),
#: Expect (aiohttp answered it already) and any forwarding headers it made up (we set our own).
REQUEST_DROP: Final = HOP_BY_HOP | {
    "cookie",
    "authorization",
    "host",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-real-ip",
    "true-client-ip",
    # Overrides that frameworks honour (Express, ASP.NET, Symfony, IIS): they would get around
    # a route's `methods:` allow-list or its path prefix.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    # bff's own anti-forgery header is for bff, not the upstream.
    "x-csrf",
}
#: The browser's handshake headers; aiohttp makes the upstream handshake's own.
WS_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
_RESPONSE_DROP: Final = HOP_BY_HOP | {"set-cookie"}


def upstream_headers(
    request: web.Request,
    drop: frozenset[str],
    extra: Iterable[tuple[str, str]],
    forwarded: Iterable[tuple[str, str]],
    token: str | None,
) -> list[tuple[str, str]]:
    """The headers sent upstream: the browser's minus ``drop`` and those named in
    ``Connection``, then the route's own, the bearer and ``X-Forwarded-*``."""
    headers = request.headers
    connection = headers.get("Connection")
    if connection is not None:
        drop = drop | {t.strip().lower() for t in connection.split(",")}
    out = [
        (k, v)
        for k, v in headers.items()
        if (name := k.lower()) not in drop and not name.startswith("x-forwarded-")
    ]
    out.extend(extra)
    if token is not None:
        out.append(("Authorization", "Bearer " + token))
    remote = request.remote
    if remote:
        out.append(("X-Forwarded-For", remote))
    out.extend(forwarded)
    return out


def downstream_headers(response: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones and ``Set-Cookie``.

    A value whose bytes are not UTF-8 is dropped too: aiohttp holds it with surrogate escapes,
    and its writer would silently leave those bytes out (``\xff\xfe`` became an empty value),
    so the browser would get a different value than the upstream sent. UTF-8 passes byte-exact.
    """
    headers = response.headers
    drop = _RESPONSE_DROP
    connection = headers.get("Connection")
    if connection is not None:
        drop = drop | {t.strip().lower() for t in connection.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in drop and (v.isascii() or _is_utf8(v)):
            out.add(k, v)
    return out


def _is_utf8(value: str) -> bool:
    """False for a str decoded with surrogate escapes from bytes that were not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
