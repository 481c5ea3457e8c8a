"""Issue 10, point 1: ``bff run`` supervises its workers; SIGTERM drains; SIGHUP reloads.

Every test runs a real ``bff run`` (``BffProcess``) against a real Redis and the test OP, with an
upstream in this test's event loop that answers with its own name, slowly when asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.integration.test_proxy import KEY
from tests.support.bff_procs import BffProcess, base_config, write_config
from tests.support.procfs import children, socket_inodes, tcp_sockets
from tests.support.procs import HOST, OidcProvider, RedisServer, free_port

API = {"X-CSRF": "1"}


class NamedUpstream:
    """``/up/x`` answers ``{"up": name}``; ``/up/slow?ms=N`` the same after N ms."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.in_flight = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _x(self, request: web.Request) -> web.Response:
        return web.json_response({"up": self.name})

    async def _slow(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            await asyncio.sleep(int(request.query["ms"]) / 1000)
        finally:
            self.in_flight -= 1
        return web.json_response({"up": self.name, "slow": True})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"{self.name}:{msg.data}")
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/up/x", self._x)
        app.router.add_get("/up/ws", self._ws)
        app.router.add_get("/up/slow", self._slow)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[NamedUpstream, NamedUpstream]]:
    a, b = NamedUpstream("A"), NamedUpstream("B")
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


Configure = Callable[..., Path]


@pytest.fixture
async def configure(
    redis_server: RedisServer, oidc_op: OidcProvider, tmp_path: Path
) -> Callable[..., Any]:
    """``configure(port, upstream_url, **top_level)`` writes bff.yaml and returns its path."""
    clients: dict[int, dict[str, Any]] = {}

    async def make(port: int, upstream: str, **extra: Any) -> Path:
        url = f"http://{HOST}:{port}"
        if port not in clients:
            clients[port] = await oidc_op.register_client(redirect_uris=[f"{url}/bff/callback"])
        config = base_config(
            public_url=url,
            issuer=oidc_op.issuer,
            client=clients[port],
            store=redis_server.url,
            keys=[KEY],
            static=tmp_path / "static",
            upstreams=[
                {"path": "/api", "url": f"{upstream}/up", "token": "none", "websocket": True}
            ],
        )
        config.update(extra)
        return write_config(tmp_path, config)

    return make


def events(proc: BffProcess) -> list[dict[str, Any]]:
    """The JSON log lines on the process's stderr (parent and workers share it)."""
    out = []
    for line in (proc.workdir / "stderr.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def wait_for(
    what: str, check: Callable[[], bool], proc: BffProcess, limit: float = 60
) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{proc.logs()}")
        await asyncio.sleep(0.05)


def logged(proc: BffProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in events(proc) if e.get("event") == event]


def workers_of(proc: BffProcess) -> set[int]:
    """The worker processes that hold a listening socket on the public port."""
    assert proc.pid is not None
    listening = tcp_sockets(proc.port, "0A")
    found = set()
    for pid in children(proc.pid):
        try:
            if socket_inodes(pid) & listening:
                found.add(pid)
        except OSError:
            continue
    return found


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, headers=API) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_sigterm_drains_then_lets_50_slow_calls_finish(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, _ = upstreams
    port = free_port()
    path = await configure(port, a.url, shutdown={"drain": "6s", "grace": "30s"})
    proc = BffProcess(path, port=port, workers=2)
    try:
        await asyncio.to_thread(proc.start)
        await wait_for("two workers", lambda: len(workers_of(proc)) == 2, proc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            calls = [
                asyncio.create_task(get_json(http, f"{proc.url}/api/slow?ms=9000"))
                for _ in range(50)
            ]
            await wait_for("50 calls upstream", lambda: a.in_flight == 50, proc)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGTERM)
            async with aiohttp.ClientSession() as fresh:
                # /readyz turns 503 at once while the listener still accepts new requests.
                deadline = time.monotonic() + 30
                while True:
                    async with fresh.get(f"{proc.url}/readyz") as resp:
                        if resp.status == 503:
                            assert (await resp.json())["status"] == "draining"
                            break
                    assert time.monotonic() < deadline, proc.logs()
                    await asyncio.sleep(0.05)
                assert await get_json(fresh, f"{proc.url}/api/x") == (200, {"up": "A"})
            results = await asyncio.gather(*calls)
        assert results == [(200, {"up": "A", "slow": True})] * 50
        assert await asyncio.to_thread(proc.wait_exit, 60) == 0
        steps = [e["event"] for e in events(proc) if e.get("event", "").startswith("shutdown.")]
        for step in ("shutdown.start", "shutdown.draining", "shutdown.stopped_accepting"):
            assert step in steps
        assert steps.count("shutdown.done") == 3  # both workers and the parent
        assert steps.index("shutdown.draining") < steps.index("shutdown.stopped_accepting")
    finally:
        await asyncio.to_thread(proc.close)


async def test_sigterm_closes_websockets_with_1001(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, _ = upstreams
    port = free_port()
    path = await configure(port, a.url, shutdown={"drain": "1s", "grace": "20s"})
    proc = BffProcess(path, port=port, workers=1)
    try:
        await asyncio.to_thread(proc.start)
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{proc.url}/api/ws", origin=proc.url) as ws,
        ):
            await ws.send_str("hi")
            assert (await ws.receive(timeout=30)).data == "A:hi"
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGTERM)
            msg = await ws.receive(timeout=60)
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert ws.close_code == 1001
        assert await asyncio.to_thread(proc.wait_exit, 60) == 0
        stopped = logged(proc, "shutdown.stopped_accepting")
        assert [e["websockets"] for e in stopped] == [1]
    finally:
        await asyncio.to_thread(proc.close)


async def test_sighup_under_load_switches_the_upstream_without_a_failed_request(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, b = upstreams
    port = free_port()
    path = await configure(port, a.url)
    proc = BffProcess(path, port=port, workers=2)
    outcomes: list[tuple[int, str] | str] = []
    done = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 120
            while not done.is_set() and len(outcomes) < 20_000 and time.monotonic() < deadline:
                try:
                    status, body = await get_json(http, f"{proc.url}/api/x")
                    outcomes.append((status, body.get("up", "")))
                except (aiohttp.ClientError, ValueError) as exc:
                    outcomes.append(repr(exc))

    try:
        await asyncio.to_thread(proc.start)
        await wait_for("two workers", lambda: len(workers_of(proc)) == 2, proc)
        old = workers_of(proc)
        load = [asyncio.create_task(client()) for _ in range(4)]
        await wait_for("load", lambda: len(outcomes) >= 50, proc)
        csp = "default-src 'none'; script-src 'self'"
        await configure(port, b.url, security={"content_security_policy": csp})
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for("reload.done", lambda: bool(logged(proc, "reload.done")), proc, 120)
        # The old workers finish what their connections carried until they stop, with A.
        retired = lambda: len(logged(proc, "worker.retired")) == 2  # noqa: E731
        await wait_for("old workers retired", retired, proc)
        assert all(gone(p) for p in old)
        mark = len(outcomes)
        await wait_for("requests after the reload", lambda: len(outcomes) >= mark + 100, proc)
        done.set()
        await asyncio.gather(*load)
        failed = [o for o in outcomes if o not in ((200, "A"), (200, "B"))]
        assert failed == [], f"{len(failed)} failed of {len(outcomes)}: {failed[:5]}"
        assert {o for o in outcomes[mark:]} == {(200, "B")}
        assert workers_of(proc).isdisjoint(old)
        async with aiohttp.ClientSession() as http, http.get(f"{proc.url}/") as resp:
            assert resp.headers["Content-Security-Policy"] == csp  # the new security: too
    finally:
        done.set()
        await asyncio.to_thread(proc.close)


async def test_a_broken_file_on_sighup_changes_nothing(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, _ = upstreams
    port = free_port()
    path = await configure(port, a.url)
    proc = BffProcess(path, port=port, workers=1)
    try:
        await asyncio.to_thread(proc.start)
        before = workers_of(proc)
        assert len(before) == 1
        path.write_text(path.read_text() + "\nnot_a_key: 1\n")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for("reload.refused", lambda: bool(logged(proc, "reload.refused")), proc)
        refused = logged(proc, "reload.refused")[0]
        assert any("not_a_key" in p for p in refused["problems"]), refused
        assert workers_of(proc) == before
        async with aiohttp.ClientSession() as http:
            assert await get_json(http, f"{proc.url}/api/x") == (200, {"up": "A"})
        assert not logged(proc, "reload.done")
    finally:
        await asyncio.to_thread(proc.close)


async def test_a_memory_store_on_sighup_with_two_workers_changes_nothing(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, b = upstreams
    port = free_port()
    path = await configure(port, a.url)
    proc = BffProcess(path, port=port, workers=2)
    try:
        await asyncio.to_thread(proc.start)
        await wait_for("two workers", lambda: len(workers_of(proc)) == 2, proc)
        before = workers_of(proc)
        config = yaml.safe_load((await configure(port, b.url)).read_text())
        config["session"]["store"] = "memory://"
        path.write_text(yaml.safe_dump(config))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for("reload.refused", lambda: bool(logged(proc, "reload.refused")), proc)
        assert "memory://" in logged(proc, "reload.refused")[0]["problems"][0]
        assert workers_of(proc) == before
        async with aiohttp.ClientSession() as http:
            assert await get_json(http, f"{proc.url}/api/x") == (200, {"up": "A"})
    finally:
        await asyncio.to_thread(proc.close)


async def test_a_killed_worker_is_replaced(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, _ = upstreams
    port = free_port()
    path = await configure(port, a.url)
    proc = BffProcess(path, port=port, workers=1)
    try:
        await asyncio.to_thread(proc.start)
        (first,) = workers_of(proc)
        os.kill(first, signal.SIGKILL)
        await wait_for(
            "a new worker", lambda: len(workers_of(proc) - {first}) == 1 and gone(first), proc
        )
        async with aiohttp.ClientSession() as http:
            assert await get_json(http, f"{proc.url}/api/x") == (200, {"up": "A"})
        died = logged(proc, "worker.died")
        assert len(died) == 1
        assert died[0]["pid"] == first and died[0]["status"] == "signal SIGKILL"
    finally:
        await asyncio.to_thread(proc.close)


async def test_sigkill_of_the_parent_takes_the_workers_down(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, _ = upstreams
    port = free_port()
    path = await configure(port, a.url, shutdown={"drain": "0s", "grace": "5s"})
    proc = BffProcess(path, port=port, workers=2)
    try:
        await asyncio.to_thread(proc.start)
        await wait_for("two workers", lambda: len(workers_of(proc)) == 2, proc)
        workers = workers_of(proc)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        await wait_for("workers gone", lambda: all(gone(p) for p in workers), proc)
    finally:
        await asyncio.to_thread(proc.close)


async def test_a_second_bff_run_on_a_taken_port_is_refused(
    configure: Any, upstreams: tuple[NamedUpstream, NamedUpstream]
) -> None:
    a, _ = upstreams
    port = free_port()
    path = await configure(port, a.url)
    first = BffProcess(path, port=port, workers=2)
    second = BffProcess(path, port=port, workers=2)
    try:
        await asyncio.to_thread(first.start)
        second.spawn()
        assert await asyncio.to_thread(second.wait_exit, 60) == 2
        err = (second.workdir / "stderr.log").read_text()
        assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    finally:
        await asyncio.to_thread(second.close)
        await asyncio.to_thread(first.close)
