"""``/metrics`` has a listener of its own, loopback by default (issue 9, point 6).

The public listener answers ``/metrics`` with a JSON 404 unless ``metrics.public: true``; the
metrics listener serves it (and health) from prometheus-client's counters, and with SO_REUSEPORT
the workers of one ``bff run`` can all bind it.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bff.app import create_app
from bff.config import Settings, parse_settings
from bff.health import add_metrics_listener
from bff.metrics import render
from bff.services import SERVICES
from bff.store.memory import MemoryStore
from tests.support.procs import HOST, free_port
from tests.support.scrape import sample

MakeClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def settings(tmp_path: Path, extra: str = "") -> Settings:
    (tmp_path / "index.html").write_text("<!doctype html><title>app</title>")
    return parse_settings(
        f"""
public_url: http://localhost:8080
static: {tmp_path}
oidc: {{issuer: "http://127.0.0.1:1", client_id: c, client_secret: s}}
keys: ["{"k" * 43}"]
session: {{cookie: {{name: bff, secure: false}}}}
{extra}
"""
    )


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{HOST}:{port}{path}") as resp:
        return resp.status, await resp.text()


async def test_metrics_are_not_on_the_public_listener_by_default_but_on_their_own(
    tmp_path: Path, aiohttp_client: MakeClient
) -> None:
    app = create_app(settings(tmp_path), store=MemoryStore())
    port = free_port()
    add_metrics_listener(app, HOST, port)
    client = await aiohttp_client(app)
    app[SERVICES].metrics.inc("bff_logins_total", 3, outcome="listener_test")

    public = await client.get("/metrics", headers={"Accept": "text/html"})
    assert public.status == 404
    assert (await public.json())["error"] == "not_found"  # JSON, not the SPA's index.html
    assert (await client.get("/healthz")).status == 200  # load balancers probe the public one

    status, text = await scrape(port)
    assert status == 200
    assert sample(text, "bff_logins_total", outcome="listener_test") >= 3
    assert (await scrape(port, "/healthz"))[0] == 200


async def test_metrics_public_true_serves_them_on_the_public_listener_too(
    tmp_path: Path, aiohttp_client: MakeClient
) -> None:
    app = create_app(settings(tmp_path, "metrics: {public: true}"), store=MemoryStore())
    client = await aiohttp_client(app)
    before = sample(render(), "bff_logins_total", outcome="public_test")
    app[SERVICES].metrics.inc("bff_logins_total", outcome="public_test")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert sample(await resp.text(), "bff_logins_total", outcome="public_test") == before + 1


async def test_workers_share_the_metrics_port_with_reuse_port(
    tmp_path: Path, aiohttp_client: MakeClient
) -> None:
    port = free_port()
    for _ in range(2):  # two workers of one `bff run`: both bind, neither fails
        app = create_app(settings(tmp_path), store=MemoryStore())
        add_metrics_listener(app, HOST, port, reuse_port=True)
        await aiohttp_client(app)
    assert (await scrape(port))[0] == 200


async def test_a_metrics_port_in_use_fails_the_start_up_loudly(
    tmp_path: Path, aiohttp_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(settings(tmp_path), store=MemoryStore())
        add_metrics_listener(app, HOST, port)
        with pytest.raises(OSError):
            await aiohttp_client(app)
    assert any(r.getMessage() == "metrics.listen_failed" for r in caplog.records)
