"""Traces from a real ``bff run --workers 2``, exported over OTLP/HTTP as ``OTEL_*`` configure it.

The collector is a small aiohttp server in the test that decodes the exporter's protobuf with the
OpenTelemetry protocol package; the spans' trace ids are the ones the requests carried in their
``traceparent``, so each request can be found in what the workers exported.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support.bff_procs import BffProcess, EchoUpstream, base_config, write_config
from tests.support.procs import OidcProvider, RedisServer

AiohttpServer = Callable[..., Awaitable[TestServer]]
REQUESTS = 20
MAX_REQUESTS = 2000


async def test_bff_run_exports_each_requests_spans_over_otlp(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans: list[tuple[str, Span]] = []  # (service.name, span)
    pids: set[int] = set()  # the workers that exported
    arrived = asyncio.Event()  # set at each export

    async def collect(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            pids.update(
                a.value.int_value
                for a in resource_spans.resource.attributes
                if a.key == "process.pid"
            )
            for scope_spans in resource_spans.scope_spans:
                spans.extend((attrs.get("service.name", ""), s) for s in scope_spans.spans)
        arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    collector_app = web.Application()
    collector_app.router.add_post("/v1/traces", collect)
    collector = await aiohttp_server(collector_app, host="127.0.0.1")
    # Inherited by `bff run` and its workers: the standard variables, nothing bff-specific.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)

    workdir = tmp_path / "tracing"
    with EchoUpstream() as upstream:
        proc = BffProcess(workdir / "bff.yaml", workers=2)
        client = await oidc_op.register_client([f"{proc.url}/bff/callback"])
        settings = base_config(
            public_url=proc.url,
            issuer=oidc_op.issuer,
            client=client,
            store=redis_server.url,
            keys=[secrets.token_urlsafe(32)],
            static=workdir,
            upstreams=[{"path": "/api", "url": upstream.url, "token": "none"}],
        )
        settings["tracing"] = {"enabled": True, "service_name": "bff-it"}
        write_config(workdir, settings)
        await asyncio.to_thread(proc.start)
        try:
            trace_ids: list[str] = []
            # A connection per request, so that SO_REUSEPORT spreads them over both workers; on
            # until both have exported (the second may still be starting), at most MAX_REQUESTS.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                while len(trace_ids) < REQUESTS or (
                    len(pids) < 2 and len(trace_ids) < MAX_REQUESTS
                ):
                    trace_id = secrets.token_hex(16)
                    trace_ids.append(trace_id)
                    headers = {"X-CSRF": "1", "traceparent": f"00-{trace_id}-{'1' * 16}-01"}
                    async with http.get(f"{proc.url}/api/item", headers=headers) as resp:
                        assert resp.status == 200, await resp.text()

            def exported(name: str) -> dict[str, str]:
                return {s.trace_id.hex(): service for service, s in spans if s.name == name}

            def complete() -> bool:
                both = set(exported("GET /api")) & set(exported("GET /api/{tail}"))
                return set(trace_ids) <= both

            async with asyncio.timeout(30):
                while not complete():
                    await arrived.wait()
                    arrived.clear()
        finally:
            await asyncio.to_thread(proc.close)

    servers = exported("GET /api/{tail}")
    assert set(trace_ids) <= set(servers), proc.logs()
    assert {servers[t] for t in trace_ids} == {"bff-it"}
    assert len(pids) == 2, proc.logs()  # each worker exports its own spans
    by_id = {s.span_id: s for _, s in spans}
    for _, s in spans:
        if s.name == "GET /api" and s.trace_id.hex() in trace_ids:
            parent = by_id[s.parent_span_id]
            assert parent.name == "GET /api/{tail}"
            assert parent.parent_span_id == bytes.fromhex("1" * 16)
