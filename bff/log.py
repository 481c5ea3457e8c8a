"""Structured JSON logs with redaction (invariant 9).

Every record passes :class:`RedactingFilter`: values under sensitive names (``authorization``,
``cookie``, ``set-cookie``, ``code``, ``state``, ``*_token``, ``client_secret``...) are masked,
anything shaped like a JWT is masked wherever it appears, and CR/LF are stripped so a hostile
value cannot forge a log line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["JsonFormatter", "RedactingFilter", "redact", "setup_logging"]

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


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, redact(value, key))
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
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            # Both formatters print exc_text when set, so a traceback is redacted in either.
            record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print full URLs (the callback's code and state): keep it off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
