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
  be scanned, and some servers decompress) is refused too. Whatever that parser raises on the
  browser's bytes (``ValueError``, ``RuntimeError``, ``LookupError``, ...) is a 400, never an
  upstream error; a part header it would warn about is refused before it warns (the warning's
  text quotes the request).
* **Everywhere a looser or different reader could see another body, refuse.** On those same
  routes: a declared ``charset`` other than UTF-8 or US-ASCII (any case, quoted or not), two
  of them, or ``charset`` anywhere but as a parameter is refused with 400
  ``unsupported_charset`` before anything is forwarded (Spring and ASP.NET Core honour a
  UTF-16 or EBCDIC form, where ``_\x00m\x00...`` is ``_method``; none is fine: UTF-8). A
  multipart ``Content-Type`` must have ``boundary`` once outside the boundary's own value (PHP
  takes the first ``boundary`` anywhere, even ``xboundary=`` or one inside another value), and
  a boundary of plain characters only (PHP ends ``abc, xyz`` at the comma). A part needs
  exactly one ``form-data`` Content-Disposition with one ``name`` (or ``name*``) parameter; a
  form field or part named ``_charset_`` (HTML's name for the form's encoding; RFC 7578 4.6
  makes it the other parts' charset, Sling decodes a form by it), nested multipart,
  a part whose Content-Type has another charset, and a part with a Content-Transfer-Encoding
  other than 7bit/8bit/binary or a Content-Encoding (RFC 7578 deprecates them; some parsers
  decode base64 or quoted-printable) are refused. Browsers send none of these.
* **Every byte kept is bounded**, so a scanned body never makes bff hold more than a few
  dozen KiB however long it is: a form parameter name (``MAX_NAME``), the raw JSON key
  (64 bytes), a multipart preamble (``MAX_PREAMBLE``, browsers send none) and epilogue
  (``MAX_EPILOGUE``), a part's boundary line and headers (``MAX_PART_HEAD``, 8 lines), and the
  parser's look-ahead for one content chunk; a longer one is refused with 400 as it arrives.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import AsyncIterator
from typing import Any, Final, cast
from urllib.parse import unquote_plus

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.multipart import parse_content_disposition
from multidict import CIMultiDictProxy

from bff.errors import BadRequest, BffError, MethodOverrideRefused, UnsupportedCharset

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
#: Bytes allowed before a multipart body's first boundary (browsers send none).
MAX_PREAMBLE: Final = 4096
#: Bytes of a multipart part's boundary line and header block (a browser's are a few hundred;
#: a long file name, percent-encoded, a few thousand).
MAX_PART_HEAD: Final = 16384
#: Header lines in a multipart part (browsers send at most two).
_MAX_PART_HEADERS: Final = 8
#: Bytes the multipart parser may pull from the browser for one content chunk: its chunks are
#: 8 KiB, and it reads up to two, plus the boundary, to find the delimiter.
_MAX_CHUNK_PULL: Final = 4 * 8192
#: The most bytes held between two releases to the upstream: the preamble, a part's head and
#: its first content chunk.
_MAX_PULLED: Final = MAX_PREAMBLE + MAX_PART_HEAD + _MAX_CHUNK_PULL
#: The only charsets a checked body may declare: the scan reads names as UTF-8 or ASCII, and a
#: server that honours a declared UTF-16 or EBCDIC would read names this scan never saw.
_CHARSETS: Final = frozenset({"utf-8", "us-ascii"})
#: Every ``charset`` in a Content-Type: the parameter, its value, and whether a ``;`` or the end
#: follows (group 2 is empty for ``charset`` anywhere else, e.g. inside another value).
_CHARSET_PARAM: Final = re.compile(
    r'charset(?:[ \t]*=[ \t]*(?:"([^"\\]*)"|([^;," \t]*))[ \t]*(?=;|$))?'
)
#: A boundary every parser reads alike (browsers', curl's and aiohttp's all are): RFC 2046's
#: characters without the space, comma, quote, ``=`` and the rest that some parsers end it at
#: (PHP cuts ``boundary=abc, xyz`` to ``abc``, then finds its delimiter inside aiohttp's).
_PLAIN_BOUNDARY: Final = re.compile(rb"--[0-9A-Za-z'()+_.-]{1,70}")
#: Content-Transfer-Encodings a part may have: the identity ones (RFC 7578 deprecates the rest,
#: and a parser that decodes base64 or quoted-printable would read what this scan did not).
_IDENTITY_TRANSFER: Final = frozenset({"7bit", "8bit", "binary"})


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
        if "charset" in name.lower() and _is_charset_param(name):
            raise UnsupportedCharset()  # servers that honour it (Sling) decode the rest by it


def _is_charset_param(raw_name: str) -> bool:
    """Whether ``raw_name`` is ``_charset_`` (HTML's field naming the form's encoding)."""
    return unquote_plus(raw_name, encoding="latin-1").strip().lower() == "_charset_"


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
        if not self._too_long:  # at most one byte past the bound, however long the chunk
            self._string += data[: _MAX_JSON_KEY + 1 - len(self._string)]
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
    occurs in those bytes counted.

    What the parser may pull is bounded, so no body makes it hold more whatever its lines:
    ``MAX_PREAMBLE`` before the first boundary, then what ``limit_to`` allows for the step the
    parser is about to take (a part's head, a content chunk, the epilogue). Lines are read with
    at most the room left, so one endless line is cut short too.
    """

    __slots__ = ("_back", "_budget", "_needle", "_new", "_source", "_tail", "hits")

    def __init__(self, source: StreamReader) -> None:
        self._source = source
        self._back = bytearray()  # what the parser gave back (unread_data); already kept
        self._new = bytearray()  # pulled from the browser since the last take()
        self._needle = b""
        self._tail = b""  # the last len(needle) - 1 bytes pulled: a boundary split by a chunk
        self._budget = 0  # bytes the parser may still pull in this step
        self.hits = 0

    def count(self, needle: bytes) -> None:
        """Count ``needle`` in every byte pulled from now on."""
        self._needle = needle

    def limit_to(self, size: int) -> None:
        """Let the parser pull at most ``size`` bytes from now on."""
        self._budget = size

    def _room(self) -> int:
        if not self.hits:  # the preamble, and the first boundary line after it
            return min(self._budget, MAX_PREAMBLE + len(self._needle) + 4 - len(self._new))
        return self._budget

    def _pulled(self, data: bytes) -> None:
        self._new += data
        self._budget -= len(data)
        if self._needle and data:
            window = self._tail + data
            hits = window.count(self._needle)
            if hits and not self.hits:  # the first boundary: the part's head starts here
                self._budget = MAX_PART_HEAD
            self.hits += hits
            self._tail = window[1 - len(self._needle) :]
        if self._room() < 0:
            raise BadRequest("the multipart body's preamble or a part's head is too long")

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
        # At most the room left (and at least 1: StreamReader reads 0 as "its default").
        limit = max(1, self._room())
        if max_line_length is not None:
            limit = min(limit, max_line_length)
        data = await self._source.readline(max_line_length=limit)
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


def _check_part_headers(headers: CIMultiDictProxy[str]) -> None:
    """Refuses a part another parser could read differently from aiohttp's: without exactly
    one clean ``form-data`` Content-Disposition with one ``name`` (or ``name*``) parameter,
    named with an override or ``_charset_`` (RFC 7578 4.6: it sets the charset of the other
    parts), with more than one Content-Type, one with a charset other than UTF-8 or ASCII, or
    a Content-Transfer-Encoding or Content-Encoding that some parser decodes."""
    dispositions = headers.getall("Content-Disposition", ())
    if len(dispositions) != 1:
        raise BadRequest("a multipart part has no name")
    # Synchronous, so no other task runs while the warnings are caught; a header that makes
    # aiohttp warn is refused here, before its parser warns about it (quoting the request).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, params = parse_content_disposition(dispositions[0])
    keys = [k for k in params if k.startswith("name")]
    if caught or kind != "form-data" or len(keys) != 1 or keys[0] not in ("name", "name*"):
        raise BadRequest("a multipart part has no name")
    name = params[keys[0]]
    if is_override_param(name):
        raise MethodOverrideRefused()
    if _is_charset_param(name):
        raise UnsupportedCharset()
    types = headers.getall("Content-Type", ())
    if len(types) > 1:
        raise BadRequest("a multipart part has one Content-Type")
    if types:
        _check_charset(types[0])
    transfer = headers.getall("Content-Transfer-Encoding", ())
    encoding = headers.getall("Content-Encoding", ())
    if any(t.strip().lower() not in _IDENTITY_TRANSFER for t in transfer) or any(
        e.strip().lower() != "identity" for e in encoding
    ):
        raise BadRequest("an encoded multipart part cannot be checked on this route")


class _CheckedPart(BodyPartReader):
    """A part, its headers checked before aiohttp's reader looks at them (MultipartReader.next()
    parses the first part's Content-Disposition itself, for ``_charset_``)."""

    def __init__(
        self, boundary: bytes, headers: CIMultiDictProxy[str], content: StreamReader, **kw: Any
    ) -> None:
        _check_part_headers(headers)
        super().__init__(boundary, headers, content, **kw)


class _Reader(MultipartReader):
    part_reader_cls = _CheckedPart


async def _scanned_multipart(request: web.Request) -> AsyncIterator[bytes]:
    # aiohttp's parser raises whatever its helpers raise on odd bytes (RuntimeError,
    # LookupError, UnicodeDecodeError, ...): anything it raises is the browser's malformed body.
    try:
        async for piece in _multipart_pieces(request):
            yield piece
    except (BffError, OSError):
        raise  # a refusal, or the browser's connection gone
    except Exception:
        raise BadRequest("the multipart body is malformed") from None


async def _multipart_pieces(request: web.Request) -> AsyncIterator[bytes]:
    tap = _Tap(request.content)
    # The parser reads through the tap: it is duck-typed on StreamReader's read methods.
    reader = _Reader(
        request.headers,
        cast(StreamReader, tap),
        max_field_size=MAX_PART_HEAD,
        max_headers=_MAX_PART_HEADERS,
    )
    boundary = reader._boundary  # b"--" + boundary, as the parser matches it
    if not _PLAIN_BOUNDARY.fullmatch(boundary):
        raise BadRequest("the multipart boundary is not plain")
    # "boundary" once, as the parameter's name (Chrome's value has "Boundary" in it too): PHP
    # takes the first "boundary" anywhere, then the text after the next "=".
    in_value = boundary.lower().count(b"boundary")
    if request.headers["Content-Type"].lower().count("boundary") - in_value != 1:
        raise BadRequest("a Content-Type has one boundary")
    tap.count(boundary)
    parts = 0
    held = b""
    while True:
        tap.limit_to(MAX_PART_HEAD)
        part = await reader.next()
        if part is None:
            break
        parts += 1
        if isinstance(part, MultipartReader):
            raise BadRequest("nested multipart bodies are not accepted on this route")
        while True:
            tap.limit_to(_MAX_CHUNK_PULL)
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
    tap.limit_to(2 * MAX_EPILOGUE + 2)
    while size <= MAX_EPILOGUE and (more := await tap.read(MAX_EPILOGUE + 1)):
        epilogue.append(more)
        size += len(more)
    # The boundary occurs only where this parser saw a delimiter: once per part and once to
    # close. Anywhere else (after a bare LF, which PHP takes for a line end; inside a part
    # whose Content-Length this parser believed; in the preamble or epilogue) another parser
    # could find a part this one never saw.
    if size > MAX_EPILOGUE or tap.hits != parts + 1:
        raise BadRequest("the multipart body is malformed")
    rest = held + tap.take()
    if rest:
        yield rest


def _check_charset(content_type: str) -> None:
    """Refuses a Content-Type that names a charset other than UTF-8 or US-ASCII, or names one
    more than once, or has ``charset`` anywhere but as a parameter (a loose reader could take
    it from inside another value). No charset at all is UTF-8 (or ASCII) for every reader."""
    lowered = content_type.lower()
    if "charset" not in lowered:
        return
    matches = list(_CHARSET_PARAM.finditer(lowered))
    if len(matches) > 1:
        raise UnsupportedCharset()
    match = matches[0]
    value = match.group(1) if match.group(1) is not None else match.group(2)
    before = lowered[: match.start()].rstrip(" \t")
    if value not in _CHARSETS or not before.endswith(";"):
        raise UnsupportedCharset()


def body_scanner(request: web.Request, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` (the request body), scanned for override parameters when it is a form.

    Raises :class:`BadRequest` at once for a form whose kind is ambiguous (several
    ``Content-Type`` lines, ``boundary`` twice in a form's or JSON's) or that cannot be scanned
    (a ``Content-Encoding``), and :class:`UnsupportedCharset` for a charset other than UTF-8
    or ASCII; a multipart body's boundary and parts are checked as they are read.
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
    if types:
        _check_charset(types[0])
        if not multipart and types[0].lower().count("boundary") > 1:
            raise BadRequest("a Content-Type has one boundary")  # multipart's: see there
    if multipart:
        return _scanned_multipart(request)
    return _scanned(chunks, _FormScanner() if form else _JsonScanner())
