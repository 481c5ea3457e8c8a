"""Value checks shared by the sections: typed readers over the schema-checked data, URLs,
paths, scopes, durations. Each reader skips a value the schema already reported (`ctx.ok`) and
returns the default instead, so that one mistake gives one message.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from bff.config.problems import Context, Key, fmt_path, suggest
from bff.config.settings import DEFAULT_ID_TOKEN_ALGS
from bff.store.url import StoreUrlError, parse_store_url

MISSING: Final[Any] = object()
"""`Reader.get` default: tells "absent or already reported" from any real value."""

# Asymmetric JWS algorithms an ID token may be signed with (RFC 7518, RFC 8037, RFC 8812).
_KNOWN_ID_TOKEN_ALGS: Final = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "ES256K", "EdDSA", "Ed25519", "Ed448",
)  # fmt: skip

TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_SCOPE_RE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token (NQCHAR)
_PATH_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")  # RFC 3986 pchar, no %
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


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


class Reader:
    """Reads schema-checked data into typed values, reporting what the schema cannot check."""

    def __init__(self, ctx: Context, base: Path) -> None:
        self.ctx = ctx
        self.base = base  # relative file paths in the config resolve against this

    def get(self, data: Any, path: Key, key: str, default: Any = MISSING) -> Any:
        p = (*path, key)
        if not isinstance(data, dict) or key not in data or not self.ctx.ok(p):
            return default
        return data[key]

    def section(self, data: Any, key: str) -> dict[str, Any]:
        value = self.get(data, (), key, {})
        return value if isinstance(value, dict) else {}

    def duration(self, data: Any, path: Key, key: str, default: float) -> float:
        raw = self.get(data, path, key)
        if raw is MISSING:
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
        if not isinstance(raw, list):
            return default
        return tuple(v for v in raw if isinstance(v, str))

    def unique(self, path: Key, items: list[tuple[int, str]], what: str) -> None:
        seen: dict[str, int] = {}
        for i, item in items:
            if item in seen:
                self.ctx.report(
                    (*path, i), f"duplicate {what} (same as {fmt_path((*path, seen[item]))})"
                )
            else:
                seen[item] = i

    def local_path(self, raw: str) -> Path:
        return self.base / Path(raw)

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
                    f"unknown algorithm {shown}{suggest(alg, _KNOWN_ID_TOKEN_ALGS)}"
                    f" (known: {', '.join(_KNOWN_ID_TOKEN_ALGS)})",
                )
        self.unique((*p, "id_token_algs"), list(enumerate(algs)), "algorithm")
        return algs

    def header_value(self, path: Key, value: str) -> str:
        """An HTTP header value: no line breaks (header injection) nor control characters."""
        if self.ctx.ok(path) and any(
            (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value
        ):
            self.ctx.report(path, "must not contain line breaks or control characters")
        return value


def url_path_problem(value: str) -> str | None:
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


def under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, segment-wise (/api/x is under /api; /apix is not)."""
    return path == prefix or path.startswith(prefix + "/")


def store_problem(store: str) -> str | None:
    """Why `store` is not a session store URL bff can open (None if it is)."""
    try:
        parse_store_url(store)
    except StoreUrlError as exc:
        return str(exc)
    return None


def readable_file_problem(path: Path) -> str | None:
    """Why `path` cannot be read now (None if it can): better at startup than at first login."""
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


def fmt_seconds(seconds: float) -> str:
    """28800.0 -> "8h": durations in messages as the operator would write them."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
