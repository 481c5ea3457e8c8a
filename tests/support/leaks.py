"""Finding a session cookie in bytes it must never reach (issue 9, points 1, 3 and 5).

An echo need not be the whole cookie: a parser error that quotes a header cut at 100 bytes, or a
page that shows part of a value, still leaks secret bits. So every spelling of the cookie counts,
and so does any :data:`ECHO_WINDOW`-character piece of it.
"""

from __future__ import annotations

import base64

__all__ = ["ECHO_WINDOW", "echoes", "secret_forms"]

ECHO_WINDOW = 12  # characters (72 bits of base64url): no accident matches that many


def secret_forms(cookie: str) -> dict[str, bytes]:
    """The signed cookie, its secret, its signature, base64 of it, and each window of it."""
    secret, _, signature = cookie.rpartition(".")
    forms = {
        "the signed cookie": cookie.encode(),
        "the cookie's secret": secret.encode(),
        "the cookie's signature": signature.encode(),
        "the cookie in base64": base64.b64encode(cookie.encode()),
    }
    for i in range(len(cookie) - ECHO_WINDOW + 1):
        piece = cookie[i : i + ECHO_WINDOW]
        if "." not in piece:
            forms[f"cookie[{i}:{i + ECHO_WINDOW}]"] = piece.encode()
    return forms


def echoes(data: bytes, forms: dict[str, bytes]) -> list[str]:
    """The names of the forms found in ``data``."""
    return [name for name, form in forms.items() if form in data]
