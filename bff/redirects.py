"""Same-origin redirect targets (invariant 6: no open redirect), and failed logins back to the app.

A browser resolves ``//evil``, ``/\\evil`` and ``/%5Cevil``-after-decoding against *another*
host, and ``urlsplit`` happily calls ``//evil.com`` a path-less URL on evil.com, so we accept a
target only when it is plainly a path on our origin, in its raw form and once percent-decoded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["ERROR_PARAM", "is_local_path", "is_navigation", "with_error"]

_MAX = 2048

ERROR_PARAM: Final = "bff_error"
"""The query parameter that tells the SPA why a login failed (a fixed code, never free text)."""

_CODE: Final = re.compile(r"[a-z_]{1,64}")


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


def is_navigation(headers: Mapping[str, str]) -> bool:
    """Whether a request is a browser loading a page, as opposed to a script or an API client.

    Fetch metadata decides when present (every current browser sends it): a top-level
    ``Sec-Fetch-Mode: navigate`` to a ``document``. Without it (older browsers) an ``Accept`` that
    names ``text/html`` counts, as browsers send for pages and API clients do not.
    """
    mode = headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate" and headers.get("Sec-Fetch-Dest", "document") == "document"
    return "text/html" in headers.get("Accept", "")


def with_error(target: str | None, code: str) -> str:
    """``target`` (a same-origin path, else ``/``) with ``bff_error=<code>`` in its query.

    ``code`` must be a fixed error code (``[a-z_]+``): it is written as it is. The rest of the
    target is kept byte for byte, minus any earlier ``bff_error`` (a retried login would
    otherwise carry the last failure along); the fragment stays last, where browsers want it.
    """
    if not _CODE.fullmatch(code):
        raise ValueError("not an error code")
    path = target if target is not None and is_local_path(target) else "/"
    parts = urlsplit(path)
    kept = [p for p in parts.query.split("&") if p and unquote(p.partition("=")[0]) != ERROR_PARAM]
    query = "&".join([*kept, f"{ERROR_PARAM}={code}"])
    result = urlunsplit(("", "", parts.path, query, parts.fragment))
    return result if is_local_path(result) else f"/?{ERROR_PARAM}={code}"
