"""``_method`` and its kin in queries, forms and JSON: what a route's ``methods:`` cannot see.

Rails (Rack::MethodOverride), Symfony and Laravel, Spring's HiddenHttpMethodFilter, ASP.NET
Core's method override and Express's method-override turn a ``POST`` carrying a ``_method``
parameter into the method it names, so ``POST /api/orders/1`` with ``_method=DELETE`` would be a
``DELETE`` that a route with ``methods: [GET, POST]`` never allowed. The override headers are
dropped in :mod:`bff.proxy.headers`; here are the parameters. Names are compared as the
frameworks read them: percent-decoded, ``+`` as space, any case (ASP.NET's form keys are
case-insensitive), PHP's mangling (leading spaces gone, ``.`` and space as ``_``, ``[...]``
suffixes), ``-`` as ``_``; ``&`` and ``;`` both separate parameters (Rack 2 splits on both).

The choices, and why:

* **Query string: the parameter is dropped** from what is forwarded, on every route, the rest of
  the query byte for byte. No legitimate SPA call needs it, and dropping costs nothing.
* **Form bodies (``application/x-www-form-urlencoded``, ``multipart/*``, and a body without a
  ``Content-Type``, which Rack parses as a form) and JSON bodies (Laravel reads a JSON body's
  ``_method`` like a form field): a body with an override parameter or key is refused with
  400**, on routes with a ``methods:`` list only. Rewriting would mean buffering whole
  bodies (and, for multipart, re-serialising them, whose byte-exactness no upstream parser
  promises); refusing lets the body stream as it came, scanned on the way, and an SPA that uses
  ``fetch`` never sends ``_method``. Without a ``methods:`` list every method is allowed
  directly, so an override gains nothing and the body is not scanned (no cost on upload routes).
  The scan keeps the newest chunk back until the next one has been scanned, so a refused body
  never reaches the upstream complete, and no framework acts on a body it has not finished.
  Multipart bodies are read with aiohttp's own multipart parser; a part without a name, a
  malformed body, the boundary anywhere but at the delimiters that parser saw (where a looser
  parser could find a part it did not), or a form body with a ``Content-Encoding`` (it cannot
  be scanned, and some servers decompress) is refused too.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import AsyncIterator
from typing import Final, cast
from urllib.parse import unquote_plus

from aiohttp import MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from bff.errors import BadRequest, MethodOverrideRefused

__all__ = ["body_scanner", "drop_override_params", "is_override_param"]

#: Parameter names (normalised as above) that some framework reads as the request's method.
_OVERRIDE_PARAMS: Final = frozenset(
    {"_method", "x_http_method_override", "x_http_method", "x_method_override"}
)
_SEPARATORS: Final = re.compile(r"[&;]")
_NAME_END: Final = re.compile(rb"[=&;]")
_STRING_STOP: Final = re.compile(rb'["\\]')  # what ends a run of plain string bytes
_NON_SPACE: Final = re.compile(rb"[^ \t\r\n]")
#: What every override name holds, lower-cased and unescaped (see is_override_param).
_SUSPICIOUS: Final = re.compile(rb"[_. -]method")
#: A whole JSON string (group 1: its raw content) and a ":" after it, if one follows.
_JSON_STRING: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"[ \t\r\n]*(:?)', re.DOTALL)
_VALUE_END: Final = re.compile(rb"[&;]")
#: A form parameter name longer than this is refused (no form has one; it bounds the scan).
MAX_NAME: Final = 1024
#: JSON keys longer than this (raw) cannot decode to an override name (7 characters, each at
#: most a 6-byte escape), so their bytes are not kept.
_MAX_JSON_KEY: Final = 64
#: Bytes allowed after a multipart body's closing boundary (browsers send none).
MAX_EPILOGUE: Final = 4096


def is_override_param(raw_name: str) -> bool:
    """Whether some framework reads a parameter called ``raw_name`` (as sent) as ``_method``."""
    name = unquote_plus(raw_name, encoding="latin-1").lower().lstrip(" \t\r\n\x0b\x0c")
    name = name.split("\x00", 1)[0].split("[", 1)[0]  # C strings end at NUL
    name = name.replace(" ", "_").replace(".", "_").replace("-", "_")
    return name in _OVERRIDE_PARAMS


def drop_override_params(query: str) -> str:
    """``query`` without its override parameters, otherwise exactly as sent."""
    if not query or ("%" not in query and "method" not in query.lower()):
        return query  # the hot path: no name here can decode to one of them
    pieces = _SEPARATORS.split(query)
    if not any(is_override_param(p.partition("=")[0]) for p in pieces):
        return query
    seps = _SEPARATORS.findall(query)
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if is_override_param(piece.partition("=")[0]):
            continue
        if out:
            out.append(seps[i - 1])
        out.append(piece)
    return "".join(out)


class _FormScanner:
    """Finds override names in an urlencoded body fed chunk by chunk (names may span chunks)."""

    __slots__ = ("_in_value", "_name")

    def __init__(self) -> None:
        self._name = bytearray()
        self._in_value = False

    def feed(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            if self._in_value:
                match = _VALUE_END.search(chunk, pos)
                if match is None:
                    return
                self._in_value = False
                pos = match.end()
                continue
            match = _NAME_END.search(chunk, pos)
            stop = match.start() if match is not None else end
            self._name += chunk[pos:stop]
            if len(self._name) > MAX_NAME:
                raise BadRequest("a form parameter name is too long")
            if match is None:
                return
            self._end_name()
            self._in_value = chunk[stop] == ord("=")
            pos = match.end()

    def close(self) -> None:
        if not self._in_value:
            self._end_name()

    def _end_name(self) -> None:
        name = self._name.decode("latin-1")
        self._name.clear()
        if is_override_param(name):
            raise MethodOverrideRefused()


class _JsonScanner:
    """Finds an override among the object keys of a JSON body fed chunk by chunk.

    Laravel reads a JSON body's ``_method`` like a form field. Only string boundaries are
    tracked (a quote, and a backslash escaping the next byte); a short string followed by
    ``:`` is a key, decoded by the json module. Keys at any depth count (Laravel reads the top
    level only): a little stricter, much simpler.
    """

    __slots__ = ("_candidate", "_escaped", "_in_string", "_string", "_too_long")

    def __init__(self) -> None:
        self._in_string = False
        self._escaped = False
        self._string = bytearray()  # the current string's raw bytes, while short
        self._too_long = False
        self._candidate: bytes | None = None  # a closed string, until the next byte says key

    def feed(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            if self._in_string:
                if self._escaped:  # the byte after a backslash, whatever it is
                    self._keep(chunk[pos : pos + 1])
                    self._escaped = False
                    pos += 1
                    continue
                match = _STRING_STOP.search(chunk, pos)
                stop = match.start() if match is not None else end
                self._keep(chunk[pos:stop])
                if match is None:
                    return
                pos = stop + 1
                if chunk[stop] == 0x5C:  # backslash
                    self._keep(b"\\")
                    self._escaped = True
                    continue
                self._in_string = False
                self._candidate = None if self._too_long else bytes(self._string)
            elif self._candidate is not None:  # a string just closed: a key if ":" follows
                match = _NON_SPACE.search(chunk, pos)
                if match is None:
                    return
                if chunk[match.start()] == 0x3A:
                    self._check(self._candidate)
                self._candidate = None
                pos = match.start()
            elif b"\\" not in chunk and not _SUSPICIOUS.search(chunk.lower(), pos):
                # The fastest path: no string here can be an override, and without escapes
                # the quotes alone say whether the chunk ends inside a string.
                if chunk.count(b'"', pos) % 2:
                    self._in_string = True
                    self._string.clear()
                    self._too_long = False
                    self._keep(chunk[chunk.rfind(b'"') + 1 :])
                return
            else:
                # The fast path: every whole string, and the ":" after it if one follows, by
                # the regex engine. Outside strings every quote opens one, and one that has no
                # match here is not closed in this chunk, so no later match can start inside it.
                for match in _JSON_STRING.finditer(chunk, pos):
                    if match.group(2):
                        self._check(match.group(1))
                    pos = match.end()
                    if pos == end and not match.group(2):  # a ":" may come in the next chunk
                        raw = match.group(1)
                        self._candidate = raw if len(raw) <= _MAX_JSON_KEY else None
                quote = chunk.find(b'"', pos)
                if quote < 0:
                    return
                self._in_string = True  # the string goes on in the next chunk
                self._string.clear()
                self._too_long = False
                pos = quote + 1

    def _keep(self, data: bytes) -> None:
        if not self._too_long:
            self._string += data
            self._too_long = len(self._string) > _MAX_JSON_KEY

    def close(self) -> None:
        pass

    @staticmethod
    def _check(raw: bytes) -> None:
        # Only a key with an escape or "_method" (or ".method", "-method", " method") in it
        # can decode to an override.
        if len(raw) > _MAX_JSON_KEY or (b"\\" not in raw and not _SUSPICIOUS.search(raw.lower())):
            return
        try:
            key = json.loads(b'"' + raw + b'"')
        except ValueError:
            return  # not a JSON string: the upstream refuses the body as well
        if is_override_param(key):
            raise MethodOverrideRefused()


async def _scanned(
    chunks: AsyncIterator[bytes], scanner: _FormScanner | _JsonScanner
) -> AsyncIterator[bytes]:
    held = b""
    async for chunk in chunks:
        scanner.feed(chunk)
        if held:
            yield held
        held = chunk
    scanner.close()
    if held:
        yield held


class _Tap:
    """The request body as aiohttp's multipart parser reads it, with every byte it pulls from
    the browser kept (once, in order) to be forwarded as it came, and the times the boundary
    occurs in those bytes counted."""

    __slots__ = ("_back", "_needle", "_new", "_source", "_tail", "hits")

    def __init__(self, source: StreamReader) -> None:
        self._source = source
        self._back = bytearray()  # what the parser gave back (unread_data); already kept
        self._new = bytearray()  # pulled from the browser since the last take()
        self._needle = b""
        self._tail = b""  # the last len(needle) - 1 bytes pulled: a boundary split by a chunk
        self.hits = 0

    def count(self, needle: bytes) -> None:
        """Count ``needle`` in every byte pulled from now on."""
        self._needle = needle

    def _pulled(self, data: bytes) -> None:
        self._new += data
        if self._needle and data:
            window = self._tail + data
            self.hits += window.count(self._needle)
            self._tail = window[1 - len(self._needle) :]

    def take(self) -> bytes:
        out = bytes(self._new)
        self._new.clear()
        return out

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        head = b""
        if self._back:
            i = self._back.find(b"\n")
            if i >= 0:
                line = bytes(self._back[: i + 1])
                del self._back[: i + 1]
                return line
            head = bytes(self._back)
            self._back.clear()
        if max_line_length is None:
            data = await self._source.readline()
        else:
            data = await self._source.readline(max_line_length=max_line_length)
        self._pulled(data)
        return head + data

    async def read(self, n: int = -1) -> bytes:
        if self._back:
            size = len(self._back) if n < 0 else min(n, len(self._back))
            out = bytes(self._back[:size])
            del self._back[:size]
            return out
        data = await self._source.read(n)
        self._pulled(data)
        return data

    def unread_data(self, data: bytes) -> None:
        self._back[:0] = data

    def at_eof(self) -> bool:
        return not self._back and self._source.at_eof()


async def _scanned_multipart(request: web.Request) -> AsyncIterator[bytes]:
    tap = _Tap(request.content)
    try:
        # The parser reads through the tap: it is duck-typed on StreamReader's read methods.
        reader = MultipartReader(request.headers, cast(StreamReader, tap))
    except (ValueError, AssertionError, KeyError):
        raise BadRequest("the multipart body is malformed") from None
    boundary = reader._boundary  # b"--" + boundary, as the parser matches it
    tap.count(boundary)
    parts = 0
    held = b""
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            parts += 1
            if isinstance(part, MultipartReader):
                raise BadRequest("nested multipart bodies are not accepted on this route")
            with warnings.catch_warnings():  # their text would quote the request
                warnings.simplefilter("ignore")
                name = part.name
            if name is None:
                raise BadRequest("a multipart part has no name")
            if is_override_param(name):
                raise MethodOverrideRefused()
            while True:
                chunk = await part.read_chunk()
                new = tap.take()
                if new:
                    if held:
                        yield held
                    held = new
                if not chunk:
                    break
        # After the closing boundary the parser has read up to two lines of epilogue itself.
        epilogue = list(reader._unread)
        size = sum(map(len, epilogue))
        while size <= MAX_EPILOGUE and (more := await tap.read(MAX_EPILOGUE + 1)):
            epilogue.append(more)
            size += len(more)
    except (ValueError, AssertionError, HttpProcessingError):
        raise BadRequest("the multipart body is malformed") from None
    # The boundary occurs only where this parser saw a delimiter: once per part and once to
    # close. Anywhere else (after a bare LF, which PHP takes for a line end; inside a part
    # whose Content-Length this parser believed; in the preamble or epilogue) another parser
    # could find a part this one never saw.
    if size > MAX_EPILOGUE or tap.hits != parts + 1:
        raise BadRequest("the multipart body is malformed")
    rest = held + tap.take()
    if rest:
        yield rest


def body_scanner(request: web.Request, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` (the request body), scanned for override parameters when it is a form.

    Raises :class:`BadRequest` at once for a form whose kind is ambiguous (several
    ``Content-Type`` lines) or that cannot be scanned (a ``Content-Encoding``).
    """
    types = request.headers.getall("Content-Type", ())
    if len(types) > 1:
        raise BadRequest("a request has one Content-Type")
    # By prefix, as the loosest readers do (PHP ends the type at ";", "," or a space).
    media = types[0].strip().lower() if types else ""
    form = not media or media.startswith("application/x-www-form-urlencoded")
    multipart = media.startswith("multipart/")
    as_json = "/json" in media or "+json" in media  # as Laravel's isJson() reads it
    if not form and not multipart and not as_json:
        return chunks
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise BadRequest("a body with a Content-Encoding cannot be checked on this route")
    if multipart:
        return _scanned_multipart(request)
    return _scanned(chunks, _FormScanner() if form else _JsonScanner())
