"""The ``_method`` body check against a real ``bff run`` (issue 9 review, findings 1, 3, 6, 7).

Raw bytes through a plain socket to one ``bff run`` process whose ``/api/echo`` route has a
``methods:`` list (so bodies are scanned). Each hostile body must get a 400 JSON while the
upstream never receives it whole; the endless preamble must be refused while only a bounded
part of it has been sent (the review measured RSS growing 1:1 with it); nothing the process
writes may quote the request; and no refusal may count as an upstream error.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bff.proxy.overrides import MAX_PREAMBLE
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    write_config,
)
from tests.support.procs import HOST, OidcProvider, RedisServer
from tests.support.scrape import sample

MARK = "MARK" + secrets.token_hex(8)  # in every hostile body: must never be logged


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture(scope="module")
def bff(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BffProcess]:
    workdir = tmp_path_factory.mktemp("override-bodies")
    proc = BffProcess(workdir / "bff.yaml")
    client: dict[str, Any] = asyncio.run(oidc_op.register_client([f"{proc.url}/bff/callback"]))
    config = base_config(
        public_url=proc.url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=[secrets.token_urlsafe(32)],
        static=workdir,
        upstreams=[{"path": "/api/echo", "url": upstream.url, "methods": ["GET", "POST"]}],
    )
    config["log"] = {"level": "debug", "format": "json"}
    write_config(workdir, config)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def cookie(bff: BffProcess) -> str:
    return asyncio.run(login(bff.url, "override-bodies"))


def head(cookie: str, content_type: str, length: int, path: str = "/api/echo/body") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nX-CSRF: 1\r\n"
        f"Cookie: {COOKIE_NAME}={cookie}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode("latin-1")


def answer(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the one answer on ``sock`` (read until the server closes or
    the body is complete)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        top, _, body = data.partition(b"\r\n\r\n")
        length = [
            int(v)
            for k, _, v in (h.partition(b":") for h in top.split(b"\r\n")[1:])
            if k.strip().lower() == b"content-length"
        ]
        if length and len(body) >= length[0]:
            break
    assert data, "no answer before the deadline"
    top, _, body = data.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), json.loads(body)


def post(
    bff: BffProcess, cookie: str, content_type: str, body: bytes
) -> tuple[int, dict[str, Any]]:
    with socket.create_connection((HOST, bff.port), timeout=20) as sock:
        sock.sendall(head(cookie, content_type, len(body)) + body)
        return answer(sock)


def upstream_errors(bff: BffProcess) -> float:
    with urllib.request.urlopen(f"{bff.metrics_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        sample(text, "bff_upstream_errors_total", kind=kind)
        for kind in ("failed", "timeout", "reset")
    )


def test_an_endless_multipart_preamble_is_refused_after_a_few_kilobytes(
    bff: BffProcess, cookie: str, upstream: EchoUpstream
) -> None:
    """Finding 1: the body announces 300 MB and sends 1000-byte lines with no boundary. Only
    64 KB are ever sent: the 400 must come anyway (the scan stops at MAX_PREAMBLE), where
    before it waited, keeping every byte, for the rest."""
    upstream.clear()
    line = b"x" * 998 + b"\r\n"
    sent = 0
    with socket.create_connection((HOST, bff.port), timeout=20) as sock:
        sock.sendall(head(cookie, "multipart/form-data; boundary=abc", 300 * 1024 * 1024))
        try:
            while sent < 64 * 1024:
                sock.sendall(line)
                sent += len(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused already; the answer is still there to read
        status, body = answer(sock)
    assert sent > 8 * MAX_PREAMBLE
    assert status == 400 and body["error"] == "invalid_request", body
    assert upstream.seen() == []  # it never had the body whole


def test_the_reviewers_bypasses_are_refused_and_never_reach_the_upstream(
    bff: BffProcess, cookie: str, upstream: EchoUpstream
) -> None:
    """Finding 3: a UTF-16 form (Spring, ASP.NET honour its charset), and boundary confusion
    (PHP takes the first "boundary" it finds)."""
    upstream.clear()
    form = "application/x-www-form-urlencoded"
    hidden = (
        b'--abc\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n--xyz\r\n'
        b'Content-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--xyz--\r\n\r\n'
        b"--abc--\r\n"
    )
    cases = [
        (f"{form}; charset=UTF-16LE", "_method=DELETE".encode("utf-16-le"), "unsupported_charset"),
        (f"{form}; charset=ibm037", "_method=DELETE".encode("cp037"), "unsupported_charset"),
        ("application/json; charset=utf-16le", '{"_method":1}'.encode("utf-16-le"),
         "unsupported_charset"),
        ("multipart/form-data; xboundary=xyz; boundary=abc", hidden, "invalid_request"),
        ('multipart/form-data; x="boundary=xyz"; boundary=abc', hidden, "invalid_request"),
        ("multipart/form-data; BOUNDARY=abc; boundary=xyz", hidden, "invalid_request"),
    ]  # fmt: skip
    for content_type, body, error in cases:
        status, answer_body = post(bff, cookie, content_type, body)
        assert (status, answer_body["error"]) == (400, error), content_type
    # The control: the same route takes a UTF-8 form.
    assert post(bff, cookie, f"{form};charset=UTF-8", b"a=1")[0] == 200
    assert [s.method for s in upstream.seen()] == ["POST"]


def test_parser_errors_are_400s_not_upstream_errors_and_nothing_is_quoted(
    bff: BffProcess, cookie: str, upstream: EchoUpstream
) -> None:
    """Findings 6 and 7: aiohttp's RuntimeError on a long ``_charset_`` was a 502 counted as an
    upstream error; its warning on a doubled ``name`` quoted the header on stderr."""
    upstream.clear()
    before = upstream_errors(bff)
    mp = "multipart/form-data; boundary=abc"
    bodies = [
        b'--abc\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\n'
        + MARK.encode() * 3
        + b'\r\n--abc\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--abc--\r\n',
        f'--abc\r\nContent-Disposition: form-data; name="a"; name="_method{MARK}"\r\n\r\n'
        f"DELETE\r\n--abc--\r\n".encode(),
        f'--abc\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--abc\r\n'
        f"Content-Disposition: form-data; name=\"b\"; name*=x-{MARK}''%41\r\n\r\n"
        f"1\r\n--abc--\r\n".encode(),
    ]
    for body in bodies:
        status, answer_body = post(bff, cookie, mp, body)
        assert status == 400, answer_body
        assert MARK not in json.dumps(answer_body)
    assert upstream.seen() == []
    assert upstream_errors(bff) == before
    # Every line the process wrote so far (debug logs included): none quotes the requests.
    logs = (Path(bff.workdir) / "stderr.log").read_text(errors="replace")
    logs += (Path(bff.workdir) / "stdout.log").read_text(errors="replace")
    assert MARK not in logs
    assert "Warning" not in logs
