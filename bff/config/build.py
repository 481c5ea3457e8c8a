"""Semantic checks and the dataclasses: schema-checked data -> `Settings`.

Checks here are what a schema cannot say: URLs and paths, cross-field rules (auth method vs.
secret or key, idle vs. absolute timeout, Secure vs. cookie name) and duplicates. Files named in
the config (private_key_file) are checked for readability now rather than at the first login.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from bff import tracing as bff_tracing
from bff.config.checks import (
    MISSING,
    Reader,
    fmt_seconds,
    readable_file_problem,
    store_problem,
    url_path_problem,
)
from bff.config.problems import Context, Key
from bff.config.settings import (
    DEFAULT_CSP,
    DEFAULT_SCOPES,
    CookieSettings,
    LimitSettings,
    Listen,
    LogSettings,
    MetricsSettings,
    OidcSettings,
    RateLimit,
    RateLimitSettings,
    Secret,
    SecuritySettings,
    SessionSettings,
    Settings,
    ShutdownSettings,
    TracingSettings,
    Upstream,
    is_dev_url,
    is_loopback_host,
)
from bff.config.store import build_redis, build_store_timeout
from bff.config.upstreams import build_upstreams
from bff.redirects import is_local_path

# Authorization request parameters that bff sets itself; extra_auth_params must not override them.
_RESERVED_AUTH_PARAMS: Final = frozenset({
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
    "code_challenge", "code_challenge_method", "response_mode", "request", "request_uri",
})  # fmt: skip
# A DNS name or an IPv4 address, as in a Host header without its port.
_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME: Final = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def build_settings(ctx: Context, data: dict[str, Any], base: Path) -> Settings | None:
    """The Settings, or None when a problem was reported (here or by an earlier stage)."""
    return _Builder(ctx, base).settings(data)


class _Builder(Reader):
    """One method per section; each reports its problems and returns what it could build."""

    def settings(self, data: dict[str, Any]) -> Settings | None:
        # Every section is checked even after a problem, so that all of them are reported.
        public_url = self.public_url(data)
        dev = is_dev_url(public_url) if public_url else False
        listen_data = self.section(data, "listen")
        listen = Listen(
            host=self.get(listen_data, ("listen",), "host", "127.0.0.1"),
            port=int(self.get(listen_data, ("listen",), "port", 8080)),
        )
        static = self.local_path(self.get(data, (), "static", "static"))
        prefix = self.prefix(data)
        providers = self.providers(data)
        oidc = providers[0] if providers else None
        session = self.session(self.section(data, "session"), dev, public_url is not None)
        keys = self.keys(data)
        upstreams = build_upstreams(self, data, prefix)
        if providers:
            self.route_scopes(data, tuple(s for p in providers for s in p.scopes))
            if any(p.dpop for p in providers):
                self.no_exchange_with_dpop(upstreams)
        sec, sp = self.section(data, "security"), ("security",)
        csp = self.get(sec, sp, "content_security_policy", DEFAULT_CSP)
        security = SecuritySettings(
            content_security_policy=self.header_value((*sp, "content_security_policy"), csp),
            hsts=self.get(sec, sp, "hsts", True),
        )
        rate_limits = self.rate_limits(self.section(data, "rate_limits"))
        trusted_proxies = self.trusted_proxies(data)
        log_data = self.section(data, "log")
        log = LogSettings(
            level=self.get(log_data, ("log",), "level", "info"),
            format=self.get(log_data, ("log",), "format", "json"),
            access=self.get(log_data, ("log",), "access", True),
        )
        sd, sdp = self.section(data, "shutdown"), ("shutdown",)
        shutdown = ShutdownSettings(
            drain=self.duration(sd, sdp, "drain", 5.0), grace=self.duration(sd, sdp, "grace", 25.0)
        )
        metrics = self.metrics(self.section(data, "metrics"), listen)
        workers = self.get(data, (), "workers", None)
        lim, lp = self.section(data, "limits"), ("limits",)
        limits = LimitSettings(
            max_request_line=int(self.get(lim, lp, "max_request_line", 8190)),
            max_header_size=int(self.get(lim, lp, "max_header_size", 8190)),
            max_headers=int(self.get(lim, lp, "max_headers", 100)),
        )
        tracing = self.tracing(self.section(data, "tracing"))
        if self.ctx.problems or public_url is None or oidc is None or prefix is None:
            return None
        return Settings(
            public_url=public_url,
            listen=listen,
            static=static,
            prefix=prefix,
            oidc=oidc,
            providers=providers,
            session=session,
            keys=keys,
            upstreams=upstreams,
            security=security,
            rate_limits=rate_limits,
            trusted_proxies=trusted_proxies,
            log=log,
            metrics=metrics,
            workers=workers,
            limits=limits,
            tracing=tracing,
            shutdown=shutdown,
        )

    def public_url(self, data: dict[str, Any]) -> str | None:
        path: Key = ("public_url",)
        raw = self.get(data, (), "public_url")
        if raw is MISSING:
            return None
        parts = self.url(path, raw, ("http", "https"), allow_path=False)
        if parts is None:
            return None
        host = parts.hostname or ""
        if parts.scheme == "http" and not is_loopback_host(host):
            # The session cookie is Secure here (only a loopback http origin may drop it), and a
            # browser never stores a Secure cookie from http: every login would loop.
            self.ctx.report(
                path, "must be https:// (http:// only on a loopback host, for development)"
            )
            return None
        netloc = f"[{host}]" if ":" in host else host
        port = parts.port
        if port is not None and (parts.scheme, port) not in (("http", 80), ("https", 443)):
            netloc += f":{port}"
        return f"{parts.scheme}://{netloc}"

    def route_scopes(self, data: dict[str, Any], asked: tuple[str, ...]) -> None:
        """A route's scopes must be among oidc.scopes: bff asks the OP for those alone, so a
        session holds no other and every call to such a route would answer 403."""
        raw = self.get(data, (), "upstreams", [])
        for i, item in enumerate(raw if isinstance(raw, list) else []):
            p: Key = ("upstreams", i, "scopes")
            scopes = self.str_tuple(item, p[:2], "scopes", ())
            missing = [s for s in scopes if s not in asked]
            if missing and self.ctx.ok(p) and self.ctx.ok(("oidc", "scopes")):
                self.ctx.report(
                    p,
                    f"{', '.join(missing)} not in oidc.scopes: bff asks the OP only for "
                    "oidc.scopes, so every call to this route would answer 403; add "
                    f"{'them' if len(missing) > 1 else 'it'} to oidc.scopes",
                )

    def prefix(self, data: dict[str, Any]) -> str | None:
        raw = self.get(data, (), "prefix", "/bff")
        problem = url_path_problem(raw)
        if problem:
            self.ctx.report(("prefix",), f"{problem}, got {self.ctx.show(('prefix',), raw)}")
            return None
        return str(raw)

    def providers(self, data: dict[str, Any]) -> tuple[OidcSettings, ...]:
        """``oidc:`` as one mapping (the provider ``default``) or a list of named mappings, the
        first being the default. Names, issuers and hosts must be unique: a logout token's
        ``iss`` and a request's host each name one provider."""
        raw = data.get("oidc")
        if not self.ctx.ok(("oidc",)):
            return ()
        if isinstance(raw, dict):
            one = self.oidc(raw, ("oidc",))
            return (one,) if one is not None else ()
        if not isinstance(raw, list):
            return ()
        built: list[OidcSettings] = []
        names: dict[str, int] = {}
        issuers: dict[str, int] = {}
        hosts: dict[str, int] = {}
        for i, item in enumerate(raw):
            p: Key = ("oidc", i)
            if not isinstance(item, dict) or not self.ctx.ok(p):
                continue
            provider = self.oidc(item, p)
            if provider is None:
                continue
            for value, seen, key in (
                (provider.name, names, "name"),
                (provider.issuer, issuers, "issuer"),
            ):
                if value in seen and self.ctx.ok((*p, key)):
                    self.ctx.report((*p, key), f"oidc[{seen[value]}] has the same {key} already")
                seen.setdefault(value, i)
            for host in provider.hosts:
                if host in hosts and hosts[host] != i:
                    self.ctx.report((*p, "hosts"), f"{host} is mapped by oidc[{hosts[host]}] too")
                hosts.setdefault(host, i)
            built.append(provider)
        return tuple(built) if len(built) == len(raw) else ()

    def hosts(self, d: dict[str, Any], p: Key) -> tuple[str, ...]:
        """Host names as a browser sends them in ``Host`` (no scheme, port or path)."""
        found: list[str] = []
        for j, raw in enumerate(self.str_tuple(d, p, "hosts", ())):
            host = raw.strip().lower().rstrip(".")
            if not _HOST_NAME.fullmatch(host):
                self.ctx.report(
                    (*p, "hosts", j),
                    f"expected a host name like staff.example.com (no scheme or port), got {raw!r}",
                )
                continue
            found.append(host)
        return tuple(found)

    def oidc(self, d: dict[str, Any], p: Key = ("oidc",)) -> OidcSettings | None:
        issuer = self.get(d, p, "issuer")
        if issuer is not MISSING:
            parts = self.url((*p, "issuer"), issuer, ("http", "https"))
            if (
                parts is not None
                and parts.scheme == "http"
                and not is_loopback_host(parts.hostname)
            ):
                message = "must be https:// (http:// only for a loopback OP in dev)"
                self.ctx.report((*p, "issuer"), message)
        client_id = self.get(d, p, "client_id", "")
        secret_raw = self.get(d, p, "client_secret", None)
        client_secret = Secret(secret_raw) if isinstance(secret_raw, str) else None
        key_raw = self.get(d, p, "private_key_file", None)
        key_file = self.local_path(key_raw) if isinstance(key_raw, str) else None
        if key_file is not None:
            problem = readable_file_problem(key_file)
            if problem:
                kp = (*p, "private_key_file")
                shown = self.ctx.show(kp, key_raw) if kp in self.ctx.from_env else str(key_file)
                self.ctx.report(kp, f"{problem}: {shown}")
        # A value that is there but invalid counts as given: it has its own message already.
        has_secret = d.get("client_secret") is not None
        has_key = d.get("private_key_file") is not None
        mp = (*p, "token_endpoint_auth_method")
        method = self.get(d, p, "token_endpoint_auth_method", None)
        if method is None and self.ctx.ok(mp):
            method = "client_secret_basic" if has_secret else "private_key_jwt"
            if not has_secret and not has_key:
                self.ctx.report(
                    p,
                    "no client authentication: set client_secret (client_secret_basic) or "
                    "private_key_file (private_key_jwt)",
                )
        elif method in ("client_secret_basic", "client_secret_post") and not has_secret:
            self.ctx.report(mp, f"{method} needs oidc.client_secret")
        elif method == "private_key_jwt" and not has_key:
            self.ctx.report(mp, "private_key_jwt needs oidc.private_key_file")
        scopes = self.scopes(d, p, "scopes", DEFAULT_SCOPES)
        if "openid" not in scopes and self.ctx.ok((*p, "scopes")):
            self.ctx.report((*p, "scopes"), "must contain 'openid'")
        algs = self.id_token_algs(d, p)
        extra: dict[str, str] = {}
        for name, value in self.get(d, p, "extra_auth_params", {}).items():
            if name in _RESERVED_AUTH_PARAMS:
                message = "is set by bff itself and cannot be overridden"
                self.ctx.report((*p, "extra_auth_params", name), message)
            elif isinstance(value, str | int) and not isinstance(value, bool):
                extra[name] = str(value)
        redirect = self.get(d, p, "post_logout_redirect", "/")
        shown = self.ctx.show((*p, "post_logout_redirect"), redirect)
        if not is_local_path(redirect):
            self.ctx.report(
                (*p, "post_logout_redirect"),
                "must be a same-origin path starting with a single '/' (no '//', '\\', scheme, "
                f"spaces or control characters), got {shown}",
            )
        revocation = self.get(d, p, "revocation_endpoint", None)
        if isinstance(revocation, str):
            rp = (*p, "revocation_endpoint")
            rparts = self.url(rp, revocation, ("http", "https"))
            if rparts is None:
                revocation = None
            elif rparts.scheme == "http" and not is_loopback_host(rparts.hostname):
                self.ctx.report(rp, "must be https:// (http:// only for a loopback OP in dev)")
        return OidcSettings(
            name=self.get(d, p, "name", "default"),
            hosts=self.hosts(d, p),
            par=self.get(d, p, "par", "auto") or "off",  # a bare YAML `off` is false
            issuer=issuer if isinstance(issuer, str) else "",
            client_id=client_id,
            client_secret=client_secret,
            private_key_file=key_file,
            private_key_kid=self.get(d, p, "private_key_kid", None),
            token_endpoint_auth_method=method or "client_secret_basic",
            scopes=scopes,
            id_token_algs=algs,
            extra_auth_params=MappingProxyType(extra),
            refresh_skew=self.duration(d, p, "refresh_skew", 60.0),
            clock_skew=self.duration(d, p, "clock_skew", 60.0),
            http_timeout=self.positive(d, p, "http_timeout", 10.0),
            jwks_refetch_interval=self.duration(d, p, "jwks_refetch_interval", 10.0),
            post_logout_redirect=redirect,
            logout_id_token_hint=self.get(d, p, "logout_id_token_hint", False),
            revocation_endpoint=revocation if isinstance(revocation, str) else None,
            dpop=self.get(d, p, "dpop", False),
            resource_parameter=self.get(d, p, "resource_parameter", "resource"),
            login_resources=self.get(d, p, "login_resources", True),
        )

    def no_exchange_with_dpop(self, upstreams: Sequence[Upstream]) -> None:
        """A DPoP session's tokens are all bound to its key; an exchanged token is not (the
        exchange grant carries no proof yet), and sending it would break invariant 22."""
        for i, up in enumerate(upstreams):
            if up.token == "exchange":  # noqa: S105 (a mode)
                self.ctx.report(
                    ("upstreams", i, "token"),
                    "token: exchange is not supported with oidc.dpop: true (an exchanged token "
                    "would not be bound to the session's DPoP key)",
                )

    def session(self, d: dict[str, Any], dev: bool, url_ok: bool) -> SessionSettings:
        p: Key = ("session",)
        store = self.get(d, p, "store", "memory://")
        problem = store_problem(store)
        if problem:
            self.ctx.report((*p, "store"), problem)
        cookie_data = self.get(d, p, "cookie", {})
        cp: Key = (*p, "cookie")
        name = self.get(cookie_data, cp, "name", "__Host-bff")
        secure = self.get(cookie_data, cp, "secure", True)
        if secure is False and url_ok and not dev and self.ctx.ok(("public_url",)):
            self.ctx.report(
                (*cp, "secure"),
                "false is only allowed when public_url is http:// on a loopback host (dev)",
            )
        name_ok = self.ctx.ok((*cp, "name"))
        if secure is False and name_ok and name.startswith(("__Host-", "__Secure-")):
            prefix = name.split("-", 1)[0] + "-"
            path = (*cp, "name") if "name" in cookie_data else (*cp, "secure")
            self.ctx.report(
                path,
                f"a {prefix} cookie must be Secure and browsers reject it otherwise; with "
                "secure: false (plain-HTTP dev) use another name, e.g. name: bff-session",
            )
        cookie = CookieSettings(
            name=name, same_site=self.get(cookie_data, cp, "same_site", "strict"), secure=secure
        )
        idle = self.positive(d, p, "idle_timeout", 8 * 3600.0)
        absolute = self.positive(d, p, "absolute_timeout", 24 * 3600.0)
        ip, ap = (*p, "idle_timeout"), (*p, "absolute_timeout")
        if idle > absolute and self.ctx.ok(ip) and self.ctx.ok(ap):
            if {ip, ap} & self.ctx.from_env.keys():  # values from the environment stay unsaid
                said = ("", "")
            else:
                said = (f" ({fmt_seconds(idle)})", f" ({fmt_seconds(absolute)})")
            message = f"idle_timeout{said[0]} must not exceed absolute_timeout{said[1]}"
            self.ctx.report(ip if "idle_timeout" in d else ap, message)
        cache_ttl = self.duration(d, p, "cache_ttl", 1.0)
        tp = (*p, "cache_ttl")
        if cache_ttl > 5 and self.ctx.ok(tp):
            self.ctx.report(
                tp, f"must be between 0s and 5s, got {self.ctx.show(tp, d['cache_ttl'])}"
            )
        return SessionSettings(
            store=store,
            store_timeout=build_store_timeout(self, d, p),
            redis=build_redis(self, d, p, store),
            cookie=cookie,
            idle_timeout=idle,
            absolute_timeout=absolute,
            login_timeout=self.positive(d, p, "login_timeout", 600.0),
            cache_ttl=cache_ttl,
        )

    def rate_limits(self, d: dict[str, Any]) -> RateLimitSettings:
        p: Key = ("rate_limits",)
        default = RateLimitSettings()

        def bucket(name: str, fallback: RateLimit) -> RateLimit:
            sub, sp = self.get(d, p, name, {}), (*p, name)
            return RateLimit(
                per_second=float(self.get(sub, sp, "per_second", fallback.per_second)),
                burst=int(self.get(sub, sp, "burst", fallback.burst)),
            )

        return RateLimitSettings(
            enabled=self.get(d, p, "enabled", default.enabled),
            login=bucket("login", default.login),
            callback=bucket("callback", default.callback),
            backchannel_logout=bucket("backchannel_logout", default.backchannel_logout),
        )

    def tracing(self, d: dict[str, Any]) -> TracingSettings:
        p: Key = ("tracing",)
        default = TracingSettings()
        enabled = self.get(d, p, "enabled", default.enabled)
        if enabled is True and not bff_tracing.available():
            self.ctx.report(
                (*p, "enabled"),
                "tracing needs the OpenTelemetry packages: pip install 'bff[otel]'",
            )
        return TracingSettings(
            enabled=enabled is True,
            service_name=self.get(d, p, "service_name", default.service_name),
            trust_incoming=self.get(d, p, "trust_incoming", default.trust_incoming),
        )

    def metrics(self, d: dict[str, Any], public: Listen) -> MetricsSettings:
        p: Key = ("metrics",)
        default = MetricsSettings()
        raw = self.get(d, p, "listen", {})
        listen = None
        if isinstance(raw, dict):
            lp: Key = (*p, "listen")
            assert default.listen is not None
            listen = Listen(
                host=self.get(raw, lp, "host", default.listen.host),
                port=int(self.get(raw, lp, "port", default.listen.port)),
            )
            same_port = listen.port == public.port != 0
            same_host = listen.host == public.host or "0.0.0.0" in (listen.host, public.host)  # noqa: S104 - compared, not bound
            if same_port and same_host and "listen" in d:
                self.ctx.report(
                    lp,
                    f"must not be the public listener's address ({public.host}:{public.port}); "
                    "to serve /metrics there, set metrics.public: true",
                )
            elif same_port and same_host:
                self.ctx.report(
                    ("listen", "port"),
                    f"{public.port} is where /metrics is served by default; choose another port "
                    "or set metrics.listen",
                )
        return MetricsSettings(listen=listen, public=self.get(d, p, "public", default.public))

    def trusted_proxies(self, data: dict[str, Any]) -> tuple[str, ...]:
        """CIDRs (or single addresses), normalised; host bits set is a mistake worth saying."""
        p: Key = ("trusted_proxies",)
        raw = self.get(data, (), "trusted_proxies", [])
        found: list[tuple[int, str]] = []
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not self.ctx.ok((*p, i)):
                continue
            shown = self.ctx.show((*p, i), item)
            try:
                network = ipaddress.ip_network(item.strip())
            except ValueError:
                try:
                    loose = ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    message = (
                        "expected an IP network like 10.0.0.0/8 or 2001:db8::/32 (or one "
                        f"address), got {shown}"
                    )
                else:
                    message = f"{shown} has host bits set; did you mean {loose}?"
                self.ctx.report((*p, i), message)
                continue
            found.append((i, str(network)))
        self.unique(p, found, "network")
        return tuple(dict.fromkeys(n for _, n in found))

    def keys(self, data: dict[str, Any]) -> tuple[Secret, ...]:
        raw = self.get(data, (), "keys", [])
        keys = [
            (i, k) for i, k in enumerate(raw) if isinstance(k, str) and self.ctx.ok(("keys", i))
        ]
        self.unique(("keys",), keys, "key")
        return tuple(Secret(k) for _, k in keys)
