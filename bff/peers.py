"""Who is on the other end of a request: the client address, after ``trusted_proxies``.

Rate limits and logs key on :func:`client_address`; nothing else may read ``X-Forwarded-For`` or
``Forwarded`` from a request.
"""

from __future__ import annotations

from aiohttp import web

__all__ = ["client_address"]


def client_address(request: web.Request) -> str:
    """The client's IP address as text (the TCP peer until ``trusted_proxies`` says otherwise)."""
    return request.remote or ""
