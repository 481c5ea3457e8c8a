"""bff.tracing: the span tree of a proxied call that refreshes, W3C trace context in and out,
nothing secret in any span, and nothing at all while tracing is off.

The app runs in process (aiohttp test client) against the hostile OP and an echo upstream; spans
go to the SDK's in-memory exporter in place of the OTLP one that ``OTEL_*`` would configure.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from yarl import URL

from bff import tracing
from bff.app import create_app
from bff.config import TracingSettings, parse_settings
from bff.store.memory import MemoryStore
from tests.support.hostile_op import HostileOp

ROOT = Path(__file__).resolve().parents[2]
KEY = "unit-test-key-0123456789abcdefghijklmnopqrstuvwxyz"
CSRF = {"X-CSRF": "1"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]


@dataclass
class Echo:
    """The upstream: records each request's headers, answers a small JSON body."""

    seen: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # what /stall/* waits for

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        if request.path.startswith("/stall"):
            async with asyncio.timeout(30):  # bounded; bff's route timeout comes long before
                await self.release.wait()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        return web.json_response({"ok": True})


@pytest.fixture
async def op() -> AsyncIterator[HostileOp]:
    async with HostileOp() as hostile:
        yield hostile


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[Echo, str]]:
    upstream = Echo()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    yield upstream, f"http://127.0.0.1:{server.port}"
    upstream.release.set()


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The exporter ``tracing.start`` installs, in place of the one ``OTEL_*`` would name."""
    memory = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "default_exporter", lambda: memory)
    yield memory
    tracing.stop()  # whatever a failing test left on


def settings_yaml(op: HostileOp, upstream: str, tracing_yaml: str) -> str:
    return f"""
public_url: http://127.0.0.1:8080
oidc:
  issuer: {op.issuer}
  client_id: {op.client_id}
  client_secret: {op.client_secret}
session:
  store: memory://
  cookie: {{name: bff-session, secure: false}}
keys: [{KEY}]
upstreams:
  - path: /api
    url: {upstream}
    token: user
  - path: /public
    url: {upstream}
    token: none
  - path: /slow
    url: {upstream}/stall
    token: none
    timeout: 300ms
  - path: /ws
    url: {upstream}
    token: none
    websocket: true
tracing: {tracing_yaml}
"""


async def start(
    aiohttp_client: AiohttpClient, op: HostileOp, upstream: str, tracing_yaml: str
) -> TestClient[Any, Any]:
    settings = parse_settings(settings_yaml(op, upstream, tracing_yaml))
    return await aiohttp_client(create_app(settings, store=MemoryStore()))


@dataclass
class Login:
    code: str
    state: str


async def login(client: TestClient[Any, Any]) -> Login:
    """Login, the OP's redirect and the callback; the browser ends with a session cookie."""
    resp = await client.get("/bff/login", allow_redirects=False)
    assert resp.status == 302
    async with (
        aiohttp.ClientSession() as http,
        http.get(resp.headers["Location"], allow_redirects=False) as authorized,
    ):
        assert authorized.status == 302
        callback = URL(authorized.headers["Location"])
    resp = await client.get(callback.relative(), allow_redirects=False)
    assert resp.status == 200, await resp.text()
    return Login(code=callback.query["code"], state=callback.query["state"])


def spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert tracing.flush()
    return list(exporter.get_finished_spans())


async def ended(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The span ``name`` once it has ended (a WebSocket handler ends after the browser's close)."""
    async with asyncio.timeout(10):
        while True:
            named = [s for s in spans(exporter) if s.name == name]
            if named:
                return one(named, name)
            await asyncio.sleep(0.01)


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s for s in all_spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in found if s.name == name]
    assert len(named) == 1, [s.name for s in found]
    return named[0]


async def test_the_span_tree_of_a_proxied_call_that_refreshes(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    upstream, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    op.expires_in = 0  # the session's access token needs a refresh at its first use
    await login(client)
    tokens_before = len(op.token_requests)
    spans(exporter)  # the login's, exported now ...
    exporter.clear()  # ... and forgotten

    resp = await client.get("/api/orders/42?x=1", headers=CSRF)
    assert resp.status == 200, await resp.text()
    assert [r.form["grant_type"] for r in op.token_requests[tokens_before:]] == ["refresh_token"]

    found = spans(exporter)
    roots = [s for s in found if s.parent is None]
    assert [r.name for r in roots] == ["GET /api/{tail}"]
    root = roots[0]
    assert root.context is not None
    trace_id = root.context.trace_id
    assert {s.context.trace_id for s in found if s.context is not None} == {trace_id}
    assert root.kind is SpanKind.SERVER
    assert root.attributes is not None
    assert root.attributes["http.route"] == "/api/{tail}"
    assert root.attributes["http.request.method"] == "GET"
    assert root.attributes["http.response.status_code"] == 200

    under_root = children(found, root)
    refresh = one(under_root, "bff.refresh")
    client_span = one(under_root, "GET /api")
    assert client_span.kind is SpanKind.CLIENT
    assert client_span.attributes is not None
    assert client_span.attributes["http.response.status_code"] == 200
    assert client_span.attributes["bff.route"] == "/api"
    assert client_span.attributes["server.address"] == "127.0.0.1"
    assert client_span.attributes["http.request.method"] == "GET"

    under_refresh = children(found, refresh)
    names = [s.name for s in under_refresh]
    one(under_refresh, "bff.refresh.lock_wait")
    assert "bff.store acquire_lock" in names
    assert "bff.store release_lock" in names
    token_call = one(under_refresh, "bff.oidc.token")
    assert token_call.kind is SpanKind.CLIENT
    assert token_call.attributes is not None
    assert token_call.attributes["oauth.grant_type"] == "refresh_token"
    assert token_call.attributes["http.response.status_code"] == 200
    one(under_refresh, "bff.oidc.id_token_validation")
    store_span = next(s for s in under_refresh if s.name == "bff.store acquire_lock")
    assert store_span.kind is SpanKind.CLIENT
    assert store_span.attributes == {
        "db.system.name": "memory",
        "db.operation.name": "acquire_lock",
    }
    assert "bff.store get" in names  # the holder re-reads the session under the lock

    # The upstream got our traceparent: this trace, and the client span as its parent.
    assert client_span.context is not None
    version, sent_trace, sent_parent, _flags = upstream.seen[-1]["traceparent"].split("-")
    assert (version, sent_trace) == ("00", hexid(trace_id, 32))
    assert sent_parent == hexid(client_span.context.span_id, 16)


async def test_a_browser_traceparent_is_continued_and_replaced_upstream(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    upstream, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    resp = await client.get("/public/x", headers={**CSRF, "traceparent": incoming})
    assert resp.status == 200

    root = one(spans(exporter), "GET /public/{tail}")
    assert root.context is not None and root.parent is not None
    assert hexid(root.context.trace_id, 32) == TRACE_ID
    assert hexid(root.parent.span_id, 16) == PARENT_ID
    sent = upstream.seen[-1]["traceparent"]
    assert sent.startswith(f"00-{TRACE_ID}-")
    assert PARENT_ID not in sent  # our client span's id, not the browser's
    assert list(upstream.seen[-1]).count("traceparent") == 1


async def test_a_websocket_handshake_carries_the_server_spans_traceparent(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    upstream, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with client.ws_connect(
        "/ws/chat", headers={"Origin": "http://127.0.0.1:8080", "traceparent": incoming}
    ) as ws:
        await ws.receive()  # the upstream closes at once
    root = await ended(exporter, "GET /ws/{tail}")
    assert root.context is not None
    sent = upstream.seen[-1]["traceparent"]
    assert sent.split("-")[1:3] == [TRACE_ID, hexid(root.context.span_id, 16)]


async def test_with_trust_incoming_false_a_browser_traceparent_starts_nothing(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    upstream, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true, trust_incoming: false}")
    resp = await client.get(
        "/public/x", headers={**CSRF, "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    )
    assert resp.status == 200
    root = one(spans(exporter), "GET /public/{tail}")
    assert root.parent is None
    exporter.clear()
    for probe in ("/healthz", "/readyz"):
        await client.get(probe)
    await client.get("/public/after-the-probes", headers=CSRF)
    # /readyz pinged the store: not even that child became a span (of its own, a root).
    assert [s.name for s in spans(exporter)] == ["GET /public", "GET /public/{tail}"]
    assert root.context is not None and hexid(root.context.trace_id, 32) != TRACE_ID
    assert TRACE_ID not in upstream.seen[-1]["traceparent"]


async def test_no_span_carries_a_cookie_token_code_or_query(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    _, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    op.expires_in = 0
    done = await login(client)
    resp = await client.get("/api/orders/42?q=secret-query-value", headers=CSRF)
    assert resp.status == 200
    await client.get("/bff/user", headers=CSRF)

    secrets = {done.code, done.state, "secret-query-value", "/orders/42", op.client_secret}
    secrets |= {c.value for c in client.session.cookie_jar}
    for issued in op.issued:
        secrets |= {issued.access_token, issued.refresh_token, issued.id_token}
    secrets |= {r["nonce"] for r in op.authorize_requests}
    secrets |= {r.form["code_verifier"] for r in op.token_requests if "code_verifier" in r.form}
    secrets.discard("")
    assert len(secrets) >= 10

    found = spans(exporter)
    assert {"bff.login", "bff.callback", "bff.oidc.code_exchange", "bff.refresh"} <= {
        s.name for s in found
    }
    shown = []
    for s in found:
        shown.append(s.name)
        shown.extend(str(v) for v in (s.attributes or {}).values())
        shown.extend(str(v) for e in s.events for v in (e.attributes or {}).values())
        shown.append(s.status.description or "")
    text = "\n".join(shown)
    for secret in secrets:
        assert secret not in text


async def test_the_callback_has_code_exchange_and_id_token_validation_spans(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    _, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    await login(client)
    found = spans(exporter)
    server = one(found, "GET /bff/callback")
    callback = one(children(found, server), "bff.callback")
    under = children(found, callback)
    exchange = one(under, "bff.oidc.code_exchange")
    one(under, "bff.oidc.id_token_validation")
    token = one(children(found, exchange), "bff.oidc.token")
    assert token.attributes is not None
    assert token.attributes["oauth.grant_type"] == "authorization_code"
    login_server = one(found, "GET /bff/login")
    one(children(found, login_server), "bff.login")


async def test_a_failed_span_names_the_exception_class_only(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    _, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    op.token_error = "invalid_grant"
    resp = await client.get("/bff/login", allow_redirects=False)
    async with (
        aiohttp.ClientSession() as http,
        http.get(resp.headers["Location"], allow_redirects=False) as authorized,
    ):
        callback = URL(authorized.headers["Location"])
    resp = await client.get(callback.relative(), allow_redirects=False)
    assert resp.status == 400
    found = spans(exporter)
    exchange = one(found, "bff.oidc.code_exchange")
    assert exchange.attributes is not None
    assert exchange.attributes["error.type"] == "InvalidGrant"
    assert exchange.status.description is None
    assert not exchange.events
    server = one(found, "GET /bff/callback")
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 400


async def test_an_upstream_timeout_marks_the_client_span_and_the_504(
    aiohttp_client: AiohttpClient,
    op: HostileOp,
    echo: tuple[Echo, str],
    exporter: InMemorySpanExporter,
) -> None:
    _, url = echo
    client = await start(aiohttp_client, op, url, "{enabled: true}")
    resp = await client.get("/slow/x", headers=CSRF)
    assert resp.status == 504
    found = spans(exporter)
    upstream_call = one(found, "GET /slow")
    assert upstream_call.attributes is not None
    assert upstream_call.attributes["error.type"] == "CancelledError"
    assert "http.response.status_code" not in upstream_call.attributes
    server = one(found, "GET /slow/{tail}")
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 504


# -------------------------------------------------------------------------------------------------
# Off


def test_when_off_span_is_one_shared_no_op_and_the_store_is_not_wrapped() -> None:
    assert not tracing.enabled()
    assert tracing.span("a") is tracing.span("b")
    assert tracing.upstream_span("GET", "/api", "http://127.0.0.1:1") is tracing.span("c")
    with tracing.span("a") as current:
        assert current is None
    store = MemoryStore()
    assert tracing.traced_store(store) is store
    headers = [("traceparent", "x")]
    assert tracing.inject(headers) is headers
    assert tracing.middleware(TracingSettings()) == []
    assert tracing.start_span("x") is None


_OFF_SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, {root!r})
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from bff.app import create_app
from bff.config import parse_settings

async def main():
    seen = []
    async def handle(request):
        seen.append(dict(request.headers))
        return web.json_response({{}})
    upstream = web.Application()
    upstream.router.add_route("*", "/{{tail:.*}}", handle)
    async with TestServer(upstream, host="127.0.0.1") as server:
        settings = parse_settings(f'''
public_url: http://127.0.0.1:8080
oidc: {{{{issuer: "http://127.0.0.1:9", client_id: c, client_secret: s}}}}
session: {{{{store: "memory://", cookie: {{{{name: bff-session, secure: false}}}}}}}}
keys: [{key}]
upstreams: [{{{{path: /public, url: "http://127.0.0.1:{{server.port}}", token: none}}}}]
''')
        app = create_app(settings)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            resp = await client.get("/public/x", headers={{"X-CSRF": "1"}})
            assert resp.status == 200, await resp.text()
            incoming = {{"X-CSRF": "1", "traceparent": {incoming!r}}}
            resp = await client.get("/public/y", headers=incoming)
            assert resp.status == 200, await resp.text()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    print(json.dumps({{"otel": loaded, "headers": seen}}))

asyncio.run(main())
"""


def test_when_off_opentelemetry_is_never_imported_and_no_traceparent_is_added() -> None:
    """In a fresh interpreter (this one has imported the SDK): a proxied call with tracing off
    imports nothing of OpenTelemetry, adds no ``traceparent``, and passes a browser's on as is."""
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    script = _OFF_SCRIPT.format(root=str(ROOT), key=KEY, incoming=incoming)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["otel"] == []
    plain, traced = result["headers"]
    assert "traceparent" not in [h.lower() for h in plain]  # none added ...
    assert [v for k, v in traced.items() if k.lower() == "traceparent"] == [incoming]  # as sent


async def test_a_started_span_left_open_by_an_exception_ends_with_its_traced_function(
    exporter: InMemorySpanExporter,
) -> None:
    """The refresh's lock-wait span on an error exit (a SessionExpired while polling, say)."""
    tracing.start(TracingSettings(enabled=True))

    @tracing.traced("outer")
    async def fails() -> None:
        tracing.start_span("wait")
        raise RuntimeError("boom: never recorded")

    with pytest.raises(RuntimeError):
        await fails()
    found = spans(exporter)
    outer, wait = one(found, "outer"), one(found, "wait")
    assert outer.context is not None and wait.parent is not None
    assert wait.parent.span_id == outer.context.span_id
    assert outer.attributes is not None and outer.attributes["error.type"] == "RuntimeError"
    assert "boom" not in str(outer.status.description)


def test_an_unknown_exporter_is_logged_and_bff_serves_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    try:
        tracing.start(TracingSettings(enabled=True))
        assert tracing.enabled()
    finally:
        tracing.stop()
    records = [r for r in caplog.records if r.getMessage() == "tracing.no_exporter"]
    assert len(records) == 1
    assert "zipkin" in records[0].__dict__["error"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "shop-bff"),
        ({"OTEL_SERVICE_NAME": "from-env"}, "from-env"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team=a,service.name=attr"}, "attr"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "myservice.name=x"}, "shop-bff"),
    ],
)
def test_service_name_comes_from_the_yaml_unless_otel_env_names_one(
    monkeypatch: pytest.MonkeyPatch,
    exporter: InMemorySpanExporter,
    env: dict[str, str],
    expected: str,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tracing.start(TracingSettings(enabled=True, service_name="shop-bff"))
    with tracing.span("x"):
        pass
    assert one(spans(exporter), "x").resource.attributes["service.name"] == expected
