"""bff.server's pure policy: which parsed requests the front door refuses, and with what.

The raw-socket proof against a real ``bff run`` is tests/integration/test_front_door.py; here each
rule of :func:`framing_problem` and :func:`refusal_for_error` is pinned one by one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, LineTooLong
from multidict import CIMultiDict, CIMultiDictProxy

from bff.proxy.headers import downstream_headers
from bff.server import (
    EXPECTATION_FAILED,
    INTERNAL,
    MALFORMED,
    METHOD_NOT_ALLOWED,
    TIMEOUT,
    TOO_LARGE,
    Refusal,
    framing_problem,
    refusal_for_error,
    stop_signals,
)

HOST = (b"Host", b"app.example")


def check(
    headers: tuple[tuple[bytes, bytes], ...] = (),
    *,
    version: HttpVersion = HttpVersion11,
    method: str = "GET",
    target: str = "/api/x?q=1",
) -> Refusal | None:
    return framing_problem(version, method, target, (HOST, *headers))


def test_fixed_bodies_are_the_documented_json() -> None:
    assert MALFORMED.body == b'{"error":"invalid_request","error_description":"malformed request"}'
    assert (MALFORMED.status, TOO_LARGE.status) == (400, 431)
    assert json.loads(TOO_LARGE.body)["error"] == "request_header_fields_too_large"
    assert (EXPECTATION_FAILED.status, INTERNAL.status, TIMEOUT.status) == (417, 500, 504)


@pytest.mark.parametrize(
    ("headers", "version", "method", "target"),
    [
        ((), HttpVersion11, "GET", "/"),
        ((), HttpVersion10, "GET", "/"),
        ((), HttpVersion11, "POST", "http://app.example/api?q=%20"),  # absolute-form (9112 3.2.2)
        ((), HttpVersion11, "GET", "HTTPS://app.example/"),
        (((b"Transfer-Encoding", b"chunked"),), HttpVersion11, "POST", "/"),
        (((b"transfer-encoding", b" CHUNKED\t"),), HttpVersion11, "POST", "/"),  # case-insensitive
        (((b"Content-Length", b"12"),), HttpVersion10, "POST", "/"),
        (((b"Expect", b"100-Continue"),), HttpVersion11, "POST", "/"),
        (((b"X-Name", "Müller".encode()),), HttpVersion11, "GET", "/"),  # UTF-8 obs-text passes
        (((b"Cookie", b"a=1; b=2"), (b"Cookie", b"c=3")), HttpVersion11, "GET", "/"),
        (((b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket")), HttpVersion11, "GET", "/"),
        (
            ((b"connection", b"keep-alive, upgrade"), (b"upgrade", b"websocket ")),
            HttpVersion11,
            "GET",
            "/",
        ),
        (((b"Upgrade", b"h2c"),), HttpVersion11, "GET", "/"),  # no Connection: upgrade, no switch
        (((b"Connection", b"upgrade"),), HttpVersion11, "GET", "/"),  # nothing to switch to
    ],
)
def test_well_formed_requests_pass(
    headers: tuple[tuple[bytes, bytes], ...], version: HttpVersion, method: str, target: str
) -> None:
    assert check(headers, version=version, method=method, target=target) is None


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        (HttpVersion(0, 9), "version"),
        (HttpVersion(2, 0), "version"),
        (HttpVersion(1, 2), "version"),
    ],
    ids=["rfc9112-3-http09", "rfc9112-3-http2", "rfc9112-3-http12"],
)
def test_only_http_1_0_and_1_1(version: HttpVersion, reason: str) -> None:
    refusal = check(version=version)
    assert refusal is not None and refusal.body == MALFORMED.body and refusal.reason == reason


@pytest.mark.parametrize(
    "target",
    ["*", "example.com:443", "api/x", "/a b", "/a\x01", "/a\x7f", "/é", "/a#frag", "", "ftp://x/"],
    ids=lambda t: f"rfc9112-3.2-{t!r}",
)
def test_targets_other_than_origin_or_absolute_form_are_refused(target: str) -> None:
    refusal = check(target=target)
    assert refusal is not None and refusal.status == 400 and refusal.reason == "target"


def test_connect_is_a_4xx_not_a_5xx() -> None:
    """bff is no forward proxy; and no client may produce a 5xx at will."""
    refusal = check(method="CONNECT", target="/")
    assert refusal is not None and refusal.status == 400 and refusal.reason == "connect"


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        (((b"Transfer-Encoding", b"chunked"),), HttpVersion10),
        (((b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")), HttpVersion11),
        (((b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")), HttpVersion11),
        (((b"Transfer-Encoding", b"gzip, chunked"),), HttpVersion11),
        (((b"Transfer-Encoding", b"chunked, chunked"),), HttpVersion11),
        (((b"Transfer-Encoding", b"identity"),), HttpVersion11),
        (((b"Transfer-Encoding", b""),), HttpVersion11),
    ],
    ids=[
        "rfc9112-6.1-te-in-http10",
        "rfc9112-6.1-te-with-cl",
        "rfc9112-6.1-te-twice",
        "rfc9112-6.1-gzip-chunked",
        "rfc9112-6.1-chunked-chunked",
        "rfc9112-6.1-identity",
        "rfc9112-6.1-empty",
    ],
)
def test_transfer_encoding_only_as_a_lone_chunked_in_http11(
    headers: tuple[tuple[bytes, bytes], ...], version: HttpVersion
) -> None:
    refusal = check(headers, version=version)
    assert refusal is not None and refusal.status == 400 and refusal.reason == "transfer_encoding"


@pytest.mark.parametrize(
    "headers",
    [
        ((b"Content-Length", b"5"), (b"Content-Length", b"5")),
        ((b"Content-Length", b"5, 5"),),
        ((b"Content-Length", b"+5"),),
        ((b"Content-Length", b""),),
        ((b"content-length", "\uff15".encode()),),  # a fullwidth 5 is not a DIGIT
    ],
    ids=["rfc9112-6.3-twice", "rfc9112-6.3-list", "rfc9112-6.3-plus", "empty", "unicode-digit"],
)
def test_content_length_is_one_run_of_digits(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    refusal = check(headers, method="POST")
    assert refusal is not None and refusal.status == 400


@pytest.mark.parametrize("name", [b"Cookie", b"Origin", b"X-Csrf", b"Expect", b"Sec-Fetch-Site"])
def test_header_bytes_that_are_not_utf8_are_refused(name: bytes) -> None:
    refusal = check(((name, b"ab\xff"),))
    assert refusal is not None and refusal.status == 400 and refusal.reason == "header_bytes"


@pytest.mark.parametrize(
    ("headers", "method"),
    [
        (((b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")), "GET"),
        (((b"Connection", b"keep-alive, UPGRADE"), (b"Upgrade", b"foo")), "POST"),
        (((b"Connection", b"upgrade"), (b"Upgrade", b"")), "GET"),
        (((b"Connection", b"upgrade"), (b"Upgrade", b"websocket, h2c")), "GET"),
        (((b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Upgrade", b"h2c")), "GET"),
        (((b"Connection", b"upgrade"), (b"Upgrade", b"websocket")), "POST"),
        (((b"Upgrade", b"websocket"),), "HEAD"),
    ],
    ids=[
        "rfc9110-7.8-h2c",
        "rfc9110-7.8-other-in-a-list",
        "rfc9110-7.8-empty",
        "rfc9110-7.8-websocket-and-more",
        "rfc9110-7.8-two-fields",
        "rfc6455-4.1-post",
        "rfc6455-4.1-head",
    ],
)
def test_the_only_upgrade_is_websocket_on_a_get(
    headers: tuple[tuple[bytes, bytes], ...], method: str
) -> None:
    refusal = check(headers, method=method)
    assert refusal is not None and refusal.status == 400 and refusal.reason == "upgrade"


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
def test_trace_and_track_are_405(method: str) -> None:
    """RFC 9110 9.3.8: no credentials in a TRACE, and bff would attach the bearer."""
    assert check(method=method) is METHOD_NOT_ALLOWED
    assert json.loads(METHOD_NOT_ALLOWED.body)["error"] == "method_not_allowed"
    assert METHOD_NOT_ALLOWED.status == 405


def test_an_expectation_other_than_100_continue_is_417() -> None:
    assert check(((b"Expect", b"200-ok"),)) is EXPECTATION_FAILED


@pytest.mark.parametrize(
    ("status", "exc", "expected"),
    [
        (400, LineTooLong(b"Cookie: x", 8190), TOO_LARGE),
        (400, BadHttpMessage("Too many headers received"), TOO_LARGE),
        (400, BadStatusLine("GET /"), MALFORMED),
        (400, InvalidHeader(b"X"), MALFORMED),
        (400, BadHttpMessage("Duplicate Content-Length"), MALFORMED),
        (500, RuntimeError("x"), INTERNAL),
        (500, None, INTERNAL),
        (504, None, TIMEOUT),
    ],
)
def test_aiohttp_errors_map_to_fixed_answers(
    status: int, exc: BaseException | None, expected: Refusal
) -> None:
    assert refusal_for_error(status, exc) is expected


@pytest.fixture
def saved_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


async def test_once_a_signal_stopped_serving_further_ones_are_ignored(saved_signals: None) -> None:
    """``bff run --workers N`` forwards SIGTERM to workers that may be past their graceful stop:
    it must not kill them (exit status 0 is the contract)."""
    with stop_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
        os.kill(os.getpid(), signal.SIGINT)  # a second one while stopping: absorbed
        await asyncio.sleep(0)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGTERM)  # would end this test process if it were not ignored


async def test_without_a_signal_the_handlers_are_given_back(saved_signals: None) -> None:
    with stop_signals() as stop:
        assert not stop.is_set()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_upstream_response_headers_that_are_not_utf8_are_dropped_not_emptied() -> None:
    """Point 3, the other direction: what the browser gets from an upstream's headers is the
    upstream's bytes or nothing (aiohttp's writer would turn ``\\xff\\xfe`` into an empty value)."""
    raw = ((b"X-Bad", b"\xff\xfe"), (b"X-Mixed", b"a\xffb"), (b"X-Name", "Müller".encode()))
    headers = CIMultiDictProxy(
        CIMultiDict((k.decode(), v.decode("utf-8", "surrogateescape")) for k, v in raw)
    )
    for private in (False, True):
        out = downstream_headers(SimpleNamespace(headers=headers), private=private)  # type: ignore[arg-type]
        names = [k for k in out if k.lower() != "cache-control"]
        assert names == ["X-Name"], out
        assert out["X-Name"].encode() == "Müller".encode()
