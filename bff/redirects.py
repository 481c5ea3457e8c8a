"""Same-origin redirect targets (invariant 6: no open redirect).

A browser resolves ``//evil``, ``/\\evil`` and ``/%5Cevil``-after-decoding against *another*
host, and ``urlsplit`` happily calls ``//evil.com`` a path-less URL on evil.com, so we accept a
target only when it is plainly a path on our origin, in its raw form and once percent-decoded.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

__all__ = ["is_local_path"]

_MAX = 2048


def _plain_path(value: str) -> bool:
    if not value.startswith("/") or value.startswith("//"):
        return False
    # Browsers strip tabs and newlines from URLs, turning "/\t/evil" into "//evil"; C1
    # controls and spaces have no business in a redirect target either.
    if "\\" in value or any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F for c in value):
        return False
    parts = urlsplit(value)
    return not parts.scheme and not parts.netloc


def is_local_path(value: str | None) -> bool:
    """True for ``/path?query#frag`` on this origin; False for what a browser may take off-site."""
    if not value or len(value) > _MAX:
        return False
    return _plain_path(value) and _plain_path(unquote(value))
