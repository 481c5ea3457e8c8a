"""The validated configuration: frozen dataclasses every other module reads.

Read this file first: each field says in one line what it means, and its default is the default
of the YAML key of the same name. Secrets are wrapped in `Secret` so that they cannot leak into
logs, `repr()` or `bff check-config` output.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit

REDACTED: Final = "**********"
"""What a secret looks like wherever it is printed."""

DEFAULT_SCOPES: Final = ("openid", "profile", "email", "offline_access")
DEFAULT_ID_TOKEN_ALGS: Final = ("RS256", "PS256", "ES256", "EdDSA")
DEFAULT_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)

TokenMode: TypeAlias = Literal["user", "client", "user_or_none", "none", "exchange"]
ResourceParameter: TypeAlias = Literal["resource", "audience"]
AuthMethod: TypeAlias = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]
ParMode: TypeAlias = Literal["auto", "required", "off"]
SameSite: TypeAlias = Literal["strict", "lax"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error", "critical"]
LogFormat: TypeAlias = Literal["json", "text"]


class Secret:
    """A string that never shows itself in `str()`, `repr()`, f-strings or logs; `.get()` gives it.

    Deliberately not a `str` subclass, so that concatenation, `json.dumps` or `%s` cannot leak it
    by accident. Equality is constant-time.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        object.__setattr__(self, "_value", value)

    def get(self) -> str:
        """The secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{REDACTED}')"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, format_spec: str) -> str:
        return format(REDACTED, format_spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


def _empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    """Where the HTTP server binds."""

    host: str = "127.0.0.1"  # interface to bind; `bff run --host` overrides it
    port: int = 8080  # TCP port (0 = any free port); `bff run --port` overrides it


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """Where Prometheus scrapes ``/metrics``: its own listener, loopback by default."""

    # where /metrics (and health) are served; None = nowhere; `bff run --metrics-port` sets the port
    listen: Listen | None = Listen(port=9464)
    public: bool = False  # also serve /metrics on the public listener (else a JSON 404 there)


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """OpenTelemetry traces (the ``bff[otel]`` extra); the exporter is set by ``OTEL_*``."""

    enabled: bool = False  # off unless configured; OTEL_* variables alone do not turn it on
    service_name: str = "bff"  # service.name, unless OTEL_SERVICE_NAME says otherwise
    trust_incoming: bool = True  # continue a browser's traceparent (its trace id, parent id)


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcSettings:
    """An OpenID Provider and how bff authenticates to it as a confidential client."""

    name: str = "default"  # the provider's name: /bff/login?idp=NAME, the session's `idp`
    # Host names whose logins go to this provider when the login names no `idp` (see login.py)
    hosts: tuple[str, ...] = ()
    par: ParMode = "auto"  # RFC 9126 pushed authorization requests: auto | required | off
    issuer: str  # OP issuer URL, verbatim (compared exactly with `iss`); discovery lives below it
    client_id: str  # our client_id at the OP
    client_secret: Secret | None = None  # for client_secret_basic / client_secret_post
    private_key_file: Path | None = None  # absolute path of the PEM/JWK key for private_key_jwt
    private_key_kid: str | None = None  # `kid` header of the client assertion, if the OP needs it
    token_endpoint_auth_method: AuthMethod = "client_secret_basic"  # noqa: S105 - client auth at token endpoint
    scopes: tuple[str, ...] = DEFAULT_SCOPES  # scopes asked for at login; always holds "openid"
    id_token_algs: tuple[str, ...] = DEFAULT_ID_TOKEN_ALGS  # allowed ID token algs (never none/HS*)
    # extra authorization request params (e.g. prompt, acr_values); a read-only mapping
    extra_auth_params: Mapping[str, str] = field(default_factory=_empty_map, hash=False)
    refresh_skew: float = 60.0  # seconds: refresh the access token this long before it expires
    clock_skew: float = 60.0  # seconds of leeway for exp/iat/nbf checks
    http_timeout: float = 10.0  # seconds per HTTP call to the OP (discovery, token, JWKS, ...)
    jwks_refetch_interval: float = 10.0  # minimum seconds between JWKS refetches on an unknown kid
    post_logout_redirect: str = "/"  # same-origin path the browser lands on after logout
    revocation_endpoint: str | None = None  # RFC 7009 endpoint; wins over the OP's metadata
    logout_id_token_hint: bool = False  # send id_token_hint at RP-initiated logout (in a URL)
    dpop: bool = False  # DPoP-bound session tokens (RFC 9449): a key per session, a proof per call
    # how the OP names a route's `resource` on the refresh grant: RFC 8707 `resource` or `audience`
    resource_parameter: ResourceParameter = "resource"
    # ask at login for every user route's `resource` (RFC 8707; only with resource_parameter:
    # resource): an OP such as oidc-provider grants on the refresh grant only what login asked for
    login_resources: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class CookieSettings:
    """The session cookie (always HttpOnly, Path=/, no Domain)."""

    name: str = "__Host-bff"  # cookie name; `__Host-`/`__Secure-` names need secure: true
    same_site: SameSite = "strict"  # SameSite attribute; "none" is never allowed
    secure: bool = True  # Secure attribute; false only for a loopback http public_url (dev)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisTls:
    """TLS to Redis (a `rediss` scheme); the files are read at start-up."""

    ca_file: Path | None = None  # PEM CA bundle that signs the servers' certificates (else system)
    cert_file: Path | None = None  # PEM client certificate, for `tls-auth-clients yes` servers
    key_file: Path | None = None  # its PEM private key (set with cert_file)
    check_hostname: bool = True  # the server certificate must name the host bff connects to


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisSettings:
    """Credentials and TLS for a Redis store; where the nodes are is `store`'s URL."""

    username: str | None = None  # ACL user of the data nodes (or in the URL: redis://user:pw@...)
    password: Secret | None = None  # its password (or in the URL; not both)
    sentinel_username: str | None = None  # ACL user of the sentinels (redis+sentinel:// only)
    sentinel_password: Secret | None = None  # the sentinels' password (redis+sentinel:// only)
    tls: RedisTls = RedisTls()  # CA and client certificate for rediss://, rediss+sentinel://, ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSettings:
    """Where sessions live and how long."""

    # memory:// (one process) | redis://... | rediss://... | unix://... |
    # redis+sentinel://host:port,.../master[/db] | redis+cluster://host:port,...
    store: str = "memory://"
    store_timeout: float = 0.5  # seconds one store operation may take before it is a 503
    redis: RedisSettings = RedisSettings()  # credentials and TLS for a Redis store
    cookie: CookieSettings = CookieSettings()  # the session cookie
    idle_timeout: float = 8 * 3600.0  # seconds without a request before a session ends
    absolute_timeout: float = 24 * 3600.0  # seconds after login when a session ends regardless
    login_timeout: float = 600.0  # seconds a login transaction (state, nonce, PKCE) stays valid
    cache_ttl: float = 1.0  # seconds an instance may cache a session read (0..5; 0 = no cache)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """One proxied API route: requests under `path` go to `url`."""

    path: str  # prefix on the bff origin: starts with "/", no trailing "/", no "." or ".."
    url: str  # http(s)/ws(s) target, stored without a trailing "/"; the rest of the path follows
    token: TokenMode = "user"  # noqa: S105 - which bearer token is attached (user / client credentials / none)
    scopes: tuple[str, ...] = ()  # scopes the session must hold, else 403
    client_scopes: tuple[str, ...] = ()  # scopes asked for in the client-credentials grant
    methods: tuple[str, ...] | None = None  # allowed methods, upper-cased; None = any (else 405)
    timeout: float = 30.0  # seconds for the whole upstream exchange before a 504
    connect_timeout: float = 5.0  # seconds to connect to the upstream
    websocket: bool = False  # allow WebSocket upgrades on this route
    # headers added to every upstream request; a read-only mapping
    set_headers: Mapping[str, str] = field(default_factory=_empty_map, hash=False)
    remove_headers: tuple[str, ...] = ()  # request headers stripped before forwarding, lower-cased
    # RFC 8707 resource indicators (absolute URIs): a user route gets a token for them from the
    # session's refresh token; an exchange route asks for them in the token exchange
    resource: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()  # token: exchange only: RFC 8693 `audience` values
    exchange_scopes: tuple[str, ...] = ()  # token: exchange only: `scope` asked in the exchange


@dataclass(frozen=True, slots=True, kw_only=True)
class SecuritySettings:
    """Response headers bff adds."""

    content_security_policy: str = DEFAULT_CSP  # CSP header for the SPA's responses
    hsts: bool = True  # send Strict-Transport-Security (never sent on plain http)


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """One token bucket per client address: `burst` requests at once, then `per_second`."""

    per_second: float  # tokens a bucket regains per second: the sustained rate of one address
    burst: int  # bucket size: requests one address may make at once after a quiet spell


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitSettings:
    """Per-address limits on the endpoints anyone may call without a session (429 beyond)."""

    enabled: bool = True  # false: no limits at all
    login: RateLimit = RateLimit(per_second=5.0, burst=100)  # GET /bff/login
    callback: RateLimit = RateLimit(per_second=5.0, burst=100)  # GET /bff/callback
    # POST /bff/backchannel-logout: every call comes from the OP's few addresses
    backchannel_logout: RateLimit = RateLimit(per_second=50.0, burst=1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """Logging."""

    level: LogLevel = "info"  # minimum level logged
    format: LogFormat = "json"  # one JSON object per line, or human-readable text
    access: bool = True  # one access-log line per request (logger bff.access)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownSettings:
    """How `bff run` stops on SIGTERM (and how an old worker leaves on SIGHUP)."""

    drain: float = 5.0  # seconds: /readyz answers 503 while requests are still accepted
    grace: float = 25.0  # seconds: then in-flight requests may finish before they are cut


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSettings:
    """What the HTTP parser accepts before it answers 431 (bff/server.py: what each bounds)."""

    max_request_line: int = 8190  # bytes of the request-target (the URL) in the request line
    max_header_size: int = 8190  # bytes of one header field: name + value (Cookie included)
    max_headers: int = 100  # number of header fields in one request


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The whole validated configuration."""

    public_url: str  # origin the browser sees, e.g. https://app.example.com (no trailing "/")
    listen: Listen = Listen()  # where to bind
    static: Path = Path("static")  # the SPA folder (absolute once loaded from a file)
    prefix: str = "/bff"  # prefix of bff's own endpoints (login, callback, user, logout, ...)
    oidc: OidcSettings  # the default OpenID Provider (the first of `providers`)
    session: SessionSettings = SessionSettings()  # session store, cookie and lifetimes
    keys: tuple[Secret, ...]  # signing/encryption keys: the first signs, all verify (rotation)
    # Proxied routes, sorted longest path first whatever the given order, so that the first one
    # whose path prefixes a request path is the longest match (/api/orders beats /api).
    upstreams: tuple[Upstream, ...] = ()
    security: SecuritySettings = SecuritySettings()  # security response headers
    rate_limits: RateLimitSettings = RateLimitSettings()  # per-address limits, anonymous routes
    # Networks (CIDR, normalised) of the proxies in front of bff whose X-Forwarded-For /
    # Forwarded name the client; empty: every peer is the client itself (see bff/peers.py).
    trusted_proxies: tuple[str, ...] = ()
    log: LogSettings = LogSettings()  # logging
    metrics: MetricsSettings = MetricsSettings()  # where /metrics is served
    tracing: TracingSettings = TracingSettings()  # OpenTelemetry traces, off by default
    workers: int | None = None  # worker processes; None = one per core; `bff run --workers` wins
    limits: LimitSettings = LimitSettings()  # request size limits of the HTTP parser
    shutdown: ShutdownSettings = ShutdownSettings()  # drain and grace on SIGTERM
    # Every OpenID Provider, the default first; empty when built: `(oidc,)`.
    providers: tuple[OidcSettings, ...] = ()
    dev: bool = field(init=False)  # derived: public_url is http:// on a loopback host

    def __post_init__(self) -> None:
        object.__setattr__(self, "dev", is_dev_url(self.public_url))
        if len(self.providers) <= 1:  # also after dataclasses.replace(settings, oidc=...)
            object.__setattr__(self, "providers", (self.oidc,))
        elif self.providers[0] is not self.oidc:
            raise ValueError("oidc must be the first of providers (the default)")
        ordered = tuple(sorted(self.upstreams, key=lambda u: (-len(u.path), u.path)))
        object.__setattr__(self, "upstreams", ordered)

    @property
    def redirect_uri(self) -> str:
        """The OAuth redirect_uri registered at the OP: `<public_url><prefix>/callback`."""
        return f"{self.public_url}{self.prefix}/callback"

    def callback_path(self, provider: OidcSettings) -> str:
        """The callback path of a provider: `<prefix>/callback` for the default (first) one,
        `<prefix>/callback/<name>` for the others. A redirect URI of its own per provider is the
        mix-up defense (RFC 9207 section 1) that holds even for an OP that sends no `iss`."""
        base = f"{self.prefix}/callback"
        return base if provider is self.providers[0] else f"{base}/{provider.name}"

    def redirect_uri_for(self, provider: OidcSettings) -> str:
        """The redirect_uri to register at that provider: `public_url` + its callback path."""
        return self.public_url + self.callback_path(provider)


def is_loopback_host(host: str | None) -> bool:
    """True for `localhost`, `127.x.y.z` and `::1` (with or without brackets)."""
    if not host:
        return False
    h = host.lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def is_dev_url(url: str) -> bool:
    """Plain http on a loopback host: the only place where a non-Secure cookie is allowed."""
    try:
        parts = urlsplit(url)
        return parts.scheme == "http" and is_loopback_host(parts.hostname)
    except ValueError:
        return False


def dump_redacted(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready data for `bff check-config`, with every secret shown as REDACTED.

    Redacted: `keys`, `oidc.client_secret`, the password in `session.store`, and the values of
    every upstream's `set_headers` (they often carry API keys).
    """
    out = _dump(settings)
    assert isinstance(out, dict)
    out["session"]["store"] = _redact_url_password(settings.session.store)
    for up in out["upstreams"]:
        up["set_headers"] = dict.fromkeys(up["set_headers"], REDACTED)
    return out


def _dump(value: object) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _dump(v) for k, v in value.items()}
    return value


def _redact_url_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return REDACTED
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:{REDACTED}@{hostport}").geturl()
