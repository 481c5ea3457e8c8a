"""Structured JSON logs with redaction (invariant 9).

Every record passes :class:`RedactingFilter`: values under sensitive names (``authorization``,
``cookie``, ``set-cookie``, ``code``, ``state``, ``*_token``, ``client_secret``...) are masked,
anything shaped like a JWT is masked wherever it appears, and CR/LF are stripped so a hostile
value cannot forge a log line.

A cookie value is not JWT-shaped, so the filter also learns names from the config
(:func:`setup_logging`): the session and login cookie names (``name=value`` masked wherever it
appears, e.g. in a parser error that quotes a raw ``Cookie`` line) and the sensitive header names
(``Name: value`` and ``'Name', 'value'`` masked, e.g. an upstream's ``set_headers`` API key).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bff.config import Settings

__all__ = [
    "SENSITIVE_HEADERS",
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "configure",
    "redact",
    "setup_logging",
]

MASK = "**********"
_SENSITIVE = re.compile(
    r"(authorization|cookie|set-cookie|^code$|^state$|token|secret|password|assertion|verifier)",
    re.IGNORECASE,
)
_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[\w.~+/=-]+")
# Credentials inside free text: query strings and form bodies (`code=...`), JSON or repr'd dicts
# (`"refresh_token": "..."`), and header lines (`Cookie: ...`) that ended up in a message.
_NAMES = r"[\w-]*token|code|state|client_secret|password|assertion|code_verifier"
_PAIR = re.compile(rf"(?i)\b({_NAMES})=[^&\s;,'\"]+")
_QUOTED = re.compile(
    rf"(?i)([\"']({_NAMES}|authorization|cookie|set-cookie)[\"']\s*:\s*[\"'])[^\"']*"
)
_HEADER = re.compile(r"(?i)\b(authorization|cookie|set-cookie)\s*:\s*[^\r\n]*")
_FORMATTER = logging.Formatter()
#: Header names whose values are credentials whatever the config says.
SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(value: Any, key: str = "") -> Any:
    if key and _SENSITIVE.search(key):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    if not isinstance(value, str):
        value = str(value)  # a URL, an exception...: its text may carry credentials too
    value = _JWT.sub(MASK, value)
    value = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", value)
    value = _HEADER.sub(lambda m: f"{m.group(1)}: {MASK}", value)
    value = _PAIR.sub(lambda m: f"{m.group(1)}={MASK}", value)
    value = _QUOTED.sub(lambda m: f"{m.group(1)}{MASK}", value)
    return value.replace("\r", " ").replace("\n", " ")


class _Names:
    """Masks values by the configured cookie and header names, in any text (compiled once)."""

    def __init__(self, cookies: Iterable[str], headers: Iterable[str]) -> None:
        self.keys = frozenset(n.lower() for n in (*cookies, *headers))

        def alt(names: Iterable[str]) -> str:
            unique = sorted({re.escape(n) for n in names if n}, key=len, reverse=True)
            return "|".join(unique) or r"(?!)"

        c, h = alt(cookies), alt(headers)
        # `name=value` of a cookie, bounded like a cookie pair (also inside a repr'd bytes line).
        self._cookie = re.compile(rf"(?i)(?<![\w-])({c})=[^;,\s'\"\\&]*")
        # `Name: value` up to the end of its line (a raw header line quoted in an error).
        self._header = re.compile(rf"(?i)(?<![\w-])({h})\s*:\s*[^\r\n]*")
        # `'name', 'value'` / `"name": "value"`: a repr'd header tuple, a dict, JSON.
        # (A repr'd bytes inside a list repr adds a quote level: `"b'name'", "b'value'"`.)
        self._quoted = re.compile(
            rf"(?i)(b?['\"](?:{c}|{h})['\"]{{1,2}}\s*[,:]\s*['\"]?b?['\"])[^'\"]*"
        )

    def __call__(self, value: Any, key: str = "") -> Any:
        if key and key.lower() in self.keys:
            return MASK
        if isinstance(value, dict):
            return {k: self(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        if not isinstance(value, str):
            return value
        value = self._cookie.sub(lambda m: f"{m.group(1)}={MASK}", value)
        value = self._header.sub(lambda m: f"{m.group(1)}: {MASK}", value)
        return self._quoted.sub(lambda m: f"{m.group(1)}{MASK}", value)


class RedactingFilter(logging.Filter):
    """Redacts every record: :func:`redact`, then the configured cookie and header names."""

    def __init__(self, cookie_names: Iterable[str] = (), header_names: Iterable[str] = ()) -> None:
        super().__init__()
        self._names = _Names(cookie_names, (*SENSITIVE_HEADERS, *header_names))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.pop("trusted", False):
            # Built by bff.access from numbers and fixed-shape text: nothing to redact, and it
            # is one line per request, so it skips the regexes.
            return True
        names = self._names
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, names(redact(value, key), key))
        # Mask structured arguments by name first, then the whole formatted message, whatever
        # the types of msg and args were; the record then carries only the redacted text.
        if isinstance(record.args, Mapping):
            record.args = redact(dict(record.args))
        elif isinstance(record.args, tuple):
            record.args = tuple(
                redact(a) if isinstance(a, Mapping | list | tuple) else a for a in record.args
            )
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = names(redact(message)), None
        if record.exc_info and not record.exc_text:
            # Both formatters print exc_text when set, so a traceback is redacted in either.
            record.exc_text = names(redact(_FORMATTER.formatException(record.exc_info)))
        elif record.exc_text:
            record.exc_text = names(redact(record.exc_text))
        return True


class TextFormatter(logging.Formatter):
    """``log.format: text``: the message, then each structured field as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={_text_value(value)}"
            for key, value in vars(record).items()
            if key not in _STANDARD and key != "event"
        )
        return f"{line} {fields}" if fields else line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        out: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_text:
            out["exc"] = redact(record.exc_text)
        elif record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def setup_logging(
    level: str = "info",
    fmt: str = "json",
    *,
    cookie_names: Iterable[str] = (),
    header_names: Iterable[str] = (),
) -> None:
    """One stderr handler on the root logger; every record is redacted before it is formatted.

    ``cookie_names`` / ``header_names``: values under these names are secrets too (the session
    and login cookies; the headers an upstream gets from ``set_headers``), beyond the built-in
    names and token shapes.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(cookie_names, header_names))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither formatter prints the caller's file/line or the thread: not looking them up saves
    # a few microseconds on every record, the access line included (logging's documented knobs).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # Library warnings (redis' Retry, DeprecationWarnings...) become records of logger
    # py.warnings, formatted and redacted like every other line, instead of raw text on stderr.
    logging.captureWarnings(True)
    # aiohttp's access log would print full URLs (the callback's code and state): keep it off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def configure(settings: Settings) -> None:
    """:func:`setup_logging` as ``bff run`` needs it: level and format from ``log:``, and the
    secrets' names from the rest of the config (the session and login cookies, every upstream's
    ``set_headers``)."""
    from bff.cookies import session_cookie_names

    setup_logging(
        settings.log.level,
        settings.log.format,
        cookie_names=session_cookie_names(settings.session.cookie.name),
        header_names={name.lower() for up in settings.upstreams for name in up.set_headers},
    )
