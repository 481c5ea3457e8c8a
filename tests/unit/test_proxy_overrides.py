"""bff.proxy.overrides: ``_method`` in form bodies is refused before the body is complete."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from unittest import mock

import pytest
from aiohttp import StreamReader
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from bff.errors import BadRequest, MethodOverrideRefused
from bff.proxy.overrides import MAX_NAME, body_scanner

FORM = "application/x-www-form-urlencoded"
BOUNDARY = "----b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*parts: tuple[str, bytes], epilogue: bytes = b"") -> bytes:
    out = b""
    for disposition, body in parts:
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += body + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode() + epilogue


def request(headers: Sequence[tuple[str, str]], chunks: Sequence[bytes]) -> Any:
    loop = asyncio.get_running_loop()
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    for chunk in chunks:
        stream.feed_data(chunk)
    stream.feed_eof()
    length = sum(len(c) for c in chunks)
    return make_mocked_request(
        "POST",
        "/api/x",
        headers=CIMultiDict([*headers, ("Content-Length", str(length))]),
        payload=stream,
    )


async def drain(req: Any) -> tuple[bytes, BaseException | None]:
    """What the upstream would have received, and the refusal if there was one."""
    got = b""
    try:
        async for piece in body_scanner(req, req.content.iter_chunked(10**9)):
            got += piece
    except BadRequest as exc:
        return got, exc
    return got, None


def splits(body: bytes) -> list[list[bytes]]:
    """``body`` in two chunks at every position (about 100 of them for a long body), in
    7-byte chunks, and whole."""
    step = max(1, len(body) // 100)
    out = [[body[:i], body[i:]] for i in range(1, len(body), step)]
    out.append([body[i : i + 7] for i in range(0, len(body), 7)])
    out.append([body])
    return out


# -- urlencoded --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"a=1&_method=DELETE&b=2",
        b"_method=DELETE",
        b"a=1;_method=PUT",
        b"a=1&%5Fmethod=PUT",
        b"a=1&_METHOD=PUT&b=" + b"x" * 100,
        b"a=1&_method",
        b"a=1&.method=PUT",
        b"x-http-method-override=PUT",
        b"a=1&_method%00x=PUT",
    ],
)
async def test_a_form_with_an_override_is_refused_before_it_is_complete(body: bytes) -> None:
    for chunks in splits(body):
        got, refused = await drain(request([("Content-Type", FORM)], chunks))
        assert isinstance(refused, MethodOverrideRefused), chunks
        assert len(got) < len(body), chunks


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Content-Type", "")],
        [("Content-Type", "Application/X-WWW-Form-Urlencoded")],
        [("Content-Type", "application/x-www-form-urlencoded garbage")],
        [("Content-Type", "application/x-www-form-urlencoded,text/plain")],
    ],
)
async def test_every_content_type_some_server_reads_as_a_form_is_scanned(
    headers: list[tuple[str, str]],
) -> None:
    got, refused = await drain(request(headers, [b"_method=DELETE"]))
    assert isinstance(refused, MethodOverrideRefused) and got == b""


@pytest.mark.parametrize(
    "body",
    [
        b"a=1&b=2",
        b"q=_method&r=_method%3DDELETE",
        b"method=DELETE&my_method=1&_methods=2",
        b"",
        b"a=%ZZ&=&&;;b",
        bytes(range(256)),
    ],
)
async def test_a_form_without_an_override_passes_byte_for_byte(body: bytes) -> None:
    for chunks in splits(body) if body else [[b""]]:
        got, refused = await drain(request([("Content-Type", f"{FORM}; charset=UTF-8")], chunks))
        assert refused is None and got == body, chunks


async def test_an_overlong_parameter_name_is_refused() -> None:
    body = b" " * (MAX_NAME + 1) + b"_method=DELETE"
    _, refused = await drain(request([("Content-Type", FORM)], [body]))
    assert isinstance(refused, BadRequest)


async def test_a_body_no_framework_reads_overrides_from_is_not_scanned() -> None:
    for content_type in ("application/octet-stream", "text/plain", "image/png"):
        req = request([("Content-Type", content_type)], [b"_method=DELETE"])
        chunks = req.content.iter_chunked(100)
        assert body_scanner(req, chunks) is chunks


async def test_a_form_that_cannot_be_scanned_or_is_ambiguous_is_refused_at_once() -> None:
    with pytest.raises(BadRequest):
        body_scanner(request([("Content-Type", FORM), ("Content-Encoding", "gzip")], [b"x"]), None)  # type: ignore[arg-type]
    two = [("Content-Type", "application/json"), ("Content-Type", FORM)]
    with pytest.raises(BadRequest):
        body_scanner(request(two, [b"_method=DELETE"]), None)  # type: ignore[arg-type]


# -- multipart ---------------------------------------------------------------------------------

FILE = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"


@pytest.mark.parametrize(
    "disposition",
    [
        'form-data; name="_method"',
        'form-data; name="_METHOD"',
        "form-data; name=_method",
        "form-data; name*=UTF-8''%5Fmethod",
        'form-data; name="x-http-method-override"',
    ],
)
async def test_a_multipart_body_with_an_override_part_is_refused(disposition: str) -> None:
    body = multipart(('form-data; name="file"; filename="a.bin"', FILE), (disposition, b"DELETE"))
    for chunks in [[body], [body[i : i + 100] for i in range(0, len(body), 100)]]:
        got, refused = await drain(request([("Content-Type", MULTIPART)], chunks))
        assert isinstance(refused, MethodOverrideRefused)
        assert len(got) < len(body)


async def test_a_multipart_body_without_an_override_passes_byte_for_byte() -> None:
    body = multipart(
        ('form-data; name="title"', b"_method=DELETE is only a value here"),
        ('form-data; name="file"; filename="_method"', FILE),
        epilogue=b"\r\n",
    )
    for chunks in [[body], [body[i : i + 100] for i in range(0, len(body), 100)], splits(body)[5]]:
        got, refused = await drain(request([("Content-Type", MULTIPART)], chunks))
        assert refused is None and got == body


HIDDEN = f'--{BOUNDARY}\nContent-Disposition: form-data; name="_method"\n\nDELETE\n'.encode()


@pytest.mark.parametrize(
    "body",
    [
        # after bare LFs, which PHP reads as line ends
        multipart(('form-data; name="a"', b"1\n" + HIDDEN)),
        # inside a part whose Content-Length aiohttp believes and RFC 7578 says to ignore
        multipart((f'form-data; name="a"\r\nContent-Length: {len(HIDDEN)}', HIDDEN)),
        # in the preamble and in the epilogue
        b"preamble\r\n" + HIDDEN + multipart(('form-data; name="a"', b"1")),
        multipart(('form-data; name="a"', b"1"), epilogue=HIDDEN),
    ],
)
async def test_a_part_that_only_a_looser_parser_would_see_is_refused(body: bytes) -> None:
    for chunks in [[body], [body[i : i + 5] for i in range(0, len(body), 5)]]:
        got, refused = await drain(request([("Content-Type", MULTIPART)], chunks))
        assert isinstance(refused, BadRequest)
        assert len(got) < len(body)


@pytest.mark.parametrize(
    "body",
    [
        multipart(("form-data", b"nameless")),
        multipart(('form-data; name="a"', b"1"), epilogue=f"--{BOUNDARY}\r\n".encode()),
        multipart(('form-data; name="a"', b"1"), epilogue=b"x" * 5000),
        b"no boundary anywhere",
        multipart(('form-data; name="a"', b"1"))[:-10],  # cut short
    ],
)
async def test_a_malformed_multipart_body_is_refused(body: bytes) -> None:
    got, refused = await drain(request([("Content-Type", MULTIPART)], [body]))
    assert isinstance(refused, BadRequest) and not isinstance(refused, MethodOverrideRefused)
    assert len(got) < len(body)


async def test_a_multipart_type_without_a_boundary_is_refused() -> None:
    req = request([("Content-Type", "multipart/form-data")], [b"x"])
    with pytest.raises(BadRequest):
        async for _ in body_scanner(req, req.content.iter_chunked(10)):
            pass


# -- JSON (Laravel reads a JSON body's _method like a form field) -------------------------------

JSON = "application/json"


@pytest.mark.parametrize(
    "body",
    [
        b'{"_method": "DELETE"}',
        b'{"a": 1, "_method" : "DELETE"}',
        b'{"a": {"b": [{"_METHOD":"PUT"}]}}',
        b'{"\\u005fmethod": "DELETE"}',
        b'{"_\\u006Dethod": "DELETE"}',
        b'{"a": "x\\"y", "_method": "DELETE"}',
        b'{"x-http-method-override": "PUT"}',
        b'\n\t{\n"_method"\n\t:\n"DELETE"}',
    ],
)
async def test_a_json_body_with_an_override_key_is_refused_before_it_is_complete(
    body: bytes,
) -> None:
    for content_type in (JSON, "application/vnd.api+json; charset=utf-8", "text/json"):
        for chunks in splits(body):
            got, refused = await drain(request([("Content-Type", content_type)], chunks))
            assert isinstance(refused, MethodOverrideRefused), (content_type, chunks)
            assert len(got) < len(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"method": "_method", "paymentMethod": "card", "_methods": 1}',
        b'["_method", "DELETE"]',
        b'{"a": "_method:", "b": "\\"_method\\": 1"}',
        b'{"' + b"x" * 5000 + b'": "_method"}',
        b'{"_method',  # cut short: the upstream refuses it anyway
        b"not json at all: _method",
        b"",
    ],
)
async def test_a_json_body_without_an_override_key_passes_byte_for_byte(body: bytes) -> None:
    for chunks in splits(body) if body else [[b""]]:
        got, refused = await drain(request([("Content-Type", JSON)], chunks))
        assert refused is None and got == body, chunks
