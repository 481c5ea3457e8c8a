"""Token-bucket arithmetic, shared by ``MemoryStore`` and mirrored by ``RedisStore``'s Lua script.

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; each request takes one.
The stored state is ``b"<tokens> <stamp>"`` (seconds, six decimals). A bucket that would be full
again is the same as no bucket at all, so its TTL is the time until it is full: an idle address
costs the store nothing, and an unreadable state reads as a full bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Take", "decode", "encode", "take"]


@dataclass(frozen=True, slots=True)
class Take:
    allowed: bool
    retry_after: float  # seconds until the next token (0.0 when allowed)
    tokens: float  # tokens left after this request
    ttl: float  # seconds until the bucket is full again, i.e. as good as absent


def take(tokens: float | None, stamp: float, now: float, rate: float, burst: int) -> Take:
    """Refill a bucket last written at ``stamp`` up to ``now``, then take one token if there is one.

    ``tokens`` None is a bucket that does not exist (a full one). A clock that went backwards
    refills nothing rather than draining the bucket.
    """
    level = float(burst) if tokens is None else min(burst, tokens + max(0.0, now - stamp) * rate)
    allowed = level >= 1.0
    if allowed:
        level -= 1.0
    wait = 0.0 if allowed else (1.0 - level) / rate
    ttl = max(0.001, math.ceil((burst - level) / rate * 1000) / 1000)
    return Take(allowed=allowed, retry_after=wait, tokens=level, ttl=ttl)


def encode(tokens: float, stamp: float) -> bytes:
    return f"{tokens:.6f} {stamp:.6f}".encode()


def decode(raw: bytes | None) -> tuple[float | None, float]:
    """The stored ``(tokens, stamp)``; ``(None, 0.0)`` for an absent or unreadable state."""
    if raw is None:
        return None, 0.0
    try:
        tokens, stamp = (float(part) for part in raw.split(b" "))
    except ValueError:
        return None, 0.0
    if not (math.isfinite(tokens) and math.isfinite(stamp)) or tokens < 0 or stamp < 0:
        return None, 0.0
    return tokens, stamp
