"""The upstream HTTP client of the proxy: keep-alive connections to one upstream, one exchange at
a time on each, on aiohttp's own low-level pieces (issue 11, point 4).

``aiohttp.ClientSession.request`` is general: per call it builds a URL, a ``ClientRequest`` with
its header merging, auto headers, cookie, auth, proxy and redirect handling, a connector key, a
timer and a ``ClientResponse``; for a proxied GET that was the largest single share of bff's CPU
time (see docs/design.md, "Performance"). The proxy needs none of that: its URL, headers and
body are final when it calls. So :class:`UpstreamPool` keeps only what an exchange needs, and
takes every part that reads or writes HTTP from aiohttp: the connection protocol and its
response parser (``aiohttp.client_proto.ResponseHandler``, llhttp), the header serialiser and
the body writer (``aiohttp.http_writer``). Nothing here parses HTTP.

What it keeps of the client's behaviour (the proxy's tests hold it to it): the request as aiohttp
would send it (``Host`` from the URL, the caller's headers in order, ``Content-Length: 0`` on a
body-less POST/PUT/PATCH/DELETE, a body streamed with the browser's ``Content-Length`` or else
chunked, written concurrently with the wait for the answer, under back-pressure); 1xx answers
skipped; errors as aiohttp's own exception types (``ClientError`` subclasses, and
``ConnectionTimeoutError`` for a connect that took longer than ``connect_timeout``); a connection
reused only once its answer was read to the end and neither side asked to close; one retry on a
fresh connection of an idempotent body-less request whose pooled connection turned out closed
(RFC 9112 9.3.1); at most ``limit`` connections; idle ones closed after ``keepalive_timeout``;
the upstream's name resolved once per ``DNS_TTL`` (aiohttp's ``ttl_dns_cache=300``) and its
addresses tried as aiohttp does (happy eyeballs, ``aiohappyeyeballs``); ``https`` verified with
the system's CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured) and the host name, ALPN
``http/1.1``, as aiohttp's default context; connect errors as aiohttp's
``ClientConnector*Error`` (the proxy logs the type's name). WebSockets still use an
``aiohttp.ClientSession`` (``Route.http``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Final, cast

import aiohappyeyeballs
import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_writer import StreamWriter, _serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ["UpstreamPool", "UpstreamResponse"]

_GET_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # aiohttp's: no body implied
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_READ_BUFSIZE: Final = 2**16  # aiohttp's defaults for the response parser
_MAX_LINE: Final = 8190
_MAX_FIELD: Final = 8190
_MAX_HEADERS: Final = 128
DNS_TTL: Final = 300.0  # seconds a resolved upstream name is reused (aiohttp's ttl_dns_cache)
_HAPPY_EYEBALLS_DELAY: Final = 0.25  # aiohttp's default

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def verified_context() -> ssl.SSLContext:
    """What aiohttp's client verifies with by default: the system's CAs (OpenSSL reads
    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` here), host name checked, ALPN ``http/1.1``."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


class _Resolver:
    """One upstream name's addresses, kept ``DNS_TTL`` seconds; concurrent connects share one
    look-up. One entry per pool (a pool has one origin), so it is bounded by the routes."""

    __slots__ = ("_addrs", "_expires", "_host", "_pending", "_port", "clock")

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._addrs: list[AddrInfo] = []
        self._expires = 0.0
        self._pending: asyncio.Future[list[AddrInfo]] | None = None
        self.clock = time.monotonic  # tests move time on

    async def resolve(self) -> list[AddrInfo]:
        if self._addrs and self.clock() < self._expires:
            return self._addrs
        pending = self._pending
        if pending is None:
            pending = self._pending = asyncio.ensure_future(self._lookup())
            pending.add_done_callback(self._done)
        return await asyncio.shield(pending)  # a cancelled caller leaves the look-up to others

    async def _lookup(self) -> list[AddrInfo]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
        )
        addrs: list[AddrInfo] = [
            (int(family), int(kind), proto, name, tuple(addr))
            for family, kind, proto, name, addr in infos
        ]
        if not addrs:
            raise OSError(f"no address for {self._host}")
        return addrs

    def _done(self, future: asyncio.Future[list[AddrInfo]]) -> None:
        self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._addrs = future.result()  # failures are not kept: the next connect asks again
            self._expires = self.clock() + DNS_TTL


class _Items:
    """A header list in the shape aiohttp's serialiser iterates (``.items()``), without a copy."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self._items = items

    def items(self) -> Sequence[tuple[str, str]]:
        return self._items


def _as_headers(items: Sequence[tuple[str, str]]) -> CIMultiDict[str]:
    # aiohttp's serialiser only iterates ``headers.items()``; duplicates and order are kept.
    return cast("CIMultiDict[str]", _Items(items))


class UpstreamResponse:
    """An upstream's answer: status, reason, headers, and its body as a stream."""

    __slots__ = ("_pool", "_protocol", "_writer", "content", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        protocol: ResponseHandler,
        writer: asyncio.Task[None] | None,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._pool = pool
        self._protocol: ResponseHandler | None = protocol
        self._writer = writer
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    async def read(self) -> bytes:
        """The whole body; the connection then goes back to the pool."""
        try:
            content = self.content
            if content.is_eof():  # all of it came already (a small answer, with its head)
                return content.read_nowait()
            return await content.read()
        finally:
            self.release()

    def release(self) -> None:
        """Done with the answer: the connection is reused if it was read to the end (and the
        request body sent in full), else closed."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            protocol.close()
            self._pool._closed()
            return
        if self.content.is_eof() and not protocol.should_close and protocol.is_connected():
            self._pool._put(protocol)
        else:
            protocol.close()
            self._pool._closed()

    def close(self) -> None:
        """Drop the connection now; a reader still waiting on the body gets a connection error."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        if not self.content.is_eof():
            self.content.set_exception(aiohttp.ClientConnectionError("Connection closed"))
        protocol.close()
        self._pool._closed()


class UpstreamPool:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://...``)."""

    def __init__(
        self,
        origin: str,
        *,
        connect_timeout: float | None,
        limit: int = 1000,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = URL(origin)
        self._host = url.raw_host or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._host_header = url.host_port_subcomponent or self._host
        self._ssl: ssl.SSLContext | None = None
        self._server_hostname: str | None = None
        if url.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else verified_context()
            self._server_hostname = self._host.rstrip(".")  # as aiohttp: SNI without the root dot
        self._key = ConnectionKey(
            self._host, self._port, self._ssl is not None, self._ssl or True, None, None, None
        )
        # An address needs no look-up (asyncio takes it as it is); a name gets the cache.
        self._resolver = None if _is_address(self._host) else _Resolver(self._host, self._port)
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._idle: deque[tuple[ResponseHandler, float]] = deque()
        self._open = 0  # connections in use or idle
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send ``method target`` with ``headers`` (and ``body``, streamed); the answer's head.

        Raises ``aiohttp.ClientError`` subclasses as ``ClientSession.request`` would."""
        fields = [("Host", self._host_header), *headers]
        length: int | None = None
        if body is None:
            if method not in _GET_METHODS and not _has(headers, "content-length"):
                fields.append(("Content-Length", "0"))
        else:
            given = _get(headers, "content-length")
            if given is not None:
                length = int(given)
            else:
                fields.append(("Transfer-Encoding", "chunked"))
        status_line = f"{method} {target} HTTP/1.1"
        try:
            data = _serialize_headers(status_line, _as_headers(fields))  # refuses CR and LF
        except ValueError as exc:
            raise aiohttp.ClientError(str(exc)) from None
        retry = body is None and method in _IDEMPOTENT
        head = method == "HEAD"
        while True:
            protocol = self._idle_connection()
            reused = protocol is not None
            if protocol is None:
                protocol, reused = await self._new_connection()
            try:
                if body is None:
                    return await self._exchange(protocol, head, data, None)
                sending = _send_body(protocol, status_line, fields, body, length)
                return await self._exchange(protocol, head, data, sending)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if not (retry and reused):
                    raise
                retry = False  # the pooled connection was closed under us: once more, fresh

    async def _exchange(
        self,
        protocol: ResponseHandler,
        head: bool,
        data: bytes,
        sending: Coroutine[None, None, None] | None,
    ) -> UpstreamResponse:
        """One request on ``protocol``: ``data`` (the head) alone, or ``sending`` (head and
        body) in a task of its own, so that an answer that comes before the body's end is read
        at once."""
        writer: asyncio.Task[None] | None = None
        try:
            protocol.set_response_params(
                skip_payload=head,
                read_until_eof=True,  # an answer without length or chunks ends with the socket
                auto_decompress=False,  # bodies pass through as they are
                read_bufsize=_READ_BUFSIZE,
                max_line_size=_MAX_LINE,
                max_field_size=_MAX_FIELD,
                max_headers=_MAX_HEADERS,
            )
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise aiohttp.ServerDisconnectedError()
            if sending is None:
                transport.write(data)
            else:
                writer = asyncio.get_running_loop().create_task(sending)
                sending = None
            while True:
                message, payload = await protocol.read()
                if message.code < 100 or message.code > 199 or message.code == 101:
                    break
            return UpstreamResponse(
                self, protocol, writer, message.code, message.reason, message.headers, payload
            )
        except BaseException:
            if sending is not None:
                sending.close()  # never started
            if writer is not None and not writer.done():
                writer.cancel()
            protocol.close()
            self._closed()
            raise

    def _idle_connection(self) -> ResponseHandler | None:
        """The most recently used idle connection still open, if any (no wait, no await)."""
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            protocol, since = idle.pop()
            if now - since < self._keepalive and protocol.is_connected():
                return protocol
            protocol.close()
            self._open -= 1
        return None

    async def _new_connection(self) -> tuple[ResponseHandler, bool]:
        """Once one may be opened, a new connection (and False); or an idle one handed back
        while waiting for the limit (and True)."""
        idle = self._idle
        while self._open >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the turn passes to the next waiter
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if idle:
                return idle.pop()[0], True
        self._open += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._closed()
            raise

    async def _connect(self) -> ResponseHandler:
        """A new connection, errors as aiohttp's connector raises them. ``connect_timeout``
        bounds what aiohttp's ``sock_connect`` bounded: the TCP connect and the TLS handshake
        (the name's look-up, cached, is under the route's own timeout, as before)."""
        loop = asyncio.get_running_loop()
        addrs: list[AddrInfo] | None = None
        if self._resolver is not None:
            try:
                addrs = await self._resolver.resolve()
            except OSError as exc:
                raise aiohttp.ClientConnectorDNSError(self._key, exc) from None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if addrs is None:
                    _, protocol = await loop.create_connection(
                        lambda: ResponseHandler(loop),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname,
                    )
                else:
                    sock = await aiohappyeyeballs.start_connection(
                        addrs, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY, loop=loop
                    )
                    _, protocol = await loop.create_connection(
                        lambda: ResponseHandler(loop),
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname,
                    )
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError("connection timeout to the upstream") from None
        except ssl.CertificateError as exc:
            raise aiohttp.ClientConnectorCertificateError(self._key, exc) from None
        except ssl.SSLError as exc:
            raise aiohttp.ClientConnectorSSLError(self._key, exc) from None
        except OSError as exc:
            raise aiohttp.ClientConnectorError(self._key, exc) from None
        return protocol

    def _put(self, protocol: ResponseHandler) -> None:
        if self._closing:
            protocol.close()
            self._closed()
            return
        idle = self._idle
        now = time.monotonic()
        # The oldest idle ones first: a busy pool never reaches them otherwise.
        while idle and now - idle[0][1] >= self._keepalive:
            idle.popleft()[0].close()
            self._open -= 1
        idle.append((protocol, now))
        self._wake()

    def _closed(self) -> None:
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            self._idle.pop()[0].close()
            self._open -= 1


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _get(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _has(headers: Sequence[tuple[str, str]], name: str) -> bool:
    return _get(headers, name) is not None


async def _send_body(
    protocol: ResponseHandler,
    status_line: str,
    head: Sequence[tuple[str, str]],
    body: AsyncIterator[bytes],
    length: int | None,
) -> None:
    """Write the head and the body as it comes, under the transport's back-pressure. A failure
    (the browser's body broke, the scan refused it, the socket went) fails the exchange: the
    waiting read gets it as a ``ClientError``, as with aiohttp's client."""
    writer = StreamWriter(protocol, asyncio.get_running_loop())
    if length is not None:
        writer.length = length
    else:
        writer.enable_chunking()
    try:
        await writer.write_headers(status_line, _as_headers(head))
        writer.send_headers()  # now: the upstream may start on the head before the first chunk
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        protocol.set_exception(aiohttp.ClientOSError(exc.errno, exc.strerror), exc)
        protocol.close()
    except Exception as exc:
        protocol.set_exception(aiohttp.ClientPayloadError("failed to send the request body"), exc)
        protocol.close()
