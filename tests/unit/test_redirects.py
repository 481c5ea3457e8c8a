"""bff.redirects.is_local_path: invariant 6, no open redirect, as a table of spellings."""

from __future__ import annotations

import pytest

from bff.redirects import is_local_path

GOOD = [
    "/",
    "/app",
    "/app/orders/42",
    "/app?tab=1&x=%2F",
    "/app#section",
    "/app/%E2%9C%93",
    "/a:b",  # a colon after the first segment is not a scheme
    "/./app",
    "/" + "a" * 2000,
]

EVIL = [
    None,
    "",
    "app",  # relative to the current path, not the origin
    "//evil.example",
    "///evil.example",
    "////evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\\/evil.example",
    "/%5Cevil.example",
    "/%5cevil.example",
    "/%2F/evil.example",
    "/%2fevil.example/../",
    "https://evil.example",
    "http:/evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    " /app",
    "\t//evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\n/evil.example",
    "/%0a/evil.example",
    "/%09/evil.example",
    "/app\x00",
    "/app%00",
    "/app\x7f",
    "/" + "a" * 2048,
    "%2F%2Fevil.example",
]


@pytest.mark.parametrize("value", GOOD)
def test_a_plain_path_on_this_origin_is_local(value: str) -> None:
    assert is_local_path(value) is True


@pytest.mark.parametrize("value", EVIL)
def test_a_spelling_that_could_leave_the_origin_is_rejected(value: str | None) -> None:
    assert is_local_path(value) is False
