"""The front door: the one place that turns a ``web.Application`` and its settings into sockets.

Every byte that enters bff is either a well-formed request that the app handles, or a clean
4xx that echoes nothing and closes the connection (issue 9, points 1, 2, 3 and 5):

* **Parse errors** (aiohttp's llhttp parser refuses the bytes): aiohttp's own answer is a
  ``text/plain`` page holding the parser's message, which quotes the raw request, so a page
  script that inflates ``document.cookie`` past the limit could read the HttpOnly cookie back.
  :class:`FrontDoorHandler` answers a fixed JSON body instead (:data:`MALFORMED` 400,
  :data:`TOO_LARGE` 431) and logs a fixed event, never the exception text.
* **Framing the parser lets through** (:func:`framing_problem`, run before routing and before
  aiohttp's ``Expect`` handling, on what the parser already split). Measured with raw sockets
  against aiohttp 3.14.5's llhttp, these reach a handler: ``GET /`` with no version (HTTP/0.9),
  ``HTTP/2.0``, Transfer-Encoding in HTTP/1.0, an empty Transfer-Encoding, ``gzip, chunked``,
  ``CONNECT``, ``OPTIONS *``, a ``#`` in the target, header bytes that are not UTF-8, and any
  ``Expect`` (aiohttp's 417 page echoes it; an undecodable one made a 500), an ``Upgrade`` other
  than ``websocket`` with ``Connection: upgrade`` (llhttp stops there and aiohttp drops the bytes
  pipelined behind it), ``Upgrade: websocket`` on a POST, and TRACE. All refused here. llhttp
  itself refuses a target followed by no version, ``HTTP/1.2``, a tab or lower-case method,
  controls/CR/LF/NUL/non-ASCII in the target, ``*`` with GET, TRACK, TE with Content-Length, TE
  ``chunked, chunked``/``identity``/``gzip``/two TE fields, duplicate or list Content-Length
  (``5, 5`` too), a non-digit Content-Length, obs-fold, bare CR, bare LF, NUL and other controls
  in values, whitespace in or before header names, a second Host, and bad chunk framing. Repeated
  SP in the request line is parsed on word boundaries, which RFC 9112 section 3 allows.
* **A body that breaks mid-stream** (a bad chunk after the headers went upstream): aiohttp
  leaves that request's payload open, so the handler would wait for the route's timeout;
  :meth:`FrontDoorHandler.data_received` fails it and the gate answers 400.
* **Limits** (``limits:`` in the config) map to aiohttp's handler arguments; in aiohttp 3.14
  ``max_line_size`` bounds the request-target (not the method or version), ``max_field_size``
  bounds one header field's name plus value (a long ``Cookie`` is one field), ``max_headers``
  the number of fields. The whole header block is thus at most ``max_headers * max_field_size``.
* **No banner, no traceback**: fixed responses carry no ``Server`` header (the app's responses
  lose it in ``security_headers``); a 500 from the library is the fixed :data:`INTERNAL` body,
  and what gets logged is the exception's type and its frames (file, line, function), never its
  message, which may quote header values.

Header values that are UTF-8 but not ASCII (obs-text) pass, and reach an upstream byte-exact:
aiohttp decodes them as UTF-8 and its client encodes them back as UTF-8. Values that are not
UTF-8 are refused with 400: aiohttp's client would silently drop their undecodable bytes (the
surrogate escapes), so the upstream would get a different, possibly empty, value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from bff.config import LimitSettings, Settings
from bff.proxy.direct import DIRECT, DirectPath

__all__ = [
    "BODY_TOO_LARGE",
    "EXPECTATION_FAILED",
    "INTERNAL",
    "MALFORMED",
    "METHOD_NOT_ALLOWED",
    "TOO_LARGE",
    "FrontDoorHandler",
    "FrontDoorRunner",
    "FrontDoorServer",
    "Refusal",
    "framing_problem",
    "listen",
    "refusal_for_error",
    "run",
    "serve",
    "stop_signals",
]

log = logging.getLogger("bff.http")

RawHeaders = Sequence[tuple[bytes, bytes]]
Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """One fixed answer: its status, its JSON body (built once) and a reason for the log."""

    status: int
    error: str
    reason: str  # the log's category; never request data
    body: bytes = field(repr=False)


def _refusal(status: int, error: str, description: str, reason: str) -> Refusal:
    body = {"error": error, "error_description": description}
    return Refusal(status, error, reason, json.dumps(body, separators=(",", ":")).encode())


MALFORMED: Final = _refusal(400, "invalid_request", "malformed request", "malformed")
TOO_LARGE: Final = _refusal(
    431, "request_header_fields_too_large", "request header fields too large", "too_large"
)
BODY_TOO_LARGE: Final = _refusal(413, "request_too_large", "request body too large", "body")
EXPECTATION_FAILED: Final = _refusal(
    417, "expectation_failed", "only Expect: 100-continue is supported", "expect"
)
INTERNAL: Final = _refusal(500, "server_error", "internal error", "internal")
TIMEOUT: Final = _refusal(504, "timeout", "the request timed out", "timeout")

# One reason per rule, for the log; the answer is the generic one.
_BAD_VERSION: Final = replace(MALFORMED, reason="version")
_BAD_TARGET: Final = replace(MALFORMED, reason="target")
_BAD_VALUE: Final = replace(MALFORMED, reason="header_bytes")
_BAD_LENGTH: Final = replace(MALFORMED, reason="content_length")
_BAD_CODING: Final = replace(MALFORMED, reason="transfer_encoding")
_CONNECT: Final = replace(MALFORMED, reason="connect")  # 4xx: no client makes a 5xx
_BAD_UPGRADE: Final = replace(MALFORMED, reason="upgrade")
#: RFC 9110 9.3.8: a TRACE must carry no credentials, and an upstream that implements it reflects
#: the request, bearer and all. TRACK is IIS's TRACE. Refused whatever a route's ``methods:`` say.
METHOD_NOT_ALLOWED: Final = _refusal(
    405, "method_not_allowed", "this method is not allowed", "method"
)
_REFUSED_METHODS: Final = frozenset({"TRACE", "TRACK"})

_TE: Final = b"transfer-encoding"
_CL: Final = b"content-length"
_EXPECT: Final = b"expect"
_CONNECTION: Final = b"connection"
_UPGRADE: Final = b"upgrade"
_EXPECT_NAME: Final = "Expect"


def framing_problem(
    version: HttpVersion, method: str, target: str, raw_headers: RawHeaders
) -> Refusal | None:
    """What is wrong with a parsed request's framing, or None; cheap enough for every request.

    The rules (RFC 9112): section 2.3/3, HTTP/1.0 or HTTP/1.1 only; section 3.2, an origin-form
    or absolute-form target of visible ASCII without a fragment (no CONNECT, no ``*``); section
    6.1, Transfer-Encoding only in HTTP/1.1, only as one lone ``chunked``, never with
    Content-Length; section 6.3, at most one Content-Length, digits only; sections 5.5 and 11.2,
    header values that are UTF-8 (aiohttp's client would mangle anything else). RFC 9110 10.1.1:
    an Expect other than ``100-continue`` is 417. RFC 9110 7.8 and RFC 6455 4.1: the only
    upgrade is one ``Upgrade: websocket`` on a GET; for any other ``Upgrade`` next to
    ``Connection: upgrade``, llhttp stops parsing and aiohttp drops whatever was pipelined
    behind it, so the next answer on the connection would pair with the wrong request. RFC 9110
    9.3.8: TRACE (and TRACK) are 405, before any credential is attached.
    """
    if version != HttpVersion11 and version != HttpVersion10:
        return _BAD_VERSION
    if method == "CONNECT":
        return _CONNECT
    if method in _REFUSED_METHODS:
        return METHOD_NOT_ALLOWED
    if not (
        target.isascii()
        and target.isprintable()
        and " " not in target
        and "#" not in target
        and (target[:1] == "/" or target[:8].lower().startswith(("http://", "https://")))
    ):
        return _BAD_TARGET
    te_count = cl_count = 0
    te_value = b""
    connection_upgrade = False
    upgrades: list[bytes] = []
    for name, value in raw_headers:
        if not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return _BAD_VALUE
        size = len(name)
        if size == 17 and name.lower() == _TE:
            te_count += 1
            te_value = value
        elif size == 14 and name.lower() == _CL:
            cl_count += 1
            if not value.isdigit():  # bytes.isdigit: ASCII digits only
                return _BAD_LENGTH
        elif size == 6 and name.lower() == _EXPECT and value.lower() != b"100-continue":
            return EXPECTATION_FAILED
        elif size == 10 and name.lower() == _CONNECTION:
            # A substring, not a token: wider than llhttp's own reading of the list, never narrower.
            connection_upgrade = connection_upgrade or _UPGRADE in value.lower()
        elif size == 7 and name.lower() == _UPGRADE:
            upgrades.append(value.strip(b" \t").lower())
    if upgrades and (
        (connection_upgrade and upgrades != [b"websocket"])
        or (method != "GET" and b"websocket" in upgrades)
    ):
        return _BAD_UPGRADE
    if cl_count > 1:
        return _BAD_LENGTH
    if te_count:
        if te_count > 1 or cl_count or version == HttpVersion10:
            return _BAD_CODING
        if te_value.strip(b" \t").lower() != b"chunked":
            return _BAD_CODING
    return None


def refusal_for_error(status: int, exc: BaseException | None) -> Refusal:
    """The fixed answer for an error aiohttp hands to ``handle_error`` (parse error, 500, 504)."""
    if isinstance(exc, LineTooLong):
        return TOO_LARGE
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return TOO_LARGE
    if status == 504:
        return TIMEOUT
    if 400 <= status < 500:
        return MALFORMED
    return INTERNAL


class _MalformedBody(RequestPayloadError):
    """The parser refused the rest of a body that a handler is still reading."""


class _FixedResponse(web.Response):
    """A refusal on the wire: fixed JSON, ``Connection: close``, no ``Server``, HTTP/1.1."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(
            status=refusal.status,
            body=refusal.body,
            content_type="application/json",
            headers={
                "Cache-Control": "no-store",
                "Connection": "close",
                "X-Content-Type-Options": "nosniff",
            },
        )
        self.force_close()

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)  # aiohttp adds its banner in _prepare_headers

    async def _write_headers(self) -> None:
        # aiohttp echoes the request's version (HTTP/0.9, HTTP/2.0 for what we refuse).
        writer = self._payload_writer
        assert writer is not None
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)
        if self._send_headers_immediately:
            writer.send_headers()


def _where(exc: BaseException | None) -> str:
    """Where an exception came from, without its message (which may quote request bytes)."""
    if exc is None:
        return ""
    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    return " < ".join(f"{PurePath(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames))


def _log_refusal(refusal: Refusal, client: str | None, exc: BaseException | None = None) -> None:
    extra: dict[str, Any] = {
        "event": "http.refused",
        "status": refusal.status,
        "reason": refusal.reason,
        "client": client or "",
    }
    if refusal is INTERNAL or refusal is TIMEOUT:
        extra["event"] = "http.failed"
        extra["error"] = type(exc).__name__ if exc is not None else ""
        extra["where"] = _where(exc)
        log.error("http.failed", extra=extra)
    else:
        log.info("http.refused", extra=extra)


async def _refuse(request: BaseRequest, refusal: Refusal) -> web.StreamResponse:
    """Send ``refusal`` and close the connection now: no lingering read of the rest."""
    response = _FixedResponse(refusal)
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the transport flushes the answer, then closes
    return response


class _LaneParser:
    """aiohttp's request parser, with the fast lane's answers taken out of what it returns.

    :class:`FrontDoorHandler` puts it in place of the parser it was built with; every other
    use of the parser (pausing, ``message_consumed``, upgrades) goes to the real one.
    """

    __slots__ = ("_handler", "_inner")

    def __init__(self, inner: Any, handler: FrontDoorHandler) -> None:
        self._inner = inner
        self._handler = handler

    def feed_data(self, data: bytes) -> tuple[Sequence[Any], bool, bytes]:
        messages, upgraded, tail = self._inner.feed_data(data)
        while messages and not upgraded:
            kept = self._handler.answer_now(messages)
            if len(messages) < MAX_MSG_QUEUE_SIZE:
                return kept, upgraded, tail
            # The parser stopped at its queue limit and kept the rest of the bytes back. All
            # answered: go on with them now. Some left for start(): fewer than the limit reach
            # its queue, so aiohttp would not pause reading, and nothing would parse the rest
            # before the client's next packet (a hang); pause as a full queue does, and start()
            # parses the rest once it drained the queue.
            if kept:
                self._handler.pause_for_queue()
                return kept, upgraded, tail
            messages, upgraded, tail = self._inner.feed_data(b"")
        return messages, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FrontDoorHandler(RequestHandler):
    """aiohttp's per-connection protocol with fixed error answers and logs without request data,
    and a fast lane for the calls that :meth:`DirectPath.answer_now` can answer."""

    __slots__ = ("_lane",)

    def __init__(self, manager: Server, *, lane: DirectPath | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._lane = lane
        if lane is not None and lane.now_paths:
            self._parser = cast(Any, _LaneParser(self._parser, self))

    def answer_now(self, messages: Sequence[Any]) -> Sequence[Any]:
        """Answer what can be answered at once, in order; the rest goes the usual way.

        The fast lane (issue 11, point 4): a request with no body to a path of
        :attr:`DirectPath.now_paths` (edge mode's auth endpoint), that passes the gate's
        framing rules, asks for no ``Expect`` handling and no close, arriving while the
        connection is idle (nothing queued, nothing in progress, so answers keep their order) and
        its writing is not paused (so nothing waits on a client that does not read), is answered
        right here in ``data_received`` when the session cache can decide it: the same answer,
        request id, metrics and access line as through :meth:`DirectPath.handle`, without a task,
        a coroutine or a second turn of the event loop. Anything else, including a call that
        needs the store or a refresh, is left in the queue for ``start()``.
        """
        waiter = self._waiter
        if self._messages or waiter is None or waiter.done() or self._close:
            return messages
        for index, (message, payload) in enumerate(messages):
            if not self._answered(message, payload):
                return messages[index:]
        return ()

    def pause_for_queue(self) -> None:
        """What aiohttp does when its message queue is full (see :class:`_LaneParser`)."""
        if not self._buffer_paused:
            self._pause_reading_for_buffer()

    def _answered(self, message: Any, payload: Any) -> bool:
        lane = self._lane
        entry = lane.exact(message.path) if lane is not None else None
        transport = self.transport
        if (
            entry is None
            or message.method != "GET"
            or message.version != HttpVersion11
            or payload is not EMPTY_PAYLOAD
            or message.should_close
            or self._paused
            or transport is None
            or self._request_factory is None
            or _EXPECT_NAME in message.headers
            or framing_problem(message.version, message.method, message.path, message.raw_headers)
        ):
            return False
        assert lane is not None
        request = self._request_factory(
            message, payload, self, StreamWriter(self, self._loop), cast(Any, self._task_handler)
        )
        try:
            if not lane.answer_now(cast(web.Request, request), entry, transport.write):
                return False
        except Exception as exc:  # a bug before anything was written (answer_now's promise):
            self.log_exception("fast lane", exc_info=exc)  # the usual way answers it, a 500
            return False
        if self._parser is not None:
            self._parser.message_consumed()
        self._request_count += 1
        if self._manager is not None:
            self._manager.requests_count += 1
        # As start() does after each request: the idle connection closes keepalive_timeout
        # after this answer, not after the last one that went the usual way.
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
        return True

    def data_received(self, data: bytes) -> None:
        """A parse error in the middle of a body (a bad chunk arriving after the headers went
        upstream) leaves aiohttp's payload of that request open forever: the handler would wait
        for the route's timeout. Fail the payload instead; the gate then answers 400."""
        queued = len(self._messages)
        super().data_received(data)
        request = self._current_request
        if (
            request is not None
            and len(self._messages) > queued
            and isinstance(self._messages[-1][0], _ErrInfo)
            and not request.content.is_eof()
        ):
            request.content.set_exception(_MalformedBody("malformed request body"))

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        refusal = refusal_for_error(status, exc)
        _log_refusal(refusal, request.remote, exc)
        if request.writer.output_size > 0:
            # Some of a response went out already: no second one, aiohttp drops the connection.
            raise ConnectionError("response already started")
        return _FixedResponse(refusal)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if exc is True or exc is None:
            exc = sys.exc_info()[1]
        log.error(
            "http.internal_error",
            extra={
                "event": "http.internal_error",
                "error": type(exc).__name__ if isinstance(exc, BaseException) else "",
                "where": _where(exc if isinstance(exc, BaseException) else None),
            },
        )

    def log_debug(self, *args: Any, **kw: Any) -> None:
        if self.debug and args and isinstance(args[0], str):
            # aiohttp's own fixed text only: no arguments, no exc_info.
            log.debug("http.debug", extra={"event": "http.debug", "detail": args[0]})


class FrontDoorServer(Server):
    """aiohttp's ``Server`` with :class:`FrontDoorHandler` and :func:`framing_problem` in front
    of the app: a refused request never reaches routing, ``Expect`` handling or a handler."""

    def __init__(
        self, handler: Handler, *, direct: DirectPath | None = None, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.request_handler = self._gate(handler, direct)
        self._direct = direct

    @staticmethod
    def _gate(handler: Handler, direct: DirectPath | None) -> Handler:
        async def gate(request: BaseRequest) -> web.StreamResponse:
            refusal = framing_problem(
                request.version, request.method, request.raw_path, request.raw_headers
            )
            if refusal is not None:
                _log_refusal(refusal, request.remote)
                return await _refuse(request, refusal)
            entry = direct.match(request) if direct is not None else None
            try:
                if entry is not None:  # a proxied route: no router, no middleware chain
                    assert direct is not None
                    response = await direct.handle(cast(web.Request, request), entry)
                else:
                    response = await handler(request)
            except web.HTTPRequestEntityTooLarge:  # client_max_size of bff's own endpoints
                _log_refusal(BODY_TOO_LARGE, request.remote)
                return await _refuse(request, BODY_TOO_LARGE)
            if isinstance(request.content.exception(), _MalformedBody) and not response.prepared:
                # The handler's answer to a broken body (a 502 from the proxy) is not the truth.
                _log_refusal(MALFORMED, request.remote)
                return await _refuse(request, MALFORMED)
            return response

        return gate

    def __call__(self) -> RequestHandler:
        return FrontDoorHandler(self, lane=self._direct, loop=self._loop, **self._kwargs)


class FrontDoorRunner(web.AppRunner):
    """``web.AppRunner`` serving through :class:`FrontDoorServer` with the configured limits."""

    def __init__(self, app: web.Application, *, limits: LimitSettings, **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)  # it would log full URLs (the callback's code)
        kwargs.setdefault("keepalive_timeout", 75.0)
        super().__init__(
            app,
            max_line_size=limits.max_request_line,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            **kwargs,
        )

    async def _make_server(self) -> Server:
        base = await super()._make_server()  # runs the app's startup and freezes it
        return FrontDoorServer(
            base.request_handler,
            direct=self.app.get(DIRECT),
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )


async def listen(
    app: web.Application,
    settings: Settings,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    shutdown_timeout: float = 5.0,
) -> FrontDoorRunner:
    """Start serving ``app`` on ``host:port``; the caller ``cleanup()``s the returned runner."""
    runner = FrontDoorRunner(app, limits=settings.limits, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets.

    A second signal must not kill a process that is already stopping: ``bff run --workers N``
    forwards SIGTERM to workers that got the same signal from the terminal or the service
    manager, at any moment of their graceful stop. So the handlers stay for the whole block, and
    once a signal asked for the stop, both signals are ignored for the little that is left of the
    process's life (exit status 0, not death by the late signal).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
            if stop.is_set():
                signal.signal(signum, signal.SIG_IGN)


async def serve(
    app: web.Application, settings: Settings, host: str, port: int, *, reuse_port: bool = False
) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (5 s for requests in flight)."""
    with stop_signals() as stop:
        runner = await listen(app, settings, host, port, reuse_port=reuse_port)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def run(
    app: web.Application, settings: Settings, host: str, port: int, *, reuse_port: bool = False
) -> None:
    """Blocking :func:`serve` on a new event loop (uvloop when its policy is installed)."""
    asyncio.run(serve(app, settings, host, port, reuse_port=reuse_port))
