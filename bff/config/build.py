"""The YAML configuration: loading, validation and the typed `Settings` it produces.

`load_settings(path)` reads one YAML file; `parse_settings(text)` does the same for a string. Both
return a frozen `Settings` or raise `ConfigError` listing *every* problem found, one per line, each
naming the file, the line and the key path::

    bff.yaml:12: upstreams[0].timeout: expected a duration like 30s, 5m, 8h, got 'soon'

The pipeline:

1. `${VAR}` / `${VAR:-default}` references are swapped for inert placeholder words before parsing
   (a bare `${X}` is not valid YAML inside a flow list such as `[${A}, ${B}]`), then restored.
2. `yaml.compose` (SafeLoader) gives nodes with line numbers; they are converted to plain Python
   values while a path -> line table is recorded, and every string scalar has its `${VAR}`
   references substituted from the environment. Values that came from the environment are never
   echoed in messages, nor are secrets (`keys`, `oidc.client_secret`, the store URL, header values).
3. Values from the environment are strings; where the schema wants an integer, number or boolean
   they are converted (so `port: ${PORT}` works).
4. jsonschema (Draft 2020-12) checks the structure; its error paths are mapped back to lines.
   Unknown keys are errors with a "did you mean" suggestion.
5. Python checks the semantics (URLs, paths, cross-field rules) and builds the dataclasses.

Top-level keys that start with `x-` are ignored: a place to park YAML anchors (`&defaults`) for
`<<: *defaults` merges, as in docker-compose.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import ipaddress
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import SplitResult, urlsplit

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from yaml.constructor import ConstructorError, SafeConstructor

from bff.redirects import is_local_path

__all__ = [
    "DEFAULT_CSP",
    "DEFAULT_ID_TOKEN_ALGS",
    "DEFAULT_SCOPES",
    "REDACTED",
    "ConfigError",
    "CookieSettings",
    "Listen",
    "LogSettings",
    "OidcSettings",
    "Secret",
    "SecuritySettings",
    "SessionSettings",
    "Settings",
    "Upstream",
    "dump_redacted",
    "is_loopback_host",
    "load_settings",
    "parse_duration",
    "parse_settings",
]

REDACTED: Final = "**********"
"""What a secret looks like wherever it is printed."""

MAX_CONFIG_BYTES: Final = 1024 * 1024
"""A config file larger than this is refused (also bounds reads from a FIFO or device)."""

_MAX_NODES: Final = 100_000  # after alias expansion: defeats "billion laughs" alias bombs
_MAX_DEPTH: Final = 64  # nesting depth; also stops recursive aliases (`&a [*a]`)

DEFAULT_SCOPES: Final = ("openid", "profile", "email", "offline_access")
DEFAULT_ID_TOKEN_ALGS: Final = ("RS256", "PS256", "ES256", "EdDSA")
DEFAULT_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)

# Asymmetric JWS algorithms an ID token may be signed with (RFC 7518, RFC 8037, RFC 8812).
_KNOWN_ID_TOKEN_ALGS: Final = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "ES256K", "EdDSA", "Ed25519", "Ed448",
)  # fmt: skip

# Authorization request parameters that bff sets itself; extra_auth_params must not override them.
_RESERVED_AUTH_PARAMS: Final = frozenset({
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
    "code_challenge", "code_challenge_method", "response_mode", "request", "request_uri",
})  # fmt: skip

# Request headers an upstream's set_headers must not touch: the token, the browser's cookie,
# routing and hop-by-hop headers are bff's business.
_FORBIDDEN_SET_HEADERS: Final = frozenset({
    "authorization", "cookie", "host", "connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length",
})  # fmt: skip

_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_SCOPE_RE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token (NQCHAR)
_PATH_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")  # RFC 3986 pchar, no %
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists every reason, one message each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems: list[str] = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


class Secret:
    """A string that never shows itself in `str()`, `repr()`, f-strings or logs; `.get()` gives it.

    Deliberately not a `str` subclass: concatenation, `json.dumps` or `%s` cannot leak it by
    accident. Equality is constant-time.
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


def parse_duration(value: str | int | float) -> float:
    """ "500ms", "30s", "5m", "8h", "1d", "1.5h", "30" or a number of seconds -> float seconds.

    Raises ValueError for anything else (negative, non-finite, unknown unit, bool).
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration like 30s, 5m, 8h, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a finite, non-negative duration, got {value!r}")
    return seconds


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


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

TokenMode: TypeAlias = Literal["user", "client", "user_or_none", "none"]
AuthMethod: TypeAlias = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]
SameSite: TypeAlias = Literal["strict", "lax"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error", "critical"]
LogFormat: TypeAlias = Literal["json", "text"]


def _empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    """Where the HTTP server binds."""

    host: str = "127.0.0.1"  # interface to bind; `bff run --host` overrides it
    port: int = 8080  # TCP port (0 = any free port); `bff run --port` overrides it


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcSettings:
    """The OpenID Provider and how bff authenticates to it as a confidential client."""

    issuer: str  # OP issuer URL, verbatim (compared exactly with `iss`); discovery lives below it
    client_id: str  # our client_id at the OP
    client_secret: Secret | None = None  # for client_secret_basic / client_secret_post
    private_key_file: Path | None = None  # absolute path of the PEM/JWK key for private_key_jwt
    private_key_kid: str | None = None  # `kid` header of the client assertion, if the OP needs it
    token_endpoint_auth_method: AuthMethod = "client_secret_basic"  # noqa: S105 - client auth at token endpoint
    scopes: tuple[str, ...] = DEFAULT_SCOPES  # scopes asked for at login; always holds "openid"
    id_token_algs: tuple[str, ...] = DEFAULT_ID_TOKEN_ALGS  # allowed ID token algs (never none/HS*)
    extra_auth_params: Mapping[str, str] = field(
        default_factory=_empty_map, hash=False
    )  # extra authorization request params (e.g. prompt, acr_values); read-only mapping
    refresh_skew: float = 60.0  # seconds: refresh the access token this long before it expires
    clock_skew: float = 60.0  # seconds of leeway for exp/iat/nbf checks
    http_timeout: float = 10.0  # seconds per HTTP call to the OP (discovery, token, JWKS, ...)
    jwks_refetch_interval: float = 10.0  # minimum seconds between JWKS refetches on an unknown kid
    post_logout_redirect: str = "/"  # same-origin path the browser lands on after logout
    logout_id_token_hint: bool = (
        False  # send id_token_hint on RP-initiated logout (puts it in a URL)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CookieSettings:
    """The session cookie (always HttpOnly, Path=/, no Domain)."""

    name: str = "__Host-bff"  # cookie name; `__Host-`/`__Secure-` names need secure: true
    same_site: SameSite = "strict"  # SameSite attribute; "none" is never allowed
    secure: bool = True  # Secure attribute; false only for a loopback http public_url (dev)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSettings:
    """Where sessions live and how long."""

    store: str = "memory://"  # memory:// (one process) | redis://... | rediss://... | unix://...
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
    set_headers: Mapping[str, str] = field(
        default_factory=_empty_map, hash=False
    )  # headers added to every upstream request; read-only mapping
    remove_headers: tuple[str, ...] = ()  # request headers stripped before forwarding, lower-cased


@dataclass(frozen=True, slots=True, kw_only=True)
class SecuritySettings:
    """Response headers bff adds."""

    content_security_policy: str = DEFAULT_CSP  # CSP header for the SPA's responses
    hsts: bool = True  # send Strict-Transport-Security (never sent on plain http)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """Logging."""

    level: LogLevel = "info"  # minimum level logged
    format: LogFormat = "json"  # one JSON object per line, or human-readable text


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The whole validated configuration."""

    public_url: str  # origin the browser sees, e.g. https://app.example.com (no trailing "/")
    listen: Listen = Listen()  # where to bind
    static: Path = Path("static")  # the SPA folder (absolute once loaded from a file)
    prefix: str = "/bff"  # prefix of bff's own endpoints (login, callback, user, logout, ...)
    oidc: OidcSettings  # the OpenID Provider
    session: SessionSettings = SessionSettings()  # session store, cookie and lifetimes
    keys: tuple[Secret, ...]  # signing/encryption keys: the first signs, all verify (rotation)
    # Sorted longest path first (done in __post_init__, whatever order they were given in), so the
    # first upstream whose path is a prefix of a request path is the longest matching prefix:
    # /api/orders/export wins over /api/orders, which wins over /api.
    upstreams: tuple[Upstream, ...] = ()  # proxied routes, longest path first
    security: SecuritySettings = SecuritySettings()  # security response headers
    log: LogSettings = LogSettings()  # logging
    dev: bool = field(init=False)  # derived: public_url is http:// on a loopback host

    def __post_init__(self) -> None:
        object.__setattr__(self, "dev", _is_dev_url(self.public_url))
        ordered = tuple(sorted(self.upstreams, key=lambda u: (-len(u.path), u.path)))
        object.__setattr__(self, "upstreams", ordered)

    @property
    def redirect_uri(self) -> str:
        """The OAuth redirect_uri registered at the OP: `<public_url><prefix>/callback`."""
        return f"{self.public_url}{self.prefix}/callback"


def _is_dev_url(url: str) -> bool:
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
        up["set_headers"] = {name: REDACTED for name in up["set_headers"]}
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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, validate and return the YAML config at `path`; relative paths in it (static,
    oidc.private_key_file) are resolved against the file's directory.

    `env` is where `${VAR}` references are looked up (default: `os.environ`).
    Raises ConfigError, and nothing else, for any problem with the file or its content.
    """
    source = str(path)
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory, not a config file"]) from None
    except PermissionError:
        raise ConfigError([f"{source}: permission denied"]) from None
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES} bytes; not a config file"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: not valid UTF-8 (byte {e.start})"]) from None
    return parse_settings(text, source, env, base_dir=p.absolute().parent)


def parse_settings(
    text: str,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    *,
    base_dir: str | Path | None = None,
) -> Settings:
    """Validate YAML `text` and return the Settings; `source` names it in messages.

    Relative paths resolve against `base_dir`: by default the directory of `source` when it
    names a file, else the current directory. Raises ConfigError, and nothing else.
    """
    if base_dir is None:
        base = Path.cwd() if source.startswith("<") else Path(source).absolute().parent
    else:
        base = Path(base_dir).absolute()
    ctx = _Ctx(source, os.environ if env is None else env)
    try:
        settings = _parse(ctx, text, base)
    except _Abort:
        settings = None
    except RecursionError:
        ctx.report((), "nested too deeply", line=0)
        settings = None
    if ctx.problems or settings is None:
        raise ConfigError(ctx.messages())
    return settings


# --------------------------------------------------------------------------------------------
# Internals: problem collection
# --------------------------------------------------------------------------------------------

Key: TypeAlias = tuple[str | int, ...]
_MISSING: Final[Any] = object()


class _Abort(Exception):
    """Stop here: what is reported so far is all that can be said."""


def _fmt_path(path: Key) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _is_sensitive(path: Key) -> bool:
    """Paths whose values are never echoed in messages."""
    if not path:
        return False
    if path[0] == "keys" or path[:2] in (("oidc", "client_secret"), ("session", "store")):
        return True
    return len(path) >= 4 and path[0] == "upstreams" and path[2] == "set_headers"


class _Ctx:
    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.lines: dict[Key, int] = {}  # path -> 1-based line (the key's line for mapping values)
        self.from_env: dict[Key, tuple[str, ...]] = {}  # path -> vars its value came from
        self.bad: set[Key] = set()  # paths whose values are already reported invalid
        self.muted: set[Key] = set()  # paths under which no further problem is reported
        self._problems: list[tuple[int, int, str]] = []

    @property
    def problems(self) -> list[tuple[int, int, str]]:
        return self._problems

    def line_of(self, path: Key) -> int:
        for i in range(len(path), -1, -1):
            if path[:i] in self.lines:
                return self.lines[path[:i]]
        return 0

    def report(
        self, path: Key, message: str, *, line: int | None = None, invalid: bool = False
    ) -> None:
        """Record a problem at `path`; `invalid` also marks its value unusable for later checks."""
        if invalid:
            self.bad.add(path)
        if any(path[:i] in self.muted for i in range(len(path) + 1)):
            return
        n = self.line_of(path) if line is None else line
        where = f"{self.source}:{n}" if n else self.source
        text = f"{where}: {_fmt_path(path)}: {message}" if path else f"{where}: {message}"
        self._problems.append((n, len(self._problems), text))

    def ok(self, path: Key) -> bool:
        """No invalid value at `path` or above it (so it can be read and cross-checked)."""
        return not any(path[:i] in self.bad for i in range(len(path) + 1))

    def messages(self) -> list[str]:
        return [text for _, _, text in sorted(self._problems)]

    def show(self, path: Key, value: object) -> str:
        """How a value is quoted in a message: never a secret nor a value from the environment."""
        if path in self.from_env:
            names = ", ".join(f"${{{n}}}" for n in self.from_env[path])
            return f"the value of {names} (not shown)"
        if _is_sensitive(path) and isinstance(value, str | int | float):
            return f"'{REDACTED}'"
        return _describe(value)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


# --------------------------------------------------------------------------------------------
# Internals: YAML -> plain values with lines, ${VAR} substitution
# --------------------------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_CONSTRUCTOR: Final = SafeConstructor()
# `$${` is an escaped literal `${`; `${...}` up to the first `}` on the same line is a reference.
_RAW_REF_RE: Final = re.compile(r"\$\$\{|\$\{[^{}\n]*\}")
_REF_RE: Final = re.compile(r"\$\$\{|\$\{([^}\n]*)\}|\$\{")


class _Placeholders:
    """Swap `${...}` for words that YAML parses as plain text anywhere (even in `[a, b]`)."""

    def __init__(self, text: str) -> None:
        nonce = secrets.token_hex(6)
        while nonce in text:  # pragma: no cover - 48 random bits
            nonce = secrets.token_hex(6)
        self._originals: list[str] = []
        self._word = re.compile(rf"Q{nonce}(\d+)Z")

        def swap(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return m.group(0)
            self._originals.append(m.group(0))
            return f"Q{nonce}{len(self._originals) - 1}Z"

        self.text = _RAW_REF_RE.sub(swap, text) if "${" in text else text

    def restore(self, value: str) -> str:
        if not self._originals:
            return value
        return self._word.sub(lambda m: self._originals[int(m.group(1))], value)


def _parse_yaml(ctx: _Ctx, text: str) -> tuple[yaml.Node | None, _Placeholders]:
    ph = _Placeholders(text)
    try:
        node = yaml.compose(ph.text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = "; ".join(s for s in (e.context, e.problem) if s)
        ctx.report((), f"invalid YAML: {ph.restore(what or 'syntax error')}", line=line)
        raise _Abort from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        ctx.report((), f"invalid YAML: character {e.character!r} is not allowed", line=line)
        raise _Abort from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error is one of the above
        ctx.report((), f"invalid YAML: {type(e).__name__}", line=0)
        raise _Abort from None
    return node, ph


class _Converter:
    def __init__(self, ctx: _Ctx, ph: _Placeholders) -> None:
        self.ctx = ctx
        self.ph = ph
        self.count = 0

    def convert(self, node: yaml.Node, path: Key, depth: int = 0) -> Any:
        self.count += 1
        if self.count > _MAX_NODES or depth > _MAX_DEPTH:
            what = "too many nodes" if self.count > _MAX_NODES else "nested too deeply"
            self.ctx.report(path[:1], f"{what} (an alias loop or alias bomb?)")
            raise _Abort
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                return self.bad_tag(node, path)
            out: list[Any] = []
            for i, item in enumerate(node.value):
                self.ctx.lines[(*path, i)] = item.start_mark.line + 1
                out.append(self.convert(item, (*path, i), depth + 1))
            return out
        if isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                return self.bad_tag(node, path)
            return self.mapping(node, path, depth)
        return self.bad_tag(node, path)  # pragma: no cover - compose yields only the three kinds

    def bad_tag(self, node: yaml.Node, path: Key) -> None:
        tag = node.tag.replace(_TAG, "!!", 1) if node.tag.startswith(_TAG) else node.tag
        self.ctx.report(path, f"unsupported YAML tag {tag}", invalid=True)
        self.ctx.muted.add(path)
        return None

    def mapping(self, node: yaml.MappingNode, path: Key, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        # `<<: *anchor` / `<<: [*a, *b]`: merged first, so that keys given here override them;
        # among merges the earlier one wins.
        for key_node, value_node in node.value:
            if key_node.tag != _TAG + "merge":
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    line = src.start_mark.line + 1
                    self.ctx.report(path, "'<<' merges only mappings", line=line)
                    continue
                for key, value in self.mapping(src, path, depth + 1).items():
                    out.setdefault(key, value)
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _TAG + "merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.ctx.report(path, "mapping keys must be plain strings", line=line)
                continue
            key = self.ph.restore(key_node.value)
            if key in first_line:
                self.ctx.report(
                    (*path, key),
                    f"duplicate key (first given on line {first_line[key]})",
                    line=line,
                )
                continue
            first_line[key] = line
            if key in out:  # overrides a merged key: forget what the merge recorded
                self.forget((*path, key))
            self.ctx.lines[(*path, key)] = line
            out[key] = self.convert(value_node, (*path, key), depth + 1)
        return out

    def forget(self, prefix: Key) -> None:
        n = len(prefix)
        for table in (self.ctx.lines, self.ctx.from_env):
            for k in [k for k in table if k[:n] == prefix]:
                del table[k]
        for marks in (self.ctx.bad, self.ctx.muted):
            marks.difference_update({k for k in marks if k[:n] == prefix})

    def scalar(self, node: yaml.ScalarNode, path: Key) -> Any:
        tag = node.tag
        value = self.ph.restore(node.value)
        if tag in (_TAG + "str", _TAG + "timestamp"):  # dates stay text: no key wants a date
            return self.substitute(value, path)
        if tag == _TAG + "null":
            return None
        if tag == _TAG + "bool":
            return _CONSTRUCTOR.bool_values.get(value.lower())
        if tag in (_TAG + "int", _TAG + "float"):
            try:
                if tag == _TAG + "int":
                    return _CONSTRUCTOR.construct_yaml_int(node)
                return _CONSTRUCTOR.construct_yaml_float(node)
            except (ValueError, ConstructorError):
                self.ctx.report(
                    path,
                    f"not a valid {tag.removeprefix(_TAG)}: {self.ctx.show(path, value)}",
                    invalid=True,
                )
                self.ctx.muted.add(path)
                return None
        return self.bad_tag(node, path)

    def substitute(self, value: str, path: Key) -> str:
        if "${" not in value:
            return value
        names: list[str] = []
        missing = False

        def repl(m: re.Match[str]) -> str:
            nonlocal missing
            if m.group(0) == "$${":
                return "${"
            body = m.group(1)
            if body is None:
                self.ctx.report(path, "unterminated ${ (write $${ for a literal ${)")
                missing = True
                return ""
            name, sep, default = body.partition(":-")
            if not _ENV_NAME_RE.fullmatch(name):
                self.ctx.report(path, f"invalid variable reference ${{{body}}}")
                missing = True
                return ""
            if "${" in default:
                self.ctx.report(path, f"${{{name}:-...}}: nested references are not supported")
                missing = True
                return ""
            names.append(name)
            got = self.ctx.env.get(name)
            if sep and not got:  # ${VAR:-default}: unset or empty -> default
                return default
            if got is None:
                self.ctx.report(
                    path,
                    f"environment variable {name} is not set"
                    f" (write ${{{name}:-default}} to give a default)",
                )
                missing = True
                return ""
            return got

        result = _REF_RE.sub(repl, value)
        if missing:
            self.ctx.bad.add(path)
            self.ctx.muted.add(path)  # nothing more to say about a value we could not build
        if names:
            self.ctx.from_env[path] = tuple(dict.fromkeys(names))
        return result


# --------------------------------------------------------------------------------------------
# Internals: schema
# --------------------------------------------------------------------------------------------

_DURATION: Final = {"$ref": "#/$defs/duration"}
_STR: Final = {"type": "string"}
_NONEMPTY: Final = {"type": "string", "minLength": 1}
_STR_LIST: Final = {"type": "array", "items": _NONEMPTY}
_BOOL: Final = {"type": "boolean"}
_STR_MAP: Final = {"type": "object", "additionalProperties": _STR}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "duration": {
            "x-expected": "a duration like 30s, 5m, 8h",
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
            ],
        },
    },
    **_obj(
        {
            "public_url": _NONEMPTY,
            "listen": _obj(
                {
                    "host": _NONEMPTY,
                    "port": {"type": "integer", "minimum": 0, "maximum": 65535},
                }
            ),
            "static": _NONEMPTY,
            "prefix": _NONEMPTY,
            "oidc": _obj(
                {
                    "issuer": _NONEMPTY,
                    "client_id": _NONEMPTY,
                    "client_secret": {"type": ["string", "null"], "minLength": 1},
                    "private_key_file": {"type": ["string", "null"], "minLength": 1},
                    "private_key_kid": {"type": ["string", "null"], "minLength": 1},
                    "token_endpoint_auth_method": {
                        "enum": ["client_secret_basic", "client_secret_post", "private_key_jwt"]
                    },
                    "scopes": {**_STR_LIST, "minItems": 1},
                    "id_token_algs": {**_STR_LIST, "minItems": 1},
                    "extra_auth_params": {
                        "type": "object",
                        "additionalProperties": {"type": ["string", "integer"]},
                    },
                    "refresh_skew": _DURATION,
                    "clock_skew": _DURATION,
                    "http_timeout": _DURATION,
                    "jwks_refetch_interval": _DURATION,
                    "post_logout_redirect": _NONEMPTY,
                    "logout_id_token_hint": _BOOL,
                },
                required=("issuer", "client_id"),
            ),
            "session": _obj(
                {
                    "store": _NONEMPTY,
                    "cookie": _obj(
                        {
                            "name": {
                                "type": "string",
                                "pattern": r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$",
                                "x-expected": "a cookie name (letters, digits, !#$%&'*+-.^_`|~)",
                            },
                            "same_site": {"enum": ["strict", "lax"]},
                            "secure": _BOOL,
                        }
                    ),
                    "idle_timeout": _DURATION,
                    "absolute_timeout": _DURATION,
                    "login_timeout": _DURATION,
                    "cache_ttl": _DURATION,
                }
            ),
            "keys": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "minLength": 32},
            },
            "upstreams": {
                "type": "array",
                "items": _obj(
                    {
                        "path": _NONEMPTY,
                        "url": _NONEMPTY,
                        "token": {"enum": ["user", "client", "user_or_none", "none"]},
                        "scopes": _STR_LIST,
                        "client_scopes": _STR_LIST,
                        "methods": {"type": ["array", "null"], "minItems": 1, "items": _NONEMPTY},
                        "timeout": _DURATION,
                        "connect_timeout": _DURATION,
                        "websocket": _BOOL,
                        "set_headers": _STR_MAP,
                        "remove_headers": _STR_LIST,
                    },
                    required=("path", "url"),
                ),
            },
            "security": _obj({"content_security_policy": _STR, "hsts": _BOOL}),
            "log": _obj(
                {
                    "level": {"enum": ["debug", "info", "warning", "error", "critical"]},
                    "format": {"enum": ["json", "text"]},
                }
            ),
        },
        required=("public_url", "oidc", "keys"),
    ),
    "patternProperties": {"^x-": {}},  # top-level extension keys (YAML anchors) are ignored
}

_VALIDATOR: Final = Draft202012Validator(SCHEMA)

_TYPE_NAMES: Final = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _subschema(path: Key) -> dict[str, Any] | None:
    schema: Any = SCHEMA
    for part in path:
        schema = _deref(schema)
        if isinstance(part, int):
            schema = schema.get("items")
        else:
            props = schema.get("properties", {})
            schema = props[part] if part in props else schema.get("additionalProperties")
        if not isinstance(schema, dict):
            return None
    return _deref(schema)


def _deref(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: dict[str, Any] = SCHEMA["$defs"][ref.removeprefix("#/$defs/")]
        return resolved
    return schema


def _schema_types(schema: dict[str, Any]) -> set[str]:
    types = schema.get("type")
    found = {types} if isinstance(types, str) else set(types or ())
    for branch in schema.get("anyOf", ()):
        found |= _schema_types(_deref(branch))
    return found


def _coerce_env_values(ctx: _Ctx, data: dict[str, Any]) -> None:
    """Values from `${VAR}` are strings; convert those where the schema wants something else."""
    for path in ctx.from_env:
        schema = _subschema(path)
        if schema is None:
            continue
        types = _schema_types(schema)
        if not types or "string" in types:
            continue
        parent: Any = data
        for part in path[:-1]:
            parent = parent[part]
        raw = parent[path[-1]]
        if not isinstance(raw, str):
            continue
        text = raw.strip()
        if "integer" in types and re.fullmatch(r"[+-]?\d+", text):
            parent[path[-1]] = int(text)
        elif "number" in types and re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
            parent[path[-1]] = float(text)
        elif "boolean" in types and text.lower() in ("true", "false", "yes", "no", "on", "off"):
            parent[path[-1]] = text.lower() in ("true", "yes", "on")


def _all_property_paths() -> dict[str, list[str]]:
    """Every known key name -> the dotted paths where it is valid (for "did you mean")."""
    found: dict[str, list[str]] = {}

    def walk(schema: dict[str, Any], prefix: str) -> None:
        schema = _deref(schema)
        for name, sub in schema.get("properties", {}).items():
            dotted = f"{prefix}.{name}" if prefix else name
            found.setdefault(name, []).append(dotted)
            walk(sub, dotted)
        items = schema.get("items")
        if isinstance(items, dict):
            walk(items, f"{prefix}[]")

    walk(SCHEMA, "")
    return found


_PROPERTY_PATHS: Final = _all_property_paths()


def _validate_schema(ctx: _Ctx, data: dict[str, Any]) -> None:
    for error in _VALIDATOR.iter_errors(data):
        _report_schema_error(ctx, error)


def _report_schema_error(ctx: _Ctx, error: ValidationError) -> None:
    path: Key = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator
    value = error.instance
    wanted: Any = error.validator_value
    if kind == "required":  # jsonschema yields this once per missing key, each listing all
        assert isinstance(value, dict)
        for name in wanted:
            missing = (*path, name)
            if name not in value and missing not in ctx.bad:
                ctx.report(missing, "required key is missing", line=ctx.line_of(path), invalid=True)
        return
    if kind == "additionalProperties":
        assert isinstance(value, dict)
        known = set(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        for name in value:
            if name in known or any(re.search(p, name) for p in patterns):
                continue
            hint = _suggest(name, known)
            if not hint and name in _PROPERTY_PATHS:
                hint = f"; did you mean {' or '.join(_PROPERTY_PATHS[name])}?"
            if not hint and not path:
                hint = " (top-level keys starting with 'x-' are ignored)"
            ctx.report((*path, name), f"unknown key{hint}")
        return
    shown = ctx.show(path, value)
    if "x-expected" in schema:
        message = f"expected {schema['x-expected']}, got {shown}"
    elif kind == "type":
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        message = f"expected {' or '.join(_TYPE_NAMES.get(n, n) for n in names)}, got {shown}"
    elif kind == "enum":
        options = ", ".join(repr(o) for o in wanted)
        hint = _suggest(str(value), [str(o) for o in wanted])
        if path[-2:] == ("cookie", "same_site") and str(value).lower() == "none":
            message = (
                "SameSite=None is never allowed (the cookie would go with cross-site requests)"
            )
        else:
            message = f"expected one of {options}, got {shown}{hint}"
    elif kind == "minLength":
        n = error.validator_value
        message = "must not be empty" if n == 1 else f"must be at least {n} characters"
    elif kind == "minItems":
        n = error.validator_value
        message = "must not be empty" if n == 1 else f"must have at least {n} items"
    elif kind in ("minimum", "maximum"):
        word = "at least" if kind == "minimum" else "at most"
        message = f"must be {word} {error.validator_value}, got {shown}"
    else:  # pragma: no cover - the schema uses no other keyword
        message = f"invalid value ({kind}), got {shown}"
    ctx.report(path, message, invalid=True)


# --------------------------------------------------------------------------------------------
# Internals: semantic checks and building
# --------------------------------------------------------------------------------------------


def _parse(ctx: _Ctx, text: str, base: Path) -> Settings | None:
    node, ph = _parse_yaml(ctx, text)
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null"):
        ctx.report((), "the config is empty; expected a mapping of settings", line=1)
        raise _Abort
    ctx.lines[()] = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode) or node.tag != _TAG + "map":
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        ctx.report((), f"expected a mapping of settings at the top level, got {kind}")
        raise _Abort
    data = _Converter(ctx, ph).convert(node, ())
    assert isinstance(data, dict)
    _coerce_env_values(ctx, data)
    _validate_schema(ctx, data)
    return _Builder(ctx, base).settings(data)


class _Builder:
    """Semantic checks + dataclasses. Reads only values the schema accepted (`ctx.ok`)."""

    def __init__(self, ctx: _Ctx, base: Path) -> None:
        self.ctx = ctx
        self.base = base

    # -- typed readers: the schema already checked types; these skip what it reported ----------

    def get(self, data: Any, path: Key, key: str, default: Any = _MISSING) -> Any:
        p = (*path, key)
        if not isinstance(data, dict) or key not in data or not self.ctx.ok(p):
            return default
        return data[key]

    def section(self, data: Any, key: str) -> dict[str, Any]:
        value = self.get(data, (), key, {}) if isinstance(data, dict) else {}
        return value if isinstance(value, dict) else {}

    def duration(self, data: Any, path: Key, key: str, default: float) -> float:
        raw = self.get(data, path, key)
        if raw is _MISSING:
            return default
        try:
            return parse_duration(raw)
        except ValueError:
            shown = self.ctx.show((*path, key), raw)
            self.ctx.report((*path, key), f"expected a finite duration, got {shown}")
            return default

    def positive(self, data: Any, path: Key, key: str, default: float) -> float:
        seconds = self.duration(data, path, key, default)
        if seconds <= 0 and self.ctx.ok((*path, key)):
            self.ctx.report((*path, key), "must be longer than 0s")
        return seconds

    def str_tuple(
        self, data: Any, path: Key, key: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        raw = self.get(data, path, key)
        if raw is _MISSING or not isinstance(raw, list):
            return default
        return tuple(v for v in raw if isinstance(v, str))

    def unique(self, path: Key, items: list[tuple[int, str]], what: str) -> None:
        seen: dict[str, int] = {}
        for i, item in items:
            if item in seen:
                self.ctx.report(
                    (*path, i), f"duplicate {what} (same as {_fmt_path((*path, seen[item]))})"
                )
            else:
                seen[item] = i

    def local_path(self, raw: str) -> Path:
        return self.base / Path(raw)

    # -- the sections ---------------------------------------------------------------------------

    def settings(self, data: dict[str, Any]) -> Settings | None:
        public_url = self.public_url(data)
        dev = _is_dev_url(public_url) if public_url else False
        listen_data = self.section(data, "listen")
        listen = Listen(
            host=self.get(listen_data, ("listen",), "host", "127.0.0.1"),
            port=int(self.get(listen_data, ("listen",), "port", 8080)),
        )
        static = self.local_path(self.get(data, (), "static", "static"))
        prefix = self.prefix(data)
        has_oidc = isinstance(data.get("oidc"), dict) and self.ctx.ok(("oidc",))
        oidc = self.oidc(self.section(data, "oidc")) if has_oidc else None
        session = self.session(self.section(data, "session"), dev, public_url is not None)
        keys = self.keys(data)
        upstreams = self.upstreams(data, prefix)
        sec = self.section(data, "security")
        security = SecuritySettings(
            content_security_policy=self.header_value(
                sec, ("security",), "content_security_policy", DEFAULT_CSP
            ),
            hsts=self.get(sec, ("security",), "hsts", True),
        )
        log_data = self.section(data, "log")
        log = LogSettings(
            level=self.get(log_data, ("log",), "level", "info"),
            format=self.get(log_data, ("log",), "format", "json"),
        )
        if self.ctx.problems or public_url is None or oidc is None or prefix is None:
            return None
        return Settings(
            public_url=public_url,
            listen=listen,
            static=static,
            prefix=prefix,
            oidc=oidc,
            session=session,
            keys=keys,
            upstreams=upstreams,
            security=security,
            log=log,
        )

    def public_url(self, data: dict[str, Any]) -> str | None:
        path: Key = ("public_url",)
        raw = self.get(data, (), "public_url")
        if raw is _MISSING:
            return None
        parts = self.url(path, raw, ("http", "https"), allow_path=False)
        if parts is None:
            return None
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        port = parts.port
        if port is not None and (parts.scheme, port) not in (("http", 80), ("https", 443)):
            netloc += f":{port}"
        return f"{parts.scheme}://{netloc}"

    def url(
        self, path: Key, raw: str, schemes: tuple[str, ...], *, allow_path: bool = True
    ) -> SplitResult | None:
        """Parse and check an absolute URL; report and return None when it is not acceptable."""
        shown = self.ctx.show(path, raw)
        want = ", ".join(f"{s}://" for s in schemes)
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
            self.ctx.report(
                path, f"must be a URL without spaces or control characters, got {shown}"
            )
            return None
        try:
            parts = urlsplit(raw)
            _ = parts.port  # raises ValueError for a bad port
        except ValueError:
            self.ctx.report(path, f"expected a URL ({want}), got {shown}")
            return None
        if parts.scheme not in schemes or not parts.hostname:
            self.ctx.report(path, f"expected a URL with a host ({want}), got {shown}")
            return None
        if parts.username is not None or parts.password is not None:
            self.ctx.report(path, "must not contain a user name or password")
            return None
        if "?" in raw or "#" in raw:
            self.ctx.report(path, f"must not have a query or fragment, got {shown}")
            return None
        if not allow_path and parts.path not in ("", "/"):
            self.ctx.report(
                path, f"must be an origin like https://app.example.com (no path), got {shown}"
            )
            return None
        return parts

    def prefix(self, data: dict[str, Any]) -> str | None:
        raw = self.get(data, (), "prefix", "/bff")
        problem = _url_path_problem(raw)
        if problem:
            self.ctx.report(("prefix",), f"{problem}, got {self.ctx.show(('prefix',), raw)}")
            return None
        return str(raw)

    def oidc(self, d: dict[str, Any]) -> OidcSettings | None:
        p: Key = ("oidc",)
        issuer = self.get(d, p, "issuer")
        if issuer is not _MISSING:
            parts = self.url((*p, "issuer"), issuer, ("http", "https"))
            if (
                parts is not None
                and parts.scheme == "http"
                and not is_loopback_host(parts.hostname)
            ):
                self.ctx.report(
                    (*p, "issuer"), "must be https:// (http:// only for a loopback OP in dev)"
                )
        client_id = self.get(d, p, "client_id", "")
        secret_raw = self.get(d, p, "client_secret", None)
        client_secret = Secret(secret_raw) if isinstance(secret_raw, str) else None
        key_raw = self.get(d, p, "private_key_file", None)
        key_file = self.local_path(key_raw) if isinstance(key_raw, str) else None
        if key_file is not None:
            problem = _readable_file_problem(key_file)
            if problem:
                kp = (*p, "private_key_file")
                shown = self.ctx.show(kp, key_raw) if kp in self.ctx.from_env else str(key_file)
                self.ctx.report(kp, f"{problem}: {shown}")
        # A value that is there but invalid counts as given: it has its own message already.
        has_secret = d.get("client_secret") is not None
        has_key = d.get("private_key_file") is not None
        method = self.get(d, p, "token_endpoint_auth_method", None)
        if method is None and self.ctx.ok((*p, "token_endpoint_auth_method")):
            method = "client_secret_basic" if has_secret else "private_key_jwt"
            if not has_secret and not has_key:
                self.ctx.report(
                    p,
                    "no client authentication: set client_secret (client_secret_basic) or "
                    "private_key_file (private_key_jwt)",
                )
        elif method in ("client_secret_basic", "client_secret_post"):
            if not has_secret:
                self.ctx.report(
                    (*p, "token_endpoint_auth_method"), f"{method} needs oidc.client_secret"
                )
        elif method == "private_key_jwt" and not has_key:
            self.ctx.report(
                (*p, "token_endpoint_auth_method"), "private_key_jwt needs oidc.private_key_file"
            )
        scopes = self.scopes(d, p, "scopes", DEFAULT_SCOPES)
        if "openid" not in scopes and self.ctx.ok((*p, "scopes")):
            self.ctx.report((*p, "scopes"), "must contain 'openid'")
        algs = self.id_token_algs(d, p)
        extra: dict[str, str] = {}
        raw_extra = self.get(d, p, "extra_auth_params", {})
        for name, value in raw_extra.items():
            if name in _RESERVED_AUTH_PARAMS:
                self.ctx.report(
                    (*p, "extra_auth_params", name), "is set by bff itself and cannot be overridden"
                )
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
        return OidcSettings(
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
        )

    def scopes(self, d: Any, p: Key, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        scopes = self.str_tuple(d, p, key, default)
        if scopes is default:
            return scopes
        for i, scope in enumerate(scopes):
            if not _SCOPE_RE.fullmatch(scope):
                self.ctx.report(
                    (*p, key, i),
                    "not a valid scope (no spaces, quotes or backslashes): "
                    + self.ctx.show((*p, key, i), scope),
                )
        self.unique((*p, key), list(enumerate(scopes)), "scope")
        return scopes

    def id_token_algs(self, d: dict[str, Any], p: Key) -> tuple[str, ...]:
        algs = self.str_tuple(d, p, "id_token_algs", DEFAULT_ID_TOKEN_ALGS)
        for i, alg in enumerate(algs):
            path = (*p, "id_token_algs", i)
            shown = self.ctx.show(path, alg)
            if alg.lower() == "none":
                self.ctx.report(path, "'none' is never allowed (unsigned ID tokens)")
            elif alg.upper().startswith("HS"):
                self.ctx.report(
                    path,
                    f"{shown} is not allowed: HMAC algorithms are keyed with the client secret or "
                    "could be forged with the OP's public key; use an asymmetric algorithm",
                )
            elif alg not in _KNOWN_ID_TOKEN_ALGS:
                self.ctx.report(
                    path,
                    f"unknown algorithm {shown}{_suggest(alg, _KNOWN_ID_TOKEN_ALGS)}"
                    f" (known: {', '.join(_KNOWN_ID_TOKEN_ALGS)})",
                )
        self.unique((*p, "id_token_algs"), list(enumerate(algs)), "algorithm")
        return algs

    def session(self, d: dict[str, Any], dev: bool, url_ok: bool) -> SessionSettings:
        p: Key = ("session",)
        store = self.get(d, p, "store", "memory://")
        problem = _store_problem(store)
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
        if (
            idle > absolute
            and self.ctx.ok((*p, "idle_timeout"))
            and self.ctx.ok((*p, "absolute_timeout"))
        ):
            where = (*p, "idle_timeout") if "idle_timeout" in d else (*p, "absolute_timeout")
            if {(*p, "idle_timeout"), (*p, "absolute_timeout")} & self.ctx.from_env.keys():
                numbers = ("", "")
            else:
                numbers = (f" ({_fmt_seconds(idle)})", f" ({_fmt_seconds(absolute)})")
            self.ctx.report(
                where,
                f"idle_timeout{numbers[0]} must not exceed absolute_timeout{numbers[1]}",
            )
        cache_ttl = self.duration(d, p, "cache_ttl", 1.0)
        if cache_ttl > 5 and self.ctx.ok((*p, "cache_ttl")):
            cp_ = (*p, "cache_ttl")
            shown = self.ctx.show(cp_, d["cache_ttl"])
            self.ctx.report(cp_, f"must be between 0s and 5s, got {shown}")
        return SessionSettings(
            store=store,
            cookie=cookie,
            idle_timeout=idle,
            absolute_timeout=absolute,
            login_timeout=self.positive(d, p, "login_timeout", 600.0),
            cache_ttl=cache_ttl,
        )

    def keys(self, data: dict[str, Any]) -> tuple[Secret, ...]:
        raw = self.get(data, (), "keys", [])
        keys = [
            (i, k) for i, k in enumerate(raw) if isinstance(k, str) and self.ctx.ok(("keys", i))
        ]
        self.unique(("keys",), keys, "key")
        return tuple(Secret(k) for _, k in keys)

    def upstreams(self, data: dict[str, Any], prefix: str | None) -> tuple[Upstream, ...]:
        raw = self.get(data, (), "upstreams", [])
        out: list[Upstream] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw):
            if isinstance(item, dict) and self.ctx.ok(("upstreams", i)):
                up = self.upstream(item, ("upstreams", i), prefix)
                if up.path and up.path in seen and self.ctx.ok(("upstreams", i, "path")):
                    self.ctx.report(
                        ("upstreams", i, "path"),
                        f"duplicate path (same as upstreams[{seen[up.path]}].path)",
                    )
                seen.setdefault(up.path, i)
                out.append(up)
        return tuple(out)

    def upstream(self, d: dict[str, Any], p: Key, prefix: str | None) -> Upstream:
        path = self.get(d, p, "path", "")
        if path:
            problem = _url_path_problem(path)
            if problem:
                self.ctx.report((*p, "path"), f"{problem}, got {self.ctx.show((*p, 'path'), path)}")
            elif prefix and (_under(path, prefix) or _under(prefix, path)):
                self.ctx.report(
                    (*p, "path"),
                    f"overlaps the bff endpoint prefix {prefix!r} (prefix setting); "
                    "choose another path",
                )
        url = self.get(d, p, "url", "")
        if url:
            parts = self.url((*p, "url"), url, ("http", "https", "ws", "wss"))
            if parts is not None:
                url = url.rstrip("/")
        attach = self.get(d, p, "token", "user")
        client_scopes = self.scopes(d, p, "client_scopes", ())
        if client_scopes and attach != "client" and self.ctx.ok((*p, "token")):
            self.ctx.report((*p, "client_scopes"), "only used with token: client")
        methods: tuple[str, ...] | None = None
        raw_methods = self.get(d, p, "methods", None)
        if isinstance(raw_methods, list):
            methods = tuple(m.upper() for m in raw_methods if isinstance(m, str))
            for i, m in enumerate(methods):
                if not _TOKEN_RE.fullmatch(m):
                    shown = self.ctx.show((*p, "methods", i), m)
                    self.ctx.report((*p, "methods", i), f"not an HTTP method: {shown}")
            self.unique((*p, "methods"), list(enumerate(methods)), "method")
        set_headers: dict[str, str] = {}
        for name, value in self.get(d, p, "set_headers", {}).items():
            hp = (*p, "set_headers", name)
            if not _TOKEN_RE.fullmatch(name):
                self.ctx.report(hp, "not a valid header name")
            elif name.lower() in _FORBIDDEN_SET_HEADERS:
                self.ctx.report(hp, f"{name} is managed by bff and cannot be set")
            elif name.lower() in {n.lower() for n in set_headers}:
                self.ctx.report(hp, "set twice (header names are case-insensitive)")
            elif isinstance(value, str):
                set_headers[name] = self.header_value({name: value}, hp[:-1], name, "")
        remove = tuple(h.lower() for h in self.str_tuple(d, p, "remove_headers", ()))
        for i, h in enumerate(remove):
            if not _TOKEN_RE.fullmatch(h):
                shown = self.ctx.show((*p, "remove_headers", i), h)
                self.ctx.report((*p, "remove_headers", i), f"not a valid header name: {shown}")
        return Upstream(
            path=path,
            url=url,
            token=attach,
            scopes=self.scopes(d, p, "scopes", ()),
            client_scopes=client_scopes,
            methods=methods,
            timeout=self.positive(d, p, "timeout", 30.0),
            connect_timeout=self.positive(d, p, "connect_timeout", 5.0),
            websocket=self.get(d, p, "websocket", False),
            set_headers=MappingProxyType(set_headers),
            remove_headers=remove,
        )

    def header_value(self, d: dict[str, Any], p: Key, key: str, default: str) -> str:
        value = self.get(d, p, key, default)
        if isinstance(value, str) and any(
            (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value
        ):
            self.ctx.report((*p, key), "must not contain line breaks or control characters")
        return str(value)


def _url_path_problem(value: str) -> str | None:
    """Why `value` is not a clean absolute URL path prefix like /api/orders (None if it is)."""
    if not value.startswith("/"):
        return "must start with '/'"
    if value == "/":
        return "must not be '/' alone (that would take over every path)"
    if value.endswith("/"):
        return "must not end with '/'"
    segments = value[1:].split("/")
    if any(s in (".", "..") for s in segments):
        return "must not contain '.' or '..' segments"
    if any(s == "" for s in segments):
        return "must not contain '//'"
    if not all(_PATH_SEGMENT_RE.fullmatch(s) for s in segments):
        return "may only contain letters, digits and -._~!$&'()*+,;=:@ between slashes (no %, ?, #)"
    return None


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _store_problem(store: str) -> str | None:
    if store == "memory://":
        return None
    try:
        parts = urlsplit(store)
        _ = parts.port
    except ValueError:
        return "not a valid store URL (memory://, redis://host:port/db, rediss://..., unix:///path)"
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        return None
    if parts.scheme == "unix" and parts.path:
        return None
    return "expected memory://, redis://host:port/db, rediss://host:port/db or unix:///path"


def _readable_file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return "no such file"
        if not path.is_file():
            return "not a regular file"
        with path.open("rb"):
            return None
    except PermissionError:
        return "not readable (permission denied)"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"


def _fmt_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
