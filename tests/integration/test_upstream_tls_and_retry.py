"""bff's upstream client (bff.proxy.upstream) end to end, where aiohttp's ClientSession used to be:
``https`` upstreams with certificate and host name verified, and the one retry of a kept-alive
connection the upstream closed just as bff reused it.

Real parts: bff in this process behind its front door, the real OP and redis-server, aiohttp
upstreams with TLS on loopback (a throw-away CA from tests.support.tls, trusted through
``SSL_CERT_FILE`` as OpenSSL reads it), and a raw asyncio upstream for the closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bff.app import create_app
from bff.config import parse_settings
from bff.server import listen
from bff.services import SERVICES
from tests.support.procs import OidcProvider, RedisServer, free_port
from tests.support.tls import Pki, make_pki

KEY = "upstream-tls-test-key-0123456789abcdef0123"
SIZE = 1024 * 1024  # above SMALL_BODY: streamed, not buffered, both ways


# -------------------------------------------------------------------------------------------------
# The upstreams


@dataclass
class TlsUpstream:
    """An aiohttp server over TLS that records each request it decrypted."""

    host: str
    cert: Path
    key: Path
    port: int = field(default_factory=free_port)
    seen: list[str] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)  # the server name of each handshake
    runner: web.AppRunner | None = None

    def _sni(self, _conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.path_qs}")
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        if request.path.endswith("/stream"):
            response = web.StreamResponse()  # chunked: no length known in advance
            await response.prepare(request)
            for _ in range(SIZE // 65536):
                await response.write(b"s" * 65536)
            await response.write_eof()
            return response
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "tls": request.secure,
                "body_len": size,
                "body_sha256": digest.hexdigest(),
            }
        )

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        context.sni_callback = self._sni
        app = web.Application(client_max_size=4 * SIZE)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, ssl_context=context).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class RawListener:
    """A TCP listener that keeps every byte it is sent (it speaks no TLS): what would go in
    clear to an https URL."""

    port: int = field(default_factory=free_port)
    received: bytearray = field(default_factory=bytearray)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Whatever came first (a client speaking TLS opens with its ClientHello), then a close:
        # the handshake fails at once instead of at the route's timeout.
        with contextlib.suppress(TimeoutError, ConnectionError):
            self.received += await asyncio.wait_for(reader.read(65536), 10)
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class ClosingUpstream:
    """Answers the first request on each connection (keep-alive, no ``Connection: close``),
    then closes the socket as the next request on it arrives, without a word: a kept-alive
    connection the upstream dropped just as bff reused it. With ``answer_fresh`` off, it answers
    only the very first request of all: the retry's fresh connection is dropped too.

    It reads request heads only to count them (one ``readuntil`` of the blank line each):
    bff's requests in these tests are body-less, or dropped before their body is read."""

    port: int = field(default_factory=free_port)
    heads: list[tuple[int, str]] = field(default_factory=list)  # (connection no., request line)
    answer_fresh: bool = True
    abort: bool = False  # RST instead of FIN
    connections: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        answered = 0
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                self.heads.append((number, head.split(b"\r\n", 1)[0].decode()))
                first_of_all = len(self.heads) == 1
                if answered == 0 and (self.answer_fresh or first_of_all):
                    body = f"answered on connection {number}".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
                    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    answered += 1
                    continue
                break
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        if self.abort:
            writer.transport.abort()
        else:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# -------------------------------------------------------------------------------------------------
# bff with one `token: none` route per case


@dataclass
class Setup:
    url: str
    good: TlsUpstream
    untrusted: TlsUpstream
    wrong_name: TlsUpstream
    raw: RawListener
    closing: ClosingUpstream

    async def call(
        self, path: str, method: str = "GET", data: bytes | None = None
    ) -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path, data=data, headers={"X-CSRF": "1"}) as resp,
        ):
            return resp.status, await resp.read()


@pytest.fixture
async def setup(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Setup]:
    pki: Pki = make_pki(tmp_path)
    (tmp_path / "other").mkdir()
    other: Pki = make_pki(tmp_path / "other")  # a CA bff does not trust
    # How an operator trusts a private CA for https upstreams: OpenSSL's own variable, read when
    # bff builds its client contexts (it was so with aiohttp's ClientSession too).
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    good = TlsUpstream("127.0.0.1", pki.server_cert, pki.server_key)
    untrusted = TlsUpstream("127.0.0.1", other.server_cert, other.server_key)
    # 127.0.0.2 is loopback too; the certificate names 127.0.0.1 and localhost only.
    wrong_name = TlsUpstream("127.0.0.2", pki.server_cert, pki.server_key)
    raw = RawListener()
    closing = ClosingUpstream()
    started: list[TlsUpstream | RawListener | ClosingUpstream] = []
    port = free_port()
    client = await oidc_op.register_client(
        redirect_uris=[f"http://127.0.0.1:{port}/bff/callback"],
        grant_types=("authorization_code", "refresh_token"),
        scope="openid profile",
    )
    (tmp_path / "static").mkdir()
    upstreams = [
        {"path": "/tls", "url": f"https://127.0.0.1:{good.port}/up", "token": "none"},
        # A name: resolved (and cached) by bff, sent as SNI, checked against the certificate.
        {"path": "/tls-name", "url": f"https://localhost:{good.port}/up", "token": "none"},
        {"path": "/untrusted", "url": f"https://127.0.0.1:{untrusted.port}", "token": "none"},
        {"path": "/wrong-name", "url": f"https://127.0.0.2:{wrong_name.port}", "token": "none"},
        {"path": "/plain", "url": f"https://127.0.0.1:{raw.port}", "token": "none"},
        {"path": "/closing", "url": f"http://127.0.0.1:{closing.port}", "token": "none"},
    ]
    settings = parse_settings(
        json.dumps(
            {
                "public_url": f"http://127.0.0.1:{port}",
                "static": str(tmp_path / "static"),
                "oidc": {
                    "issuer": oidc_op.issuer,
                    "client_id": client["client_id"],
                    "client_secret": client["client_secret"],
                },
                "session": {
                    "store": redis_server.url,
                    "cookie": {"name": "bff-session", "secure": False},
                },
                "keys": [KEY],
                "upstreams": upstreams,
            }
        )
    )
    runner = None
    try:
        for upstream in (good, untrusted, wrong_name, raw, closing):
            await upstream.start()
            started.append(upstream)
        app = create_app(settings)
        runner = await listen(app, settings, "127.0.0.1", port)
        deadline = time.monotonic() + 10
        while not app[SERVICES].oidc.ready:
            assert time.monotonic() < deadline, "bff never loaded the OP's metadata"
            await asyncio.sleep(0.05)
        yield Setup(f"http://127.0.0.1:{port}", good, untrusted, wrong_name, raw, closing)
    finally:
        if runner is not None:
            await runner.cleanup()
        for upstream in started:
            await upstream.close()


def _failed_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(r, "error", "")
        for r in caplog.records
        if getattr(r, "event", None) == "proxy.upstream_failed"
    ]


# -------------------------------------------------------------------------------------------------
# https


async def test_get_post_and_a_streamed_answer_over_https(setup: Setup) -> None:
    status, body = await setup.call("/tls/a?x=1")
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["method"], answer["path"], answer["tls"]) == ("GET", "/up/a?x=1", True)

    upload = os.urandom(SIZE)
    status, body = await setup.call("/tls/upload", "POST", upload)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["body_len"] == SIZE
    assert answer["body_sha256"] == hashlib.sha256(upload).hexdigest()

    status, body = await setup.call("/tls/stream")
    assert status == 200
    assert body == b"s" * SIZE
    assert setup.good.seen == ["GET /up/a?x=1", "POST /up/upload", "GET /up/stream"]


async def test_an_https_upstream_by_name_is_resolved_and_its_certificate_checked(
    setup: Setup,
) -> None:
    for i in range(3):  # a new connection or a kept one: the same answer
        status, body = await setup.call(f"/tls-name/n{i}")
        assert status == 200, body
        assert json.loads(body)["path"] == f"/up/n{i}"
    assert setup.good.sni and set(setup.good.sni) == {"localhost"}  # SNI: the URL's host


async def test_an_upstream_certificate_from_an_untrusted_ca_gives_502_and_nothing_is_sent(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bff")
    status, body = await setup.call("/untrusted/secret", "POST", b"not for an impostor")
    assert status == 502
    assert json.loads(body)["error"] == "upstream_error"
    assert setup.untrusted.seen == []
    assert _failed_events(caplog) == ["ClientConnectorCertificateError"]


async def test_an_upstream_certificate_for_another_host_gives_502_and_nothing_is_sent(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bff")
    status, body = await setup.call("/wrong-name/secret")
    assert status == 502
    assert json.loads(body)["error"] == "upstream_error"
    assert setup.wrong_name.seen == []
    assert _failed_events(caplog) == ["ClientConnectorCertificateError"]


async def test_an_https_url_never_falls_back_to_clear_text(setup: Setup) -> None:
    status, _ = await setup.call("/plain/secret?token=x", "POST", b"body")
    assert status == 502
    received = bytes(setup.raw.received)
    assert received[:1] == b"\x16"  # a TLS handshake record: the ClientHello
    for clear in (b"HTTP/1.1", b"/secret", b"token=x", b"body", b"X-CSRF"):
        assert clear not in received


# -------------------------------------------------------------------------------------------------
# A kept-alive connection the upstream closed as bff reused it


@pytest.mark.parametrize("abort", [False, True], ids=["fin", "rst"])
async def test_a_body_less_get_on_a_dropped_pooled_connection_is_retried_once_fresh(
    setup: Setup, abort: bool
) -> None:
    setup.closing.abort = abort
    assert await setup.call("/closing/a") == (200, b"answered on connection 1")
    assert await setup.call("/closing/b") == (200, b"answered on connection 2")
    assert setup.closing.heads == [
        (1, "GET /a HTTP/1.1"),
        (1, "GET /b HTTP/1.1"),  # the pooled connection: dropped without an answer
        (2, "GET /b HTTP/1.1"),  # sent again once, on a new one
    ]


async def test_the_retry_happens_once_only(setup: Setup) -> None:
    setup.closing.answer_fresh = False  # the retry's new connection is dropped too
    assert (await setup.call("/closing/a"))[0] == 200
    status, body = await setup.call("/closing/b")
    assert status == 502
    assert json.loads(body)["error"] == "upstream_error"
    assert [h for h in setup.closing.heads if h[1] == "GET /b HTTP/1.1"] == [
        (1, "GET /b HTTP/1.1"),
        (2, "GET /b HTTP/1.1"),
    ]


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_request_with_a_body_on_a_dropped_pooled_connection_is_not_sent_again(
    setup: Setup, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bff")
    assert (await setup.call("/closing/a"))[0] == 200
    status, body = await setup.call("/closing/write", method, b"x" * 100)
    assert status == 502  # the upstream may have acted on it: bff does not guess
    assert json.loads(body)["error"] == "upstream_error"
    assert setup.closing.heads == [(1, "GET /a HTTP/1.1"), (1, f"{method} /write HTTP/1.1")]
    assert len(_failed_events(caplog)) == 1
    # The pool is fine afterwards: a new connection.
    assert await setup.call("/closing/c") == (200, b"answered on connection 2")
