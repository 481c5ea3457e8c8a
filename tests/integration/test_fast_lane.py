"""The front door's fast lane (issue 11, point 4): an edge's auth call that the session cache can
decide is answered in ``data_received``, without a task or a response object.

It must be invisible but for the CPU it saves: the same bytes as the usual way, answers in the
order the requests came on a connection that mixes both ways, no hang when a pipelined burst is
longer than aiohttp's message queue, no unbounded buffering for a client that does not read, the
keep-alive timeout still closing an idle connection, and the request counted and logged. A real
``bff`` app served by :func:`bff.server.listen` on a loopback port, spoken to over raw sockets;
each test also checks that the fast lane did answer (:func:`lane`), so none passes vacuously.
The edge tests (``test_edge.py``) take the same lane through real nginx and Caddy.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bff import metrics
from bff.app import create_app
from bff.config import parse_settings
from bff.proxy.direct import DirectPath
from bff.server import FrontDoorRunner, listen
from bff.services import SERVICES
from bff.sessions import SessionData
from tests.support.procs import HOST, free_port

TOKEN = "at-" + "x" * 40


@dataclass
class Served:
    port: int
    cookie: str
    app: web.Application


@pytest.fixture
def lane(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """What :meth:`DirectPath.answer_now` returned for each call, in order."""
    seen: list[bool] = []
    real = DirectPath.answer_now

    def counted(self: DirectPath, *args: object, **kwargs: object) -> bool:
        answered = real(self, *args, **kwargs)  # type: ignore[arg-type]
        seen.append(answered)
        return answered

    monkeypatch.setattr(DirectPath, "answer_now", counted)
    yield seen


def _settings(tmp_path: Path) -> str:
    return f"""
public_url: http://{HOST}:8080
oidc: {{issuer: "http://{HOST}:9", client_id: x, client_secret: y}}
session: {{store: "memory://", cache_ttl: 5s, cookie: {{name: bff-session, secure: false}}}}
keys: ["{"k" * 50}"]
rate_limits: {{enabled: false}}
trusted_proxies: ["127.0.0.0/8"]
upstreams:
  - {{path: /api, url: "http://{HOST}:9", token: user}}
  - {{path: /open, url: "http://{HOST}:9", token: none}}
"""


async def _session(app: web.Application) -> str:
    services = app[SERVICES]
    now = time.time()
    session = await services.sessions.create(
        SessionData(
            sub="u", claims={}, access_token=TOKEN, access_expires_at=now + 3600,
            refresh_token=None, id_token=None, scopes=("openid",), created_at=now,
            expires_at=now + 7200,
        )
    )  # fmt: skip
    response = web.Response()
    services.cookies.set_session(response, session.secret)
    return f"bff-session={response.cookies['bff-session'].value}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    settings = parse_settings(_settings(tmp_path), base_dir=tmp_path)
    app = create_app(settings)
    port = free_port()
    runner = await listen(app, settings, HOST, port)
    try:
        yield Served(port, await _session(app), app)
    finally:
        await runner.cleanup()


def ask(cookie: str, rid: str, *, target: str = "/bff/authz", route: str = "/api/items") -> bytes:
    """One auth call as nginx's ``auth_request`` sends it (``target``: bff's own path)."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: bff\r\nX-Original-URI: {route}\r\n"
        f"X-Original-Method: GET\r\nCookie: {cookie}\r\nX-CSRF: 1\r\nX-Request-ID: {rid}\r\n\r\n"
    ).encode()


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[Answer]:
    """``count`` answers off the connection, each framed by its Content-Length (bff's are)."""
    answers = []
    async with asyncio.timeout(30):
        for _ in range(count):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            lines = head.split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
            answer = Answer(status, headers, b"")  # type: ignore[arg-type]
            answer.body = await reader.readexactly(int(answer.get("Content-Length") or 0))
            answers.append(answer)
    return answers


async def test_the_fast_lane_gives_the_usual_answer_byte_for_byte(
    served: Served, lane: list[bool]
) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        for route in ("/api/items", "/open/x"):
            # The query makes the same call go the usual way (the lane takes the exact path).
            writer.write(ask(served.cookie, "same-id", route=route))
            writer.write(ask(served.cookie, "same-id", route=route, target="/bff/authz?usual"))
            fast, usual = await read_answers(reader, 2)
            assert fast.status == usual.status == 200
            assert sorted(fast.headers, key=str) == sorted(usual.headers, key=str) or (
                # The two may fall on each side of a second boundary.
                [h for h in sorted(fast.headers) if h[0] != "Date"]
                == [h for h in sorted(usual.headers) if h[0] != "Date"]
            )
            assert fast.body == usual.body == b""
            assert (fast.get("Authorization") == f"Bearer {TOKEN}") is (route == "/api/items")
            assert fast.get("Cache-Control") == "no-store"
            assert fast.get("X-Request-ID") == "same-id"
            assert fast.get("Server") is None
    finally:
        writer.close()
    assert lane.count(True) == 2


async def test_refusals_go_the_usual_way_with_their_json(served: Served, lane: list[bool]) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(ask("bff-session=forged", "r1"))
        (no_session,) = await read_answers(reader, 1)
        writer.write(ask(served.cookie, "r2").replace(b"X-CSRF: 1\r\n", b""))
        (forged,) = await read_answers(reader, 1)
    finally:
        writer.close()
    assert no_session.status == 401 and b"error" in no_session.body
    assert forged.status == 403 and b"X-CSRF" in forged.body
    assert True not in lane  # asked, and left to the usual way
    assert len(lane) == 2


async def test_answers_keep_the_order_of_requests_that_mix_both_ways(
    served: Served, lane: list[bool]
) -> None:
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        # Every third the usual way. In nine writes of ten, read only at the end: within a write,
        # the calls behind a usual one must wait for it; between writes, the lane takes over
        # again once the usual way has drained its queue.
        for first in range(0, 90, 10):
            writer.write(
                b"".join(
                    ask(
                        served.cookie,
                        f"r{i}",
                        target="/bff/authz?usual" if i % 3 == 2 else "/bff/authz",
                    )
                    for i in range(first, first + 10)
                )
            )
            await asyncio.sleep(0.05)
        answers = await read_answers(reader, 90)
    finally:
        writer.close()
    assert [a.get("X-Request-ID") for a in answers] == [f"r{i}" for i in range(90)]
    assert all(a.status == 200 and a.get("Authorization") == f"Bearer {TOKEN}" for a in answers)
    assert lane.count(True) > 0


async def test_a_call_arriving_while_one_is_in_progress_waits_for_it(
    served: Served, lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual way's answer may take a while (a store read, a refresh): a call that arrives
    meanwhile on the same connection must not overtake it, however quickly it could be answered."""
    from bff.proxy import edge

    real = edge.authorize

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await real(*args, **kwargs)

    monkeypatch.setattr(edge, "authorize", slow)
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(ask(served.cookie, "first", target="/bff/authz?usual"))
        await asyncio.sleep(0.2)  # the first is in progress (its answer is 0.5 s away)
        writer.write(ask(served.cookie, "second"))
        answers = await read_answers(reader, 2)
    finally:
        writer.close()
    assert [a.get("X-Request-ID") for a in answers] == ["first", "second"]
    assert lane == []  # the connection was busy: the lane was not even asked


async def test_a_burst_longer_than_the_parsers_queue_is_answered_whole(
    served: Served, lane: list[bool]
) -> None:
    """aiohttp's parser stops after 32 unconsumed messages and keeps the rest of the bytes: the
    lane consumes them at once, so it must ask the parser for the rest, or they would wait for
    the client's next packet (this client sends none: a hang)."""
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(b"".join(ask(served.cookie, f"r{i}") for i in range(500)))
        answers = await read_answers(reader, 500)
    finally:
        writer.close()
    assert [a.get("X-Request-ID") for a in answers] == [f"r{i}" for i in range(500)]
    assert lane.count(True) >= 400


async def test_a_burst_the_lane_answers_only_in_part_is_answered_whole(
    served: Served, lane: list[bool]
) -> None:
    """When the parser stopped at its queue limit and the lane left some of that batch to the
    usual way, the rest of the bytes must still be parsed once the queue drains, without the
    client sending anything more (found by review: a hang until the keep-alive timeout)."""
    usual = {31, 60}
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(
            b"".join(
                ask(
                    served.cookie,
                    f"r{i}",
                    target="/bff/authz?usual" if i in usual else "/bff/authz",
                )
                for i in range(100)
            )
        )
        answers = await read_answers(reader, 100)
    finally:
        writer.close()
    assert [a.get("X-Request-ID") for a in answers] == [f"r{i}" for i in range(100)]
    assert lane.count(True) >= 31


async def test_an_answer_the_lane_wrote_is_the_only_one_even_if_its_bookkeeping_fails(
    served: Served,
    lane: list[bool],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the lane wrote its answer, an error (here from the access line, once) must not send
    the request the usual way too: two answers to one request would pair every later answer on
    the connection with the wrong request."""
    from bff import access

    real = access.write
    failures = [RuntimeError("access line")]

    def broken_once(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        real(*args, **kwargs)

    monkeypatch.setattr(access, "write", broken_once)
    caplog.set_level(logging.INFO, logger="bff.access")  # access lines wanted: write is called
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(ask(served.cookie, "one"))
        writer.write(ask(served.cookie, "two", target="/bff/authz?usual"))
        answers = await read_answers(reader, 2)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == b""  # and nothing more
    finally:
        writer.close()
    assert [a.get("X-Request-ID") for a in answers] == ["one", "two"]
    assert lane == [True] and not failures
    assert any(r.msg == "fast_lane.bookkeeping_failed" for r in caplog.records)


async def test_a_websocket_handshakes_auth_call_is_counted_as_a_call_not_a_websocket(
    served: Served, lane: list[bool]
) -> None:
    """nginx passes ``Upgrade`` on to the auth call without ``Connection: upgrade``; the usual
    way counts that call under ``kind="proxy"``, and so must the lane."""
    metrics.flush()

    def count(kind: str) -> float:
        return sum(
            sample.value
            for metric in metrics.REQUEST_SECONDS.collect()
            for sample in metric.samples
            if sample.name.endswith("_count") and sample.labels.get("kind") == kind
        )

    before = {kind: count(kind) for kind in ("proxy", "websocket")}
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(
            ask(served.cookie, "ws").replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\n\r\n")
        )
        (answer,) = await read_answers(reader, 1)
    finally:
        writer.close()
    assert lane == [True] and answer.status == 200
    metrics.flush()
    assert count("proxy") == before["proxy"] + 1
    assert count("websocket") == before["websocket"]


async def test_a_client_that_does_not_read_gets_every_answer_in_order_once_it_does(
    served: Served, lane: list[bool]
) -> None:
    """The lane writes only while the connection's writing is not paused; past the transport's
    high-water mark the rest goes the usual way, which waits for the client (so bff stops
    reading instead of buffering answers without end)."""
    count = 20_000  # ~7 MB of answers: far beyond the socket buffers and the high-water mark
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
    sock.connect((HOST, served.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(b"".join(ask(served.cookie, f"r{i}") for i in range(count)))
        await asyncio.sleep(1)  # bff answers until the client's socket buffer is full
        answers = await read_answers(reader, count)
    finally:
        writer.close()
    assert [a.get("X-Request-ID") for a in answers] == [f"r{i}" for i in range(count)]
    assert lane.count(True) > 0 and lane.count(True) < count


async def test_the_keepalive_timeout_closes_a_connection_the_lane_answered(
    tmp_path: Path, lane: list[bool]
) -> None:
    settings = parse_settings(_settings(tmp_path), base_dir=tmp_path)
    app = create_app(settings)
    runner = FrontDoorRunner(app, limits=settings.limits, keepalive_timeout=2.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    try:
        cookie = await _session(app)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(ask(cookie, "r1"))
        (answer,) = await read_answers(reader, 1)
        # Calls for three keep-alive timeouts, each well within one of the last: all answered
        # on the one connection (each answer pushes the timeout back, as the usual way does).
        for i in range(30):
            await asyncio.sleep(0.2)
            writer.write(ask(cookie, f"r{i}"))
            (answer,) = await read_answers(reader, 1)
            assert answer.status == 200
        assert lane.count(True) >= 20  # each 5 s (cache_ttl) one goes the usual way
        async with asyncio.timeout(30):  # generous for a loaded machine; the timeout is 2 s
            assert await reader.read() == b""  # then idle: bff closed the connection
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_fast_answer_is_counted_and_logged(
    served: Served, lane: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    metrics.flush()
    before = metrics.REQUESTS.labels("/bff/authz", "GET", "200")._value.get()
    reader, writer = await asyncio.open_connection(HOST, served.port)
    with caplog.at_level(logging.INFO, logger="bff.access"):
        writer.write(ask(served.cookie, "logged-id"))
        await read_answers(reader, 1)
    writer.close()
    assert lane == [True]
    metrics.flush()
    assert metrics.REQUESTS.labels("/bff/authz", "GET", "200")._value.get() == before + 1
    (line,) = [r for r in caplog.records if getattr(r, "request_id", None) == "logged-id"]
    assert (line.route, line.status, line.method) == ("/bff/authz", 200, "GET")  # type: ignore[attr-defined]
    assert line.session != "-"  # type: ignore[attr-defined]
