"""bff.access: which request ids are kept, how routes are named, what a line holds."""

from __future__ import annotations

import logging
import os

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bff.access import REQUEST_ID, SESSION_SECRET, access_middleware, session_handle
from bff.keys import SessionSecret, store_id


async def ok(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"12345")


async def missing(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/api", ok)
    application.router.add_get("/api/{tail:.*}", ok)
    application.router.add_get("/bff/user", missing)
    application.router.add_get("/{tail:.*}", ok)  # the SPA's catch-all
    return application


async def call(
    path: str, headers: dict[str, str] | None = None, *, enabled: bool = True
) -> tuple[web.Request, web.StreamResponse | web.HTTPException]:
    application = app()
    request = make_mocked_request("GET", path, headers=headers or {}, app=application)
    match = await application.router.resolve(request)
    match.add_app(application)
    request._match_info = match
    middleware = access_middleware(enabled=enabled)
    try:
        return request, await middleware(request, match.handler)
    except web.HTTPException as exc:
        return request, exc


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123_X.y", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ("ünicode", False),
        ("", False),
        ("a;b", False),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", False),  # a JWT is not an id
    ],
)
async def test_a_client_request_id_is_kept_only_when_well_formed(given: str, kept: bool) -> None:
    request, _ = await call("/api/x", {"X-Request-ID": given})
    rid = request[REQUEST_ID]
    if kept:
        assert rid == given
    else:
        assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


async def test_the_request_id_is_set_even_without_access_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="bff.access"):
        request, _ = await call("/api/x", {"X-Request-ID": "keep-me"}, enabled=False)
    assert request[REQUEST_ID] == "keep-me"
    assert [r for r in caplog.records if r.name == "bff.access"] == []


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        ("/api", "/api", 200),
        ("/api/orders/7?code=secret", "/api", 200),
        ("/bff/user", "/bff/user", 404),
        ("/some/client/route", "spa", 200),
    ],
)
async def test_one_line_names_the_route_never_the_path(
    caplog: pytest.LogCaptureFixture, path: str, route: str, status: int
) -> None:
    with caplog.at_level(logging.INFO, logger="bff.access"):
        await call(path)
    (record,) = [r for r in caplog.records if r.name == "bff.access"]
    line = vars(record)
    assert (line["route"], line["status"], line["method"]) == (route, status, "GET")
    assert line["bytes"] == (5 if status == 200 else 0)
    assert line["session"] == "-" and line["upstream_status"] is None
    assert "secret" not in str(line) and "orders" not in str(line)


async def test_the_session_handle_is_a_hash_of_the_store_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = SessionSecret("s" * 43)
    application = app()
    request = make_mocked_request("GET", "/api/x", app=application)
    match = await application.router.resolve(request)
    match.add_app(application)
    request._match_info = match
    request[SESSION_SECRET] = secret
    with caplog.at_level(logging.INFO, logger="bff.access"):
        await access_middleware(enabled=True)(request, match.handler)
    (record,) = [r for r in caplog.records if r.name == "bff.access"]
    handle = vars(record)["session"]
    assert handle == session_handle(secret) and len(handle) == 12
    assert handle not in secret and handle not in store_id(secret)


async def test_above_info_the_line_is_not_even_built(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At log level warning no access line is written, so none of its fields are worked out."""

    def built(*args: object) -> str:
        raise AssertionError("the access line was built although nothing writes it")

    monkeypatch.setattr("bff.access.client_address", built)
    with caplog.at_level(logging.WARNING, logger="bff.access"):
        request, _ = await call("/api/x", {"X-Request-ID": "keep-me"})
    assert request[REQUEST_ID] == "keep-me"
    assert [r for r in caplog.records if r.name == "bff.access"] == []
    with caplog.at_level(logging.INFO, logger="bff.access"), pytest.raises(AssertionError):
        await call("/api/x")  # the same call at info builds the line (the check can fail)


def test_new_request_ids_are_distinct_and_random_across_reads() -> None:
    from bff.access import _IDS_PER_READ, _new_id

    ids = [_new_id() for _ in range(3 * _IDS_PER_READ + 5)]  # several reads of the OS's source
    assert len(set(ids)) == len(ids)
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)


def test_a_forked_child_never_hands_out_its_parents_next_ids() -> None:
    from bff import access

    access._new_id()  # the parent holds ids read ahead
    assert access._ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"1" if not access._ids else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
