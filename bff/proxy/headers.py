"""The proxy's header policy: what crosses to the upstream and back, and what stays behind.

The browser's ``Cookie`` and ``Authorization`` never reach an upstream, an upstream's
``Set-Cookie`` never reaches the browser (bff owns the origin's cookies), and hop-by-hop headers,
including any named in ``Connection``, stop at each hop.

Header names are compared by meaning, not by spelling: lower-cased and with ``_`` read as ``-``
(:func:`header_key`), because nginx, CGI, WSGI and PHP all turn ``X_Forwarded_For`` and
``x-forwarded-for`` into the same ``HTTP_X_FORWARDED_FOR``. Every header that names the client's
address, overrides the method or URL, or names the user the way auth proxies do
(:data:`CLIENT_ADDRESS`, :data:`OVERRIDES`, :data:`IDENTITY` and the ``x-forwarded*`` /
``x-envoy-`` / ``x-auth-request-``... families) is dropped from the browser's request in every such
spelling, even behind a trusted proxy: bff sends its own ``X-Forwarded-*`` and ``Forwarded``
(:mod:`bff.peers`), and nothing else may tell an upstream who the client is or which method or
path it "really" asked for.

On routes that attach a user's token, the answer gets ``Cache-Control: private`` unless the
upstream said ``no-store``, and loses every shared-cache directive and CDN-targeted header
(:func:`private_cache_control`): a cache in front of bff must never give one user's answer to
another.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Final, Protocol, TypeAlias, TypeVar

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from bff.access import REQUEST_ID

__all__ = [
    "CLIENT_ADDRESS",
    "HOP_BY_HOP",
    "IDENTITY",
    "OVERRIDES",
    "REQUEST_DROP",
    "WS_HANDSHAKE",
    "answer_fields",
    "downstream_headers",
    "header_key",
    "private_cache_control",
    "upstream_headers",
]


def header_key(name: str) -> str:
    """A header name as servers that map it to ``HTTP_NAME`` see it: lower case, ``-`` for ``_``."""
    name = name.lower()
    return name.replace("_", "-") if "_" in name else name


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
#: Headers some server, proxy, CDN or framework reads as the client's address, scheme or host
#: (besides the ``x-forwarded*`` family, dropped by prefix).
CLIENT_ADDRESS: Final = frozenset(
    {
        "forwarded",
        "forwarded-for",
        "x-real-ip",
        "x-client-ip",
        "client-ip",
        "true-client-ip",  # Akamai, Cloudflare Enterprise
        "x-true-client-ip",
        "cf-connecting-ip",  # Cloudflare
        "cf-connecting-ipv6",
        "cf-pseudo-ipv4",
        "cf-visitor",  # Cloudflare's scheme
        "fastly-client-ip",  # Fastly
        "fastly-ssl",
        "x-cluster-client-ip",  # Rackspace, Riverbed
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-original-remote-addr",
        "x-original-forwarded-for",  # ingress-nginx
        "x-proxyuser-ip",
        "x-arr-clientip",  # IIS ARR
        "x-arr-ssl",
        "x-azure-clientip",  # Azure Front Door
        "x-azure-socketip",
        "x-azure-fdid",  # Front Door's id, which App Service access rules trust
        "x-appengine-user-ip",
        "wl-proxy-client-ip",  # WebLogic
        "proxy-client-ip",
        "wl-proxy-ssl",
        "x-custom-ip-authorization",
        "x-coming-from",
        "cluster-client-ip",
        "real-ip",
        "x-true-ip",
        "fly-client-ip",  # Fly.io
        "do-connecting-ip",  # DigitalOcean App Platform
        "x-nf-client-connection-ip",  # Netlify
        "x-vercel-forwarded-for",  # Vercel
        "front-end-https",  # Microsoft's scheme
        "x-url-scheme",
        "x-scheme",
        "x-host",  # host overrides that frameworks build links from
        "x-original-host",
        "x-http-host-override",
    }
)
#: Method and URL overrides that frameworks honour (Express, ASP.NET, Symfony/Laravel, Rails,
#: IIS, nginx auth_request, ingress-nginx): they would get around a route's ``methods:`` list or
#: its path prefix.
OVERRIDES: Final = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-method",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-override-url",
        "x-http-destinationurl",
        "x-proxy-url",
        # Framework-internal routing, set by the framework's own front for itself: Next.js skips
        # its middleware (and the auth in it) on x-middleware-subrequest (CVE-2025-29927).
        "x-middleware-subrequest",
        "x-invoke-path",
        "x-invoke-query",
        "x-invoke-status",
        "x-invoke-output",
        "x-now-route-matches",
        "x-matched-path",
    }
)
#: Who the user is, as auth proxies tell their upstreams (Apache/CGI, Grafana, oauth2-proxy,
#: Azure Easy Auth, Google IAP, AWS ALB, Cloudflare Access, Pomerium, Vouch): an upstream that
#: trusts one of these would take a browser's word for the identity. bff's word is the token.
IDENTITY: Final = frozenset(
    {
        "remote-user",
        "x-remote-user",
        "x-remote-email",
        "x-remote-group",
        "x-remote-groups",
        "x-user",
        "x-user-id",
        "x-email",
        "x-authenticated-user",
        "x-authenticated-userid",
        "x-webauth-user",
        "x-webauth-email",
        "x-webauth-name",
        "x-vouch-user",
        "x-id-token",
        "x-access-token",
        "x-goog-authenticated-user-email",
        "x-goog-authenticated-user-id",
        "x-goog-iap-jwt-assertion",
        "cf-access-jwt-assertion",
        "cf-access-authenticated-user-email",
        # The client certificate as TLS-terminating proxies pass it on (nginx, Apache mod_ssl,
        # HAProxy, F5, IIS ARR, Traefik): an upstream behind bff that trusts one would take it
        # for an mTLS-verified identity; bff's word is the token, so no copy is passed on
        # (Envoy's x-forwarded-client-cert and Traefik's x-forwarded-tls-client-cert go with the
        # x-forwarded family).
        "x-ssl-client-cert",
        "x-client-cert",
        "ssl-client-cert",
        "x-ssl-cert",
        "x-arr-clientcert",
        "x-client-verify",
        "x-ssl-client-verify",
        "ssl-client-verify",
        "x-ssl-client-dn",
        "x-ssl-client-s-dn",
        "x-ssl-client-i-dn",
        "x-client-dn",
        "x-client-cert-dn",
        "x-ssl-client-serial",
        "x-ssl-client-fingerprint",
    }
)
#: Whole families: ``x-forwarded``, ``x-forwarded-*``; Envoy's ``x-envoy-*`` (among them the
#: client address and the original path) are for Envoy to set, never for a browser; and the
#: identity families of auth proxies (see :data:`IDENTITY`).
_DROP_PREFIXES: Final = (
    "x-forwarded",
    "x-envoy-",
    "x-auth-request-",
    "x-ms-client-principal",
    "x-ms-token-",
    "x-amzn-oidc-",
    "x-pomerium-",
)
#: To the upstream: also the browser's credentials (a ``DPoP`` proof among them: bff makes its
#: own for a DPoP-bound session, and a browser's must never pair with bff's token), its Host
#: (the upstream's comes from the URL), Expect (aiohttp answered it already), bff's own
#: anti-forgery header and the request id (replaced by the one bff vouches for, see bff.access).
REQUEST_DROP: Final = (
    HOP_BY_HOP
    | CLIENT_ADDRESS
    | OVERRIDES
    | IDENTITY
    | {"cookie", "authorization", "host", "expect", "x-csrf", "x-request-id", "dpop"}
)
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
#: Response headers that tell a CDN or reverse proxy how long to store, over Cache-Control:
#: dropped from answers that carry a user's data (RFC 9213 ``*-CDN-Cache-Control`` by suffix).
_SHARED_CACHE_HEADERS: Final = frozenset(
    {"surrogate-control", "edge-control", "akamai-cache-control", "x-accel-expires"}
)
#: Cache-Control directives that only shared caches obey (RFC 9111 5.2.2); ``private`` is
#: re-added bare, since ``private="field"`` lets a shared cache store the rest.
_SHARED_DIRECTIVES: Final = frozenset({"public", "s-maxage", "proxy-revalidate", "private"})
_TCHARS: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_DIRECTIVE: Final = re.compile(
    rf'[ \t]*(?:({_TCHARS})(?:[ \t]*=[ \t]*(?:{_TCHARS}|"(?:[^"\\]|\\.)*"))?[ \t]*)?(?:,|$)'
)
#: A user's answer: also without the upstream's Cache-Control (ours replaces it).
_PRIVATE_DROP: Final = _RESPONSE_DROP | _SHARED_CACHE_HEADERS | {"cache-control"}
_CACHE_CONTROL_MEMO: dict[str, str] = {}  # upstream value -> ours; upstreams send few distinct ones
_MEMO_MAX: Final = 256
_K = TypeVar("_K")
_V = TypeVar("_V")


class _Answer(Protocol):
    """An upstream's answer as far as its headers go (``UpstreamResponse``, aiohttp's)."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...


def upstream_headers(
    request: web.Request,
    drop: frozenset[str],
    extra: Iterable[tuple[str, str]],
    forwarded: Iterable[tuple[str, str]],
    token: str | None,
) -> list[tuple[str, str]]:
    """The headers sent upstream: the browser's minus ``drop`` (names as :func:`header_key`
    spells them), the forwarding families and those named in ``Connection``; then the route's
    own, the bearer and bff's forwarding headers (``forwarded``, from :mod:`bff.peers`)."""
    headers = request.headers
    named = _connection_tokens(headers.get("Connection"), upstream=True)
    passes = _verdicts(drop, _passes_upstream)
    out = []
    for k, v in headers.items():
        keep = passes.get(k)
        if keep is None:
            keep = _learn(passes, k, _passes_upstream(k, drop), _NAMES_MAX)
        if keep and (named is None or header_key(k) not in named):
            out.append((k, v))
    out.extend(extra)
    if token is not None:
        out.append(("Authorization", "Bearer " + token))
    out.extend(forwarded)
    rid = request.get(REQUEST_ID)
    if rid is not None:  # the browser's when well-formed, else bff's own (bff.access)
        out.append(("X-Request-ID", rid))
    return out


def downstream_headers(response: _Answer, *, private: bool) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones and ``Set-Cookie``; with
    ``private`` (a user's answer), also made unstorable by shared caches.

    A value whose bytes are not UTF-8 is dropped too: aiohttp holds it with surrogate escapes,
    and its writer would silently leave those bytes out (``\xff\xfe`` became an empty value),
    so the browser would get a different value than the upstream sent. UTF-8 passes byte-exact.
    """
    return CIMultiDict(answer_fields(response, private=private))


def answer_fields(
    response: _Answer, *, private: bool, whole: bool = False
) -> list[tuple[str, str]]:
    """:func:`downstream_headers` as a list of fields, in order; with ``whole`` (the body goes
    out in one piece, aiohttp sets its length), without the upstream's ``Content-Length``."""
    headers = response.headers
    drop, policy = _ANSWER_POLICIES[private, whole]
    named = _connection_tokens(headers.get("Connection"), upstream=False)
    passes = _verdicts(drop, policy)
    kept: list[tuple[str, str]] = []
    for k, v in headers.items():
        keep = passes.get(k)
        if keep is None:
            keep = _learn(passes, k, policy(k, drop), _NAMES_MAX)
        if keep and (named is None or k.lower() not in named) and (v.isascii() or _is_utf8(v)):
            kept.append((k, v))
    if private:
        upstream = headers.getall("Cache-Control", ())
        kept.append(
            ("Cache-Control", private_cache_control(", ".join(upstream) if upstream else ""))
        )
    return kept


# A header name's verdict depends only on the name as sent and the drop set (a route's, or one of
# the two answer policies): it is kept per drop set, so the policy's string work (case, ``_``,
# prefixes) runs once per name, not per request. Names are the client's or the upstream's text:
# bounded, oldest first out, like the ``Connection`` lists (browsers send ``keep-alive``).
_NAMES_MAX: Final = 512
_DROP_SETS_MAX: Final = 64
_Policy: TypeAlias = Callable[[str, frozenset[str]], bool]
_VERDICTS: dict[tuple[frozenset[str], _Policy], dict[str, bool]] = {}
_CONNECTION_TOKENS: dict[tuple[str, bool], frozenset[str]] = {}


def _passes_upstream(name: str, drop: frozenset[str]) -> bool:
    key = header_key(name)
    return key not in drop and not key.startswith(_DROP_PREFIXES)


def _passes_answer(name: str, drop: frozenset[str]) -> bool:
    return name.lower() not in drop


def _passes_private_answer(name: str, drop: frozenset[str]) -> bool:
    # A user's answer also loses RFC 9213's ``*-CDN-Cache-Control`` (by suffix).
    lowered = name.lower()
    return lowered not in drop and not lowered.endswith("cdn-cache-control")


_ANSWER_POLICIES: Final[dict[tuple[bool, bool], tuple[frozenset[str], _Policy]]] = {
    (False, False): (_RESPONSE_DROP, _passes_answer),
    (True, False): (_PRIVATE_DROP, _passes_private_answer),
    (False, True): (_RESPONSE_DROP | {"content-length"}, _passes_answer),
    (True, True): (_PRIVATE_DROP | {"content-length"}, _passes_private_answer),
}


def _verdicts(drop: frozenset[str], policy: _Policy) -> dict[str, bool]:
    """The verdicts kept for names under ``drop`` and ``policy`` (a function above)."""
    memo = _VERDICTS.get((drop, policy))
    if memo is None:
        memo = _learn(_VERDICTS, (drop, policy), {}, _DROP_SETS_MAX)
    return memo


def _learn(memo: dict[_K, _V], key: _K, value: _V, limit: int) -> _V:
    """``memo[key] = value`` (the oldest entry out once ``memo`` holds ``limit``); ``value``."""
    if len(memo) >= limit:
        memo.pop(next(iter(memo)))
    memo[key] = value
    return value


def _connection_tokens(value: str | None, *, upstream: bool) -> frozenset[str] | None:
    """The header names a ``Connection`` value lists (hop-by-hop, RFC 9110 7.6.1): spelled as
    :func:`header_key` does for the browser's request, lower case for an upstream's answer."""
    if value is None:
        return None
    known = _CONNECTION_TOKENS.get((value, upstream))
    if known is None:
        spell = header_key if upstream else str.lower
        known = frozenset(spell(t.strip()) for t in value.split(","))
        if len(value) <= _NAMES_MAX:
            _learn(_CONNECTION_TOKENS, (value, upstream), known, _NAMES_MAX)
    return known


def private_cache_control(value: str) -> str:
    """The upstream's ``Cache-Control`` for a user's answer: ``private`` first unless it says
    ``no-store``, with every shared-cache directive gone and the rest (``max-age``,
    ``no-cache``, ``must-revalidate``, ``stale-*``, ...) kept. A value that does not parse as a
    directive list becomes plain ``private`` (or ``no-store`` when it mentions that)."""
    if not value:
        return "private"
    memo = _CACHE_CONTROL_MEMO.get(value)
    if memo is not None:
        return memo
    kept: list[str] = []
    no_store = False
    pos, end = 0, len(value)
    while pos < end:
        match = _DIRECTIVE.match(value, pos)
        if match is None or match.end() == pos:  # not a directive list: keep nothing of it
            no_store = "no-store" in value.lower()
            kept = ["no-store"] if no_store else []
            break
        pos = match.end()
        name = match.group(1)
        if name is None:
            continue
        lowered = name.lower()
        no_store = no_store or lowered == "no-store"
        if lowered not in _SHARED_DIRECTIVES:
            kept.append(match.group(0).strip(" \t,"))
    result = ", ".join(kept if no_store else ["private", *kept])
    if len(_CACHE_CONTROL_MEMO) >= _MEMO_MAX:
        _CACHE_CONTROL_MEMO.pop(next(iter(_CACHE_CONTROL_MEMO)))
    _CACHE_CONTROL_MEMO[value] = result
    return result


def _is_utf8(value: str) -> bool:
    """False for a str decoded with surrogate escapes from bytes that were not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
