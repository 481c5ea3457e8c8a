"""bff.redirects: invariant 6 (no open redirect), a table of spellings; the way back to an app."""

from __future__ import annotations

import pytest

from bff.redirects import is_local_path, is_navigation, with_error

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


# -------------------------------------------------------------------------------------------------
# with_error: a failed login's way back to the app (issue 9, point 11)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, "/?bff_error=access_denied"),
        ("/", "/?bff_error=access_denied"),
        ("/orders", "/orders?bff_error=access_denied"),
        ("/orders?id=7&x=%2F", "/orders?id=7&x=%2F&bff_error=access_denied"),
        ("/orders?id=7#top", "/orders?id=7&bff_error=access_denied#top"),
        ("/a#frag?bff_error=x", "/a?bff_error=access_denied#frag?bff_error=x"),
        # an earlier failure does not ride along with the next one
        ("/?bff_error=rate_limited", "/?bff_error=access_denied"),
        ("/?a=1&bff%5Ferror=x&b=2", "/?a=1&b=2&bff_error=access_denied"),
        ("/%E2%9C%93", "/%E2%9C%93?bff_error=access_denied"),
    ],
)
def test_with_error_keeps_the_target_and_adds_the_code(target: str | None, expected: str) -> None:
    assert with_error(target, "access_denied") == expected


@pytest.mark.parametrize("target", [t for t in EVIL if t is not None])
def test_with_error_never_leaves_the_origin(target: str) -> None:
    result = with_error(target, "login_failed")
    assert result == "/?bff_error=login_failed"


def test_with_error_falls_back_to_the_root_when_the_result_would_be_too_long() -> None:
    assert with_error("/" + "a" * 2040, "access_denied") == "/?bff_error=access_denied"


@pytest.mark.parametrize(
    "code", ["", "Access_Denied", "a b", "a&b=c", "<script>", "x" * 65, "access_denied\n"]
)
def test_with_error_takes_only_a_fixed_code(code: str) -> None:
    with pytest.raises(ValueError):
        with_error("/", code)


# -------------------------------------------------------------------------------------------------
# is_navigation: a browser loading a page, not a script or an API client


@pytest.mark.parametrize(
    ("headers", "navigation"),
    [
        ({"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}, True),
        ({"Sec-Fetch-Mode": "navigate"}, True),
        ({"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}, False),
        ({"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Accept": "text/html"}, False),
        ({"Sec-Fetch-Mode": "no-cors", "Accept": "text/html"}, False),
        ({"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, True),  # no fetch metadata
        ({"Accept": "*/*"}, False),
        ({"Accept": "application/json"}, False),
        ({}, False),
    ],
)
def test_is_navigation(headers: dict[str, str], navigation: bool) -> None:
    assert is_navigation(headers) is navigation
