"""The `upstreams` section: proxied routes, each checked and built into an `Upstream`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from bff.config.checks import TOKEN_RE, Reader, under, url_path_problem
from bff.config.problems import Key
from bff.config.settings import Upstream

# Request headers an upstream's set_headers must not touch: the token, the browser's cookie,
# routing and hop-by-hop headers are bff's business.
_FORBIDDEN_SET_HEADERS: Final = frozenset({
    "authorization", "cookie", "host", "connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length",
})  # fmt: skip


def build_upstreams(r: Reader, data: dict[str, Any], prefix: str | None) -> tuple[Upstream, ...]:
    """The routes in the order given (Settings sorts them); `prefix` is bff's own, if valid."""
    raw = r.get(data, (), "upstreams", [])
    out: list[Upstream] = []
    at: list[int] = []  # the index in the YAML list of each of `out`
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        if isinstance(item, dict) and r.ctx.ok(("upstreams", i)):
            up = _upstream(r, item, ("upstreams", i), prefix)
            if up.path and up.path in seen and r.ctx.ok(("upstreams", i, "path")):
                r.ctx.report(
                    ("upstreams", i, "path"),
                    f"duplicate path (same as upstreams[{seen[up.path]}].path)",
                )
            seen.setdefault(up.path, i)
            out.append(up)
            at.append(i)
    _check_resource_parameter(r, data, list(zip(at, out, strict=True)))
    return tuple(out)


def _check_resource_parameter(
    r: Reader, data: dict[str, Any], routes: list[tuple[int, Upstream]]
) -> None:
    """An OP that says ``audience`` (Auth0 style) issues a token for one audience at a time."""
    oidc = data.get("oidc")
    providers = oidc if isinstance(oidc, list) else [oidc]  # a route serves every provider's
    named = [p.get("resource_parameter") for p in providers if isinstance(p, dict)]
    if "audience" not in named:
        return
    for i, up in routes:
        if up.token != "exchange" and len(up.resource) > 1:  # noqa: S105 (a mode)
            r.ctx.report(
                ("upstreams", i, "resource"),
                "oidc.resource_parameter is audience: one audience per route (a token names "
                "one audience at such an OP)",
            )


def _upstream(r: Reader, d: dict[str, Any], p: Key, prefix: str | None) -> Upstream:
    path = r.get(d, p, "path", "")
    if path:
        problem = url_path_problem(path)
        if problem:
            r.ctx.report((*p, "path"), f"{problem}, got {r.ctx.show((*p, 'path'), path)}")
        elif prefix and (under(path, prefix) or under(prefix, path)):
            r.ctx.report(
                (*p, "path"),
                f"overlaps the bff endpoint prefix {prefix!r} (prefix setting); "
                "choose another path",
            )
    url = r.get(d, p, "url", "")
    if url:
        parts = r.url((*p, "url"), url, ("http", "https", "ws", "wss"))
        if parts is not None:
            url = url.rstrip("/")
    attach = r.get(d, p, "token", "user")
    client_scopes = r.scopes(d, p, "client_scopes", ())
    if client_scopes and attach != "client" and r.ctx.ok((*p, "token")):
        r.ctx.report((*p, "client_scopes"), "only used with token: client")
    resource, audience, exchange_scopes = _targets(r, d, p, attach)
    methods: tuple[str, ...] | None = None
    raw_methods = r.get(d, p, "methods", None)
    if isinstance(raw_methods, list):
        methods = tuple(m.upper() for m in raw_methods if isinstance(m, str))
        for i, m in enumerate(methods):
            if not TOKEN_RE.fullmatch(m):
                shown = r.ctx.show((*p, "methods", i), m)
                r.ctx.report((*p, "methods", i), f"not an HTTP method: {shown}")
        r.unique((*p, "methods"), list(enumerate(methods)), "method")
    set_headers: dict[str, str] = {}
    for name, value in r.get(d, p, "set_headers", {}).items():
        hp = (*p, "set_headers", name)
        if not TOKEN_RE.fullmatch(name):
            r.ctx.report(hp, "not a valid header name")
        elif name.lower() in _FORBIDDEN_SET_HEADERS:
            r.ctx.report(hp, f"{name} is managed by bff and cannot be set")
        elif name.lower() in {n.lower() for n in set_headers}:
            r.ctx.report(hp, "set twice (header names are case-insensitive)")
        elif isinstance(value, str):
            set_headers[name] = r.header_value(hp, value)
    remove = tuple(h.lower() for h in r.str_tuple(d, p, "remove_headers", ()))
    for i, h in enumerate(remove):
        if not TOKEN_RE.fullmatch(h):
            shown = r.ctx.show((*p, "remove_headers", i), h)
            r.ctx.report((*p, "remove_headers", i), f"not a valid header name: {shown}")
    return Upstream(
        path=path,
        url=url,
        token=attach,
        scopes=r.scopes(d, p, "scopes", ()),
        client_scopes=client_scopes,
        methods=methods,
        timeout=r.positive(d, p, "timeout", 30.0),
        connect_timeout=r.positive(d, p, "connect_timeout", 5.0),
        websocket=r.get(d, p, "websocket", False),
        set_headers=MappingProxyType(set_headers),
        remove_headers=remove,
        resource=resource,
        audience=audience,
        exchange_scopes=exchange_scopes,
    )


def _listed(r: Reader, d: dict[str, Any], p: Key, key: str) -> tuple[str, ...]:
    raw = r.get(d, p, key, ())
    if isinstance(raw, str):
        return (raw,)
    return tuple(v for v in raw if isinstance(v, str)) if isinstance(raw, list) else ()


def _targets(
    r: Reader, d: dict[str, Any], p: Key, attach: Any
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``resource``, ``audience`` and ``exchange_scopes`` (issue 12): which token modes take
    them, and RFC 8707 2's rule that a resource is an absolute URI without a fragment."""
    resource = _listed(r, d, p, "resource")
    audience = _listed(r, d, p, "audience")
    exchange_scopes = r.scopes(d, p, "exchange_scopes", ())
    mode_ok = r.ctx.ok((*p, "token"))
    for i, uri in enumerate(resource):
        key = (*p, "resource", i) if isinstance(d.get("resource"), list) else (*p, "resource")
        problem = resource_problem(uri)
        if problem:
            r.ctx.report(key, f"{problem}, got {r.ctx.show(key, uri)}")
    r.unique((*p, "resource"), list(enumerate(resource)), "resource")
    r.unique((*p, "audience"), list(enumerate(audience)), "audience")
    if resource and mode_ok and attach in ("client", "none"):
        r.ctx.report(
            (*p, "resource"),
            f"not used with token: {attach} (only user, user_or_none and exchange routes get a "
            "token for a resource)",
        )
    if audience and mode_ok and attach != "exchange":
        r.ctx.report((*p, "audience"), "only used with token: exchange")
    if exchange_scopes and mode_ok and attach != "exchange":
        r.ctx.report((*p, "exchange_scopes"), "only used with token: exchange")
    if attach == "exchange" and mode_ok and not resource and not audience:
        r.ctx.report(
            (*p, "token"),
            "token: exchange needs an audience or a resource: the exchanged token is for "
            "that upstream alone",
        )
    return resource, audience, exchange_scopes


def resource_problem(uri: str) -> str | None:
    """Why ``uri`` is not an RFC 8707 resource indicator (None if it is)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "must be an absolute URI"
    if not parts.scheme or not (parts.netloc or parts.path):
        return "must be an absolute URI (RFC 8707: e.g. https://api.example.com/orders)"
    if "#" in uri:
        return "must not contain a fragment (RFC 8707)"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        return "must not contain spaces or control characters"
    return None
