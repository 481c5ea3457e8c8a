"""The front door (issue 9, points 1, 2, 3 and 5), tried with raw bytes against a real ``bff run``.

Every hostile request goes through a plain socket (no HTTP client that would normalise it) to one
``bff run`` process with a live session, small ``limits:`` and ``log.level: debug``. Each must get
its fixed JSON answer with ``Connection: close``, no ``Server`` header and none of its own bytes
(a unique marker travels in every request), the server must close the connection, a request
pipelined behind it must never be answered, and the upstream must see nothing. The last test reads
everything the process logged and finds none of the secrets the requests carried.

RFC 9112 sections cited in the case ids: 2.2 (message parsing: bare CR), 3 (request line),
3.2 (request target), 5 (field syntax), 5.2 (obs-fold), 6.1 (Transfer-Encoding), 6.3 (message
body length), 11.2 (request smuggling).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bff.config import LimitSettings
from bff.server import (
    BODY_TOO_LARGE,
    EXPECTATION_FAILED,
    INTERNAL,
    MALFORMED,
    METHOD_NOT_ALLOWED,
    TOO_LARGE,
    FrontDoorRunner,
    Refusal,
)
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    read_session,
    write_config,
)
from tests.support.procfs import children, tcp_sockets
from tests.support.procs import HOST, OidcProvider, RedisServer

LIMITS = {"max_request_line": 1024, "max_header_size": 2048, "max_headers": 30}
# Unique per run: if any of these shows up in a response or a log line, it was echoed or leaked.
MARK = "MARK" + secrets.token_hex(8)
AUTH = "Bearer authz" + secrets.token_urlsafe(24)
TX_COOKIE = "tx" + secrets.token_urlsafe(24)  # under the login cookie's name
CODE = "code" + secrets.token_urlsafe(16)


@dataclass
class Reply:
    raw: bytes
    closed: bool  # the server closed the connection (EOF or reset) before the deadline

    @property
    def head(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[0]

    @property
    def status(self) -> int:
        return int(self.raw.split(b" ", 2)[1])

    @property
    def headers(self) -> dict[str, str]:
        lines = self.head.split(b"\r\n")[1:]
        return {
            k.strip().lower(): v.strip()
            for k, _, v in (line.decode().partition(":") for line in lines)
        }

    @property
    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]


def exchange(port: int, data: bytes, timeout: float = 20.0) -> Reply:
    """Send ``data`` as is, then read until the server closes (or ``timeout`` passes)."""
    chunks: list[bytes] = []
    closed = False
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    return Reply(b"".join(chunks), closed)


def assert_refused(reply: Reply, refusal: Refusal) -> None:
    assert reply.raw, "no answer at all"
    assert reply.status == refusal.status, reply.raw[:200]
    assert reply.body == refusal.body
    assert MARK.encode() not in reply.raw, "a request byte was echoed"
    headers = reply.headers
    assert "server" not in headers
    assert headers.get("connection") == "close"
    assert headers.get("cache-control") == "no-store"
    assert headers.get("content-type", "").startswith("application/json")
    assert reply.raw.count(b"HTTP/1.") == 1, "a pipelined request was answered"
    assert reply.closed, "the server left the connection open"


# -------------------------------------------------------------------------------------------------
# One bff with a live session


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture(scope="module")
def keys() -> list[str]:
    return [secrets.token_urlsafe(32)]


@pytest.fixture(scope="module")
def bff(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    keys: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BffProcess]:
    workdir = tmp_path_factory.mktemp("front-door")
    proc = BffProcess(workdir / "bff.yaml")
    client: dict[str, Any] = asyncio.run(oidc_op.register_client([f"{proc.url}/bff/callback"]))
    config = base_config(
        public_url=proc.url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=keys,
        static=workdir,
        upstreams=[
            {"path": "/api/echo", "url": upstream.url, "token": "user"},
            # A route that lists TRACE and TRACK: the front door refuses them all the same.
            {
                "path": "/api/traced",
                "url": upstream.url,
                "token": "user",
                "methods": ["GET", "TRACE", "TRACK"],
            },
        ],
    )
    config["log"] = {"level": "debug", "format": "json"}
    config["limits"] = LIMITS
    write_config(workdir, config)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def cookie(bff: BffProcess) -> str:
    return asyncio.run(login(bff.url, "frontdoor"))


def api_request(cookie: str, path: str = "/api/echo/ok", extra: bytes = b"") -> bytes:
    """A well-formed API call with the session: what every smuggled request tries to be."""
    return (
        (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nX-CSRF: 1\r\n"
            f"Cookie: {COOKIE_NAME}={cookie}; {COOKIE_NAME}-tx={TX_COOKIE}\r\n"
            f"Authorization: {AUTH}\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


def test_a_well_formed_request_reaches_the_upstream_byte_exact(
    bff: BffProcess, cookie: str, upstream: EchoUpstream
) -> None:
    """The control for every "the upstream saw nothing" below, and point 3: a UTF-8 value that
    is not ASCII (obs-text) goes upstream byte for byte."""
    upstream.clear()
    value = "Müller-".encode() + MARK.encode()
    reply = exchange(
        bff.port, api_request(cookie, extra=b"X-Name: " + value + b"\r\nConnection: close\r\n")
    )
    assert reply.status == 200, reply.raw[:300]
    assert "server" not in reply.headers
    seen = upstream.seen()
    assert [s.path for s in seen] == ["/ok"]
    assert (b"X-Name", value) in seen[0].raw_headers


@pytest.mark.parametrize(
    ("path", "status"),
    [("/", 200), ("/healthz", 200), ("/api/echo/x", 401), ("/bff/nothing", 404), ("/x.js", 404)],
)
def test_no_answer_of_the_app_carries_a_server_banner(
    bff: BffProcess, path: str, status: int
) -> None:
    """Point 1's "no server-version banner" for the app's own answers, not only the refusals."""
    raw = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nX-CSRF: 1\r\nConnection: close\r\n\r\n"
    reply = exchange(bff.port, raw.encode())
    assert reply.status == status, reply.raw[:300]
    assert "server" not in reply.headers
    assert b"aiohttp" not in reply.raw and b"Python/" not in reply.raw


# -------------------------------------------------------------------------------------------------
# Point 2: framing. Each case is sent with a well-formed API request pipelined behind it.
# "gate": llhttp lets it through and bff.server.framing_problem refuses it; the rest llhttp refuses.

H = f"Host: {HOST}\r\nX-Marker: {MARK}\r\n"
FRAMING: dict[str, tuple[str, Refusal]] = {
    # RFC 9112 section 3: method SP request-target SP HTTP-version, HTTP/1.x only
    # gate
    "rfc9112-3-http09-no-version": (f"GET /api/echo/{MARK}\r\n\r\n", MALFORMED),
    "rfc9112-3-empty-version": (f"GET /api/echo/{MARK} \r\n{H}\r\n", MALFORMED),
    # gate
    "rfc9112-3-http2-version": (f"GET /api/echo/{MARK} HTTP/2.0\r\n{H}\r\n", MALFORMED),
    "rfc9112-3-http12-version": (f"GET /api/echo/{MARK} HTTP/1.2\r\n{H}\r\n", MALFORMED),
    "rfc9112-3-tab-separator": (f"GET\t/api/echo/{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    "rfc9112-3-lowercase-method": (f"get /api/echo/{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    # RFC 9112 section 3.2: request target
    "rfc9112-3.2-ctl-in-target": (f"GET /api/echo/\x01{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    "rfc9112-3.2-del-in-target": (f"GET /api/echo/\x7f{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    "rfc9112-3.2-nul-in-target": (f"GET /api/echo/\x00{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    "rfc9112-3.2-cr-in-target": (f"GET /api/echo/\r{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    "rfc9112-3.2-lf-in-target": (f"GET /api/echo/\n{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    # gate
    "rfc9112-3.2-fragment-in-target": (f"GET /api/echo/x#{MARK} HTTP/1.1\r\n{H}\r\n", MALFORMED),
    # gate
    "rfc9112-3.2-asterisk-form": (f"OPTIONS * HTTP/1.1\r\n{H}\r\n", MALFORMED),
    # gate
    "rfc9112-3.2.3-connect": (f"CONNECT {MARK}.example:443 HTTP/1.1\r\n{H}\r\n", MALFORMED),
    # RFC 9112 section 5: field syntax (RFC 9112 5.1: no whitespace before the colon)
    "rfc9112-5.1-space-before-colon": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A{MARK} : b\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-5-space-in-name": (f"GET /api/echo/a HTTP/1.1\r\n{H}X A: {MARK}\r\n\r\n", MALFORMED),
    "rfc9112-5-nul-in-value": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A: \x00{MARK}\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-5-ctl-in-value": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A: \x1b{MARK}\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-2.2-bare-cr-in-value": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A: a\r{MARK}\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-2.2-bare-lf-line": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A: a\nX-B: {MARK}\r\n\r\n",
        MALFORMED,
    ),
    # RFC 9112 section 5.2: obs-fold
    "rfc9112-5.2-obs-fold-space": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A: a\r\n {MARK}\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-5.2-obs-fold-tab": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}X-A: a\r\n\t{MARK}\r\n\r\n",
        MALFORMED,
    ),
    # RFC 9112 section 6.1: Transfer-Encoding
    # gate
    "rfc9112-6.1-te-in-http10": (
        f"POST /api/echo/a HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc9112-6.1-te-gzip-chunked": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-6.1-te-chunked-chunked": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-6.1-te-twice": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-6.1-te-identity": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: identity\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-6.1-te-gzip": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: gzip\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc9112-6.1-te-empty": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: \r\n\r\n",
        MALFORMED,
    ),
    # RFC 9112 section 6.3: Content-Length
    "rfc9112-6.3-cl-twice-same": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        MALFORMED,
    ),
    "rfc9112-6.3-cl-list-same": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Content-Length: 5, 5\r\n\r\nhello",
        MALFORMED,
    ),
    "rfc9112-6.3-cl-conflict": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        MALFORMED,
    ),
    "rfc9112-6.3-cl-plus": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Content-Length: +5\r\n\r\nhello",
        MALFORMED,
    ),
    "rfc9112-6.3-cl-hex": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Content-Length: 0x5\r\n\r\nhello",
        MALFORMED,
    ),
    # RFC 9112 section 11.2: the classic smuggling shapes, a second request hidden in the body
    "rfc9112-11.2-cl-te": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"0\r\n\r\nGET /api/echo/{MARK} HTTP/1.1\r\nX: y\r\n\r\n",
        MALFORMED,
    ),
    "rfc9112-11.2-te-cl": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        f"2c\r\nGET /api/echo/{MARK} HTTP/1.1\r\nX: y\r\n\r\n\r\n0\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc9112-11.2-te-in-http10-smuggles": (
        f"POST /api/echo/a HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
        f"0\r\n\r\nGET /api/echo/{MARK} HTTP/1.1\r\n{H}\r\n",
        MALFORMED,
    ),
    # RFC 9110 section 7.8 / RFC 6455 section 4.1: the one upgrade is Upgrade: websocket on a GET.
    # llhttp stops at any other Upgrade next to Connection: upgrade and aiohttp drops the bytes
    # behind it, so the pipelined request would go unanswered and the next answer pair with it.
    # gate
    "rfc9110-7.8-upgrade-h2c": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc9110-7.8-upgrade-other-with-body": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Connection: keep-alive, UPGRADE\r\nUpgrade: foo\r\n"
        "Content-Length: 5\r\n\r\nhello",
        MALFORMED,
    ),
    # gate
    "rfc9110-7.8-upgrade-empty": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}Connection: upgrade\r\nUpgrade: \r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc9110-7.8-upgrade-list": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}Connection: upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc9110-7.8-upgrade-twice": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}Connection: upgrade\r\nUpgrade: websocket\r\n"
        "Upgrade: h2c\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc6455-4.1-websocket-on-post": (
        f"POST /api/echo/a HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Content-Length: 0\r\n\r\n",
        MALFORMED,
    ),
    # gate
    "rfc6455-4.1-websocket-on-put": (
        f"PUT /api/echo/a HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: WebSocket\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        MALFORMED,
    ),
    # RFC 9110 section 9.3.8: TRACE reflects the request (bff would add the bearer); TRACK is IIS's
    # gate
    "rfc9110-9.3.8-trace": (f"TRACE /api/echo/a HTTP/1.1\r\n{H}\r\n", METHOD_NOT_ALLOWED),
    # llhttp refuses TRACK itself (the gate's 405 is for aiohttp's pure-Python parser)
    "rfc9110-9.3.8-track": (f"TRACK /api/echo/a HTTP/1.1\r\n{H}\r\n", MALFORMED),
    # RFC 9110 section 10.1.1: aiohttp's own 417 page would echo the value
    # gate
    "rfc9110-10.1.1-unknown-expect": (
        f"GET /api/echo/a HTTP/1.1\r\n{H}Expect: {MARK}\r\n\r\n",
        EXPECTATION_FAILED,
    ),
}


@pytest.mark.parametrize("case", FRAMING, ids=list(FRAMING))
def test_bad_framing_is_refused_and_reaches_no_upstream(
    bff: BffProcess, cookie: str, upstream: EchoUpstream, case: str
) -> None:
    raw, refusal = FRAMING[case]
    upstream.clear()
    reply = exchange(bff.port, raw.encode("latin-1") + api_request(cookie, "/api/echo/pipelined"))
    assert_refused(reply, refusal)
    assert upstream.seen() == [], "a refused request (or the one behind it) reached the upstream"


@pytest.mark.parametrize(
    ("method", "refusal"),
    [("TRACE", METHOD_NOT_ALLOWED), ("TRACK", MALFORMED)],  # llhttp refuses TRACK itself
)
def test_trace_is_refused_with_a_session_even_where_the_route_lists_it(
    bff: BffProcess, cookie: str, upstream: EchoUpstream, method: str, refusal: Refusal
) -> None:
    """RFC 9110 section 9.3.8: a client must not send credentials in a TRACE, and an upstream that
    implements it reflects them; bff would attach the bearer. So 405, before any credential is
    looked up or attached, on a route whose ``methods:`` list TRACE and TRACK."""
    upstream.clear()
    ok = exchange(bff.port, api_request(cookie, "/api/traced/ok", b"Connection: close\r\n"))
    assert ok.status == 200 and len(upstream.seen()) == 1  # the route does forward
    upstream.clear()
    request = api_request(cookie, f"/api/traced/{MARK}").replace(b"GET", method.encode(), 1)
    reply = exchange(bff.port, request + api_request(cookie, "/api/traced/pipelined"))
    assert_refused(reply, refusal)
    assert upstream.seen() == []


@pytest.mark.parametrize(
    "rest",
    [b"zz\r\n", b"5\nhello\n0\n\n", b"5\r\nhello-too-long\r\n0\r\n\r\n"],
    ids=["rfc9112-7.1-bad-chunk-size", "rfc9112-7.1-bare-lf-chunk", "rfc9112-7.1-chunk-overrun"],
)
def test_a_body_that_breaks_after_the_headers_went_upstream_gets_400_at_once(
    bff: BffProcess, cookie: str, upstream: EchoUpstream, rest: bytes
) -> None:
    """RFC 9112 section 7.1 (chunked coding) and 11.2: the request is already on its way upstream
    when its body turns out malformed. aiohttp would leave the handler waiting for the rest until
    the route's timeout (30 s); the front door fails the body, answers 400 and closes, and the
    upstream never gets a complete request (nor the one pipelined behind)."""
    upstream.clear()
    head = api_request(cookie, f"/api/echo/{MARK}")[:-2].replace(b"GET", b"POST", 1)
    first = head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    chunks: list[bytes] = []
    with socket.create_connection((HOST, bff.port), timeout=20) as sock:
        sock.sendall(first)
        time.sleep(0.5)  # let bff start forwarding: the error must arrive mid-body
        sock.sendall(rest + api_request(cookie, "/api/echo/pipelined"))
        while chunk := sock.recv(65536):  # raises TimeoutError if bff does not close
            chunks.append(chunk)
    assert_refused(Reply(b"".join(chunks), closed=True), MALFORMED)
    assert upstream.seen() == []


# -------------------------------------------------------------------------------------------------
# Point 3: bytes that are not UTF-8 in any header bff reads or forwards: 400, never a 500.

READ_OR_FORWARDED = (
    "Expect", "Cookie", "Origin", "Host", "Sec-Fetch-Site", "Sec-Fetch-Mode", "X-CSRF", "Upgrade",
    "Connection", "Content-Type", "Accept", "If-None-Match", "Referer", "X-Custom",
)  # fmt: skip


@pytest.mark.parametrize("name", READ_OR_FORWARDED)
def test_a_header_value_that_is_not_utf8_is_refused(
    bff: BffProcess, cookie: str, upstream: EchoUpstream, name: str
) -> None:
    """RFC 9110 section 5.5 (field values); aiohttp's client would drop the undecodable bytes."""
    upstream.clear()
    host = b"" if name == "Host" else f"Host: {HOST}\r\n".encode()
    raw = (
        b"GET /api/echo/a HTTP/1.1\r\n" + host + b"X-CSRF: 1\r\n"
        + f"Cookie: {COOKIE_NAME}={cookie}\r\n".encode()
        + name.encode() + b": " + MARK.encode() + b"\xff\xfe\xc3\r\n\r\n"
    )  # fmt: skip
    assert_refused(exchange(bff.port, raw), MALFORMED)
    assert upstream.seen() == []


# -------------------------------------------------------------------------------------------------
# Point 1: oversized request lines and headers, with the limits set small in the config.


def test_an_inflated_cookie_header_gets_431_without_the_session_cookie(
    bff: BffProcess, cookie: str
) -> None:
    """What a same-origin script can do with document.cookie: the answer holds no cookie byte."""
    filler = "; ".join(f"pad{i}={MARK}" for i in range(LIMITS["max_header_size"] // 20))
    raw = (
        f"GET /api/echo/a HTTP/1.1\r\nHost: {HOST}\r\nX-CSRF: 1\r\n"
        f"Cookie: {COOKIE_NAME}={cookie}; {filler}\r\n\r\n"
    ).encode()
    reply = exchange(bff.port, raw)
    assert_refused(reply, TOO_LARGE)
    assert cookie.encode() not in reply.raw


def test_a_request_line_over_the_limit_gets_431(bff: BffProcess) -> None:
    path = "/api/echo/" + MARK * (LIMITS["max_request_line"] // len(MARK) + 1)
    assert_refused(
        exchange(bff.port, f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()), TOO_LARGE
    )


def test_a_header_name_over_the_limit_gets_431(bff: BffProcess) -> None:
    name = "X-" + MARK * (LIMITS["max_header_size"] // len(MARK) + 1)
    raw = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n{name}: 1\r\n\r\n".encode()
    assert_refused(exchange(bff.port, raw), TOO_LARGE)


def test_too_many_headers_get_431(bff: BffProcess) -> None:
    lines = "".join(f"X-{i}: {MARK}\r\n" for i in range(LIMITS["max_headers"] + 1))
    raw = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\n".encode()
    assert_refused(exchange(bff.port, raw), TOO_LARGE)


def test_requests_within_the_limits_are_served(bff: BffProcess) -> None:
    """The limits refuse only what is over them: a header just under still gets the SPA."""
    value = "v" * (LIMITS["max_header_size"] - len("X-Big") - 1)
    lines = "".join(f"X-{i}: 1\r\n" for i in range(LIMITS["max_headers"] - 3))
    raw = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nX-Big: {value}\r\n{lines}\r\n"
    reply = exchange(bff.port, raw.encode())
    assert reply.status == 200, reply.raw[:300]
    assert "server" not in reply.headers


# -------------------------------------------------------------------------------------------------
# Point 5: none of it in the logs, at debug level.


def test_the_logs_hold_no_secret_of_the_hostile_requests(
    bff: BffProcess, cookie: str, redis_server: RedisServer, keys: list[str]
) -> None:
    """Runs after the cases above (same module, same process): every refusal was logged as a
    fixed event, and no cookie, Authorization value or code appears anywhere in the output."""
    hostile = [raw.encode("latin-1") for raw, _ in FRAMING.values()]
    hostile.append(api_request(cookie, f"/api/echo/a?code={CODE}", b"Expect: nope\r\n"))
    hostile.append(
        api_request(cookie, extra=b"Cookie: " + b"; ".join([b"p=" + b"x" * 40] * 80) + b"\r\n")
    )
    for raw in hostile:
        exchange(bff.port, raw + api_request(cookie, f"/api/echo/b?code={CODE}"))
    # A served request with the same secrets, so that the logs are seen to carry requests at all.
    exchange(bff.port, api_request(cookie, f"/api/echo/c?code={CODE}", b"Connection: close\r\n"))
    logs = (Path(bff.workdir) / "stderr.log").read_text(errors="replace")
    logs += (Path(bff.workdir) / "stdout.log").read_text(errors="replace")
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    refused = [e for e in events if e.get("event") == "http.refused"]
    assert {e["status"] for e in refused} >= {400, 417, 431}
    assert all(set(e) >= {"status", "reason", "client"} for e in refused)
    session = asyncio.run(read_session(redis_server.url, keys, cookie))
    assert session is not None and session.refresh_token
    tokens = (session.access_token, session.refresh_token, session.id_token)
    for secret in (cookie, TX_COOKIE, AUTH.split()[1], CODE, *tokens):
        assert secret and secret not in logs
    assert "Traceback" not in logs


# -------------------------------------------------------------------------------------------------
# In process: the answers that need an app of their own.


async def _serve(app: web.Application) -> tuple[FrontDoorRunner, int]:
    runner = FrontDoorRunner(app, limits=LimitSettings())
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


async def test_a_body_over_client_max_size_gets_the_fixed_413() -> None:
    async def read(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="read")

    app = web.Application(client_max_size=64)
    app.router.add_post("/", read)
    runner, port = await _serve(app)
    try:
        body = MARK.encode() * 10
        raw = f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        reply = await asyncio.to_thread(exchange, port, raw + body)
    finally:
        await runner.cleanup()
    assert_refused(reply, BODY_TOO_LARGE)


async def test_a_handler_exception_outside_bff_s_middleware_is_the_fixed_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp's own 500 page (with a traceback when debug is on) never goes out, and its log
    line names the exception's type and frames, not its message."""

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError(f"boom {request.headers.get('X-Marker')}")

    app = web.Application()  # no error middleware: the exception reaches the server library
    app.router.add_get("/", boom)
    runner, port = await _serve(app)
    caplog.set_level("INFO")
    try:
        raw = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/html\r\nX-Marker: {MARK}\r\n\r\n"
        reply = await asyncio.to_thread(exchange, port, raw.encode())
    finally:
        await runner.cleanup()
    assert_refused(reply, INTERNAL)
    failed = [r for r in caplog.records if getattr(r, "event", None) == "http.failed"]
    assert [getattr(r, "error", None) for r in failed] == ["RuntimeError"]
    assert "boom" in getattr(failed[0], "where", "")
    assert MARK not in caplog.text and "Traceback" not in caplog.text


async def test_an_exception_after_the_handler_is_logged_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ``on_response_prepare`` hook that raises: aiohttp drops the connection and logs
    through ``log_exception``, which here gives the type and frames only."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        raise RuntimeError(f"hook {request.headers.get('X-Marker')}")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    app.on_response_prepare.append(hook)
    runner, port = await _serve(app)
    caplog.set_level("INFO")
    try:
        raw = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Marker: {MARK}\r\n\r\n"
        reply = await asyncio.to_thread(exchange, port, raw.encode())
    finally:
        await runner.cleanup()
    assert reply.closed and MARK.encode() not in reply.raw
    errors = [r for r in caplog.records if getattr(r, "event", None) == "http.internal_error"]
    assert [getattr(r, "error", None) for r in errors] == ["RuntimeError"]
    assert MARK not in caplog.text and "Traceback" not in caplog.text


def test_a_burst_of_signals_during_the_graceful_stop_does_not_kill_a_worker(
    bff: BffProcess,
) -> None:
    """killpg and the parent's own forward reach a worker together, and an impatient operator
    sends more: a burst of SIGTERMs after the first must not cut the graceful stop (a worker
    left with SIG_DFL after its first signal dies here with -15)."""
    proc = BffProcess(bff.config, workers=1)
    try:
        proc.start()
        assert proc.pid is not None
        deadline = time.monotonic() + 20
        while len(tcp_sockets(proc.port, "0A")) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children(proc.pid)
        assert len(workers) == 1, workers
        os.killpg(proc.pid, signal.SIGTERM)
        for _ in range(3000):  # bounded: a few hundred ms of signals, then stop
            try:
                os.kill(workers[0], signal.SIGTERM)
            except ProcessLookupError:
                break
        deadline = time.monotonic() + 30
        while proc.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proc.is_running(), "bff run did not stop"
        assert proc._proc is not None and proc._proc.returncode == 0, proc.logs()
        assert "worker.died" not in proc.full_logs()
    finally:
        proc.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_bff_run_cleanly(bff: BffProcess, signum: int) -> None:
    """The front door's runner keeps ``web.run_app``'s contract: a signal is a graceful stop with
    exit status 0, for one worker and for several sharing a port (SO_REUSEPORT)."""
    for workers in (1, 2):
        proc = BffProcess(bff.config, workers=workers)
        try:
            proc.start()
            assert proc.pid is not None
            # Each worker installs its signal handlers before it binds its own SO_REUSEPORT
            # socket: once all are listening, none can be caught half started.
            deadline = time.monotonic() + 20
            while len(tcp_sockets(proc.port, "0A")) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(tcp_sockets(proc.port, "0A")) == workers
            os.killpg(proc.pid, signum)
            deadline = time.monotonic() + 20
            while proc.is_running() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not proc.is_running(), "bff run did not stop"
            assert proc._proc is not None and proc._proc.returncode == 0, proc.logs()
            assert "Traceback" not in proc.full_logs()
        finally:
            proc.close()
