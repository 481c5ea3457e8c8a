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
from typing import Any

__all__ = ["JsonFormatter", "RedactingFilter", "redact", "setup_logging"]

MASK = "**********"
_SENSITIVE = re.compile(
    r"(authorization|cookie|set-cookie|^code$|^state$|token|secret|password|assertion|verifier)",
    re.IGNORECASE,
)
_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[\w.~+/=-]+")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(value: Any, key: str = "") -> Any:
    if key and _SENSITIVE.search(key):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        value = _JWT.sub(MASK, value)
        value = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", value)
        return value.replace("\r", " ").replace("\n", " ")
    return value


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, redact(value, key))
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if record.args:
            record.args = (
                tuple(redact(a) for a in record.args)
                if isinstance(record.args, tuple)
                else record.args
            )
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
        if record.exc_info:
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
