"""The metrics facade, the per-request middleware, the store and OP timers, multiprocess mode.

Metrics are process-wide (prometheus-client's default registry), so each test compares a
scrape before and after what it does, and uses label values no other test uses where it can.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bff import metrics
from bff.app import create_app
from bff.errors import StoreUnavailable
from bff.metrics import Metrics, render
from bff.multiproc import ENV, metrics_dir, worker_exited
from bff.sessions import lock_key
from bff.store.instrumented import InstrumentedStore
from bff.store.memory import MemoryStore
from tests.support.scrape import sample, samples
from tests.unit.fakes import FakeOp
from tests.unit.test_metrics_listener import settings
from tests.unit.test_refresh import Instance, _data

MakeClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ROOT = Path(__file__).resolve().parent.parent.parent


def test_inc_counts_in_prometheus_and_in_the_instance() -> None:
    before = sample(render(), "bff_refreshes_total", outcome="facade_test")
    mine, other = Metrics(), Metrics()
    mine.inc("bff_refreshes_total", outcome="facade_test")
    mine.inc("bff_refreshes_total", 4, outcome="facade_test")
    other.inc("bff_refreshes_total", outcome="facade_test")
    assert sample(render(), "bff_refreshes_total", outcome="facade_test") == before + 6
    # value() is what this instance counted: tests of one app see only their own counts.
    assert mine.value("bff_refreshes_total", outcome="facade_test") == 5
    assert other.value("bff_refreshes_total", outcome="facade_test") == 1
    # The same registry (bff's lines only: the Python GC collectors move between two renders).
    bff_lines = [line for line in mine.render().splitlines() if "bff_" in line]
    assert bff_lines and bff_lines == [line for line in render().splitlines() if "bff_" in line]


def test_an_unknown_counter_name_is_declared_on_first_use() -> None:
    Metrics().inc("bff_facade_new_total", 2, reason="x")
    Metrics().inc("bff_facade_new_total", reason="x")
    text = render()
    assert "# TYPE bff_facade_new_total counter" in text
    assert sample(text, "bff_facade_new_total", reason="x") == 3


async def test_each_request_is_counted_once_by_route_pattern_method_and_status(
    tmp_path: Path, aiohttp_client: MakeClient
) -> None:
    app = create_app(
        settings(tmp_path, "upstreams: [{path: /mapi, url: 'http://127.0.0.1:1/x'}]"),
        store=MemoryStore(),
    )
    client = await aiohttp_client(app)
    before = samples(render())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return samples(render()).get(key, 0.0) - before.get(key, 0.0)

    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/healthz?user=alice")).status == 200
    assert (await client.get("/bff/user")).status == 403  # a BffError (no X-CSRF), as JSON
    assert (await client.request("PROPFIND", "/healthz")).status == 405
    # Proxied: no X-CSRF, 403 before any upstream call; the label is the configured path.
    assert (await client.get("/mapi/users/12345")).status == 403
    assert (await client.get("/some/spa/page/42")).status == 200  # the SPA's index.html

    assert delta("bff_requests_total", route="/healthz", method="GET", status="200") == 2
    assert delta("bff_requests_total", route="/bff/user", method="GET", status="403") == 1
    # No route took it (405 too is decided before any handler): a fixed label.
    assert delta("bff_requests_total", route="unmatched", method="other", status="405") == 1
    assert delta("bff_requests_total", route="/mapi", method="GET", status="403") == 1
    assert delta("bff_requests_total", route="/{tail}", method="GET", status="200") == 1
    routes = {dict(labels).get("route") for (name, labels) in samples(render())}
    assert not any(r and ("12345" in r or "alice" in r or "42" in r) for r in routes)
    assert delta("bff_request_duration_seconds_count", kind="health") == 2
    assert delta("bff_request_duration_seconds_count", kind="unmatched") == 1
    assert delta("bff_request_duration_seconds_count", kind="proxy") == 1
    assert delta("bff_request_duration_seconds_count", kind="spa") == 1
    assert delta("bff_request_duration_seconds_count", kind="bff") == 1
    assert sample(render(), "bff_requests_in_flight") == 0


async def test_in_flight_counts_a_request_while_it_runs(aiohttp_client: MakeClient) -> None:
    seen: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(sample(render(), "bff_requests_in_flight"))
        return web.Response(text="ok")

    app = web.Application(middlewares=[metrics.request_middleware()])
    app.router.add_get("/inflight-test", handler)
    client = await aiohttp_client(app)
    assert (await client.get("/inflight-test")).status == 200
    assert seen == [1.0]
    assert sample(render(), "bff_requests_in_flight") == 0


class DownStore(MemoryStore):
    async def get(self, key: str) -> bytes | None:
        raise StoreUnavailable()


async def test_the_store_seam_times_every_call_and_counts_failures() -> None:
    before = samples(render())
    store = InstrumentedStore(DownStore())
    await store.set("k", b"v", 10)
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    assert await store.take("k") == b"v"  # answers pass through unchanged
    after = samples(render())

    def delta(name: str, op: str) -> float:
        key = (name, (("op", op),))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("bff_store_duration_seconds_count", "set") == 1
    assert delta("bff_store_duration_seconds_count", "get") == 1
    assert delta("bff_store_duration_seconds_count", "take") == 1
    assert delta("bff_store_errors_total", "get") == 1
    assert delta("bff_store_errors_total", "set") == 0


async def test_op_calls_are_timed_by_endpoint_even_when_they_fail() -> None:
    @metrics.op_call("op_test")
    async def call(fail: bool) -> str:
        if fail:
            raise RuntimeError("down")
        return "ok"

    before = sample(render(), "bff_op_request_duration_seconds_count", endpoint="op_test")
    assert await call(False) == "ok"
    with pytest.raises(RuntimeError):
        await call(True)
    after = sample(render(), "bff_op_request_duration_seconds_count", endpoint="op_test")
    assert after == before + 2


def test_get_endpoint_names_the_op_endpoint_of_a_get() -> None:
    url = "https://op.example/.well-known/openid-configuration"
    assert metrics.get_endpoint(None, url) == "discovery"
    assert metrics.get_endpoint(None, "https://op.example/jwks") == "jwks"
    assert metrics.get_endpoint(None, "https://op.example/me", {"Authorization": "Bearer t"}) == (
        "userinfo"
    )


def test_metrics_dir_is_private_exported_meanwhile_and_removed() -> None:
    assert ENV not in os.environ
    with metrics_dir() as path:
        assert os.environ[ENV] == path and os.path.isdir(path)
        assert os.listdir(path) == []  # never an earlier run's files
    assert ENV not in os.environ and not os.path.exists(path)


# A worker as bff runs it: PROMETHEUS_MULTIPROC_DIR set before bff.metrics is imported.
WORKER = """
import sys
from bff import metrics
metrics.Metrics().inc("bff_logouts_total", cause="mp_test")
metrics.stream_opened("mp_test")
if sys.argv[1] == "render":
    print(metrics.render())
"""


def _worker(path: str, mode: str) -> str:
    env = {**os.environ, ENV: path}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, mode],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def test_processes_sharing_the_dir_are_summed_and_a_dead_ones_gauges_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with metrics_dir() as path:
        _worker(path, "count")
        _worker(path, "count")
        text = _worker(path, "render")
        # Three processes each counted once; the two that exited still hold an open stream
        # as far as their files say, the one rendering holds its own.
        assert sample(text, "bff_logouts_total", cause="mp_test") == 3
        assert sample(text, "bff_open_streams", kind="mp_test") == 3
        for name in os.listdir(path):
            if name.startswith("gauge_livesum_"):
                worker_exited(int(name.removesuffix(".db").rpartition("_")[2]))
        text = _worker(path, "render")
        # Counters survive their process (no reset); live gauges only count live processes.
        assert sample(text, "bff_logouts_total", cause="mp_test") == 4
        assert sample(text, "bff_open_streams", kind="mp_test") == 1


async def test_open_streams_count_proxied_websockets_and_streamed_responses(
    tmp_path: Path, aiohttp_client: MakeClient, aiohttp_server: Any
) -> None:
    release = asyncio.Event()

    async def streamed(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()  # no Content-Length: bff streams it instead of buffering
        await out.prepare(request)
        await out.write(b"first ")
        await release.wait()
        await out.write(b"last")
        await out.write_eof()
        return out

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    up = web.Application()
    up.router.add_get("/s", streamed)
    up.router.add_get("/ws", socket)
    server = await aiohttp_server(up)
    base = f"http://127.0.0.1:{server.port}"
    app = create_app(
        settings(
            tmp_path,
            f"upstreams: [{{path: /str, url: '{base}/s', token: none}},"
            f" {{path: /sock, url: '{base}/ws', token: none, websocket: true}}]",
        ),
        store=MemoryStore(),
    )
    client = await aiohttp_client(app)

    def open_now(kind: str) -> float:
        return sample(render(), "bff_open_streams", kind=kind)

    stream_before, ws_before = open_now("stream"), open_now("websocket")
    resp = await client.get("/str", headers={"X-CSRF": "1"})
    assert resp.status == 200
    assert await resp.content.readexactly(6) == b"first "
    assert open_now("stream") == stream_before + 1
    release.set()
    assert await resp.read() == b"last"
    assert open_now("stream") == stream_before

    hist = "bff_request_duration_seconds_count"
    ws_timed = sample(render(), hist, kind="websocket")
    ws = await client.ws_connect("/sock", headers={"Origin": "http://localhost:8080"})
    await ws.send_str("ping")
    assert (await ws.receive_str(timeout=10)) == "ping"
    assert open_now("websocket") == ws_before + 1
    await ws.close()

    def ws_done() -> bool:
        # The proxy notices the close on its own task; the middleware then times the request.
        return open_now("websocket") == ws_before and sample(render(), hist, kind="websocket") == (
            ws_timed + 1
        )

    for _ in range(200):  # bounded: 10 s at most
        if ws_done():
            break
        await asyncio.sleep(0.05)
    assert open_now("websocket") == ws_before
    assert sample(render(), hist, kind="websocket") == ws_timed + 1


async def test_refresh_lock_waits_are_timed_by_how_they_ended(
    fake_redis_server: fakeredis.FakeServer,
) -> None:
    op = FakeOp()
    # The holder is slow, so the other instance finds the lock taken, waits and uses its result
    # (b tries the lock right after a takes it; a loop stalled this long would break that).
    op.delay = 1.0
    a, b = Instance(fake_redis_server, op), Instance(fake_redis_server, op)
    name = "bff_refresh_lock_wait_seconds_count"
    acquired, joined = (
        sample(render(), name, outcome="acquired"),
        sample(render(), name, outcome="joined"),
    )
    try:
        created = await a.sessions.create(_data())
        on_a, on_b = await a.load(created), await b.load(created)
        first = asyncio.create_task(a.refresher.access_token(on_a))
        for _ in range(200):  # bounded: until a holds the lock
            if await a.store.get(lock_key(created.id)) is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(first, b.refresher.access_token(on_b))
    finally:
        await a.store.close()
        await b.store.close()
    assert op.refreshes == 1
    assert sample(render(), name, outcome="acquired") == acquired + 1
    assert sample(render(), name, outcome="joined") == joined + 1


def test_bff_run_gives_workers_a_directory_and_marks_each_exited_worker_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's workers inherit PROMETHEUS_MULTIPROC_DIR from the parent (one worker
    too), every worker that ends is marked dead, and the directory is gone after the run."""
    from bff import cli, supervisor

    monkeypatch.delenv(ENV, raising=False)
    seen: list[str | None] = []
    dead: list[int] = []

    class FakeSupervisor:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.on_exit: list[Callable[[int], None]] = []

        async def run(self) -> int:
            seen.append(os.environ.get(ENV))
            for pid in (4101, 4102):  # two workers ended
                for hook in self.on_exit:
                    hook(pid)
            return 0

    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    monkeypatch.setattr(supervisor, "bind_slots", lambda host, port, count: [])
    monkeypatch.setattr(cli, "worker_exited", dead.append)
    store = "store: 'redis://127.0.0.1:1'"
    path = tmp_path / "bff.yaml"
    path.write_text(
        "public_url: http://127.0.0.1:8080\n"
        'oidc: {issuer: "http://127.0.0.1:1", client_id: c, client_secret: s}\n'
        f'keys: ["{"k" * 43}"]\nsession: {{cookie: {{name: b, secure: false}}, {store}}}\n'
    )
    for workers in ("2", "1"):  # one worker: the same mode
        dead.clear()
        assert cli.main(["run", "--config", str(path), "--workers", workers]) == 0
        assert seen[-1] is not None and "bff-metrics-" in seen[-1]
        assert dead == [4101, 4102]
        assert ENV not in os.environ and not os.path.exists(seen[-1])


async def test_a_cancelled_request_counts_as_499_and_leaves_nothing_in_flight() -> None:
    from aiohttp.test_utils import make_mocked_request

    app = web.Application()

    async def handler(request: web.Request) -> web.StreamResponse:
        raise asyncio.CancelledError()  # what the server does to a handler whose client left

    app.router.add_get("/cancel-test", handler)
    request = make_mocked_request("GET", "/cancel-test", app=app)
    request._match_info = await app.router.resolve(request)
    labels = {"route": "/cancel-test", "method": "GET", "status": "499"}
    before = sample(render(), "bff_requests_total", **labels)
    with pytest.raises(asyncio.CancelledError):
        await metrics.request_middleware()(request, handler)
    assert sample(render(), "bff_requests_total", **labels) == before + 1
    assert sample(render(), "bff_requests_in_flight") == 0


def test_a_flushed_batch_equals_one_observe_per_value() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values = [0.001, 0.005, 0.0051, 0.3, 30.0, 31.0, 2.5]  # on a bound, just above, past the last
    reference = CollectorRegistry()
    direct = Histogram(
        "ref_seconds", "ref", ["route"], buckets=metrics._LATENCY, registry=reference
    )
    for v in values:
        direct.labels("/batch-test").observe(v)
        metrics._observe(metrics._pending.upstreams, "/batch-test", v)
    text = render()  # flushes
    want = generate_latest(reference).decode()
    for suffix in ("_bucket", "_count", "_sum"):
        for (name, labels), value in samples(want).items():
            if name == "ref_seconds" + suffix:
                got = sample(text, "bff_upstream_duration_seconds" + suffix, **dict(labels))
                assert got == pytest.approx(value), (suffix, labels)
