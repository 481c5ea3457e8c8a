"""``bff run --workers 2``: two processes serve one port (SO_REUSEPORT) and share the sessions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.integration.test_proxy import KEY, Upstream
from tests.support.bff_procs import COOKIE_NAME, BffProcess, base_config, login, write_config
from tests.support.procfs import children, socket_inodes, tcp_sockets
from tests.support.procs import OidcProvider, RedisServer, free_port


async def test_two_workers_serve_one_port_and_share_sessions(
    redis_server: RedisServer, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    upstream = Upstream()
    await upstream.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = await oidc_op.register_client(redirect_uris=[f"{url}/bff/callback"])
    config = base_config(
        public_url=url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=[KEY],
        static=tmp_path / "static",
        upstreams=[{"path": "/api", "url": f"{upstream.url}/up"}],
    )
    proc = BffProcess(write_config(tmp_path, config), port=port, workers=2)
    try:
        await asyncio.to_thread(proc.start)
        assert proc.pid is not None
        # /healthz answered, so one worker is up; the other may still be starting. The public
        # socket is inherited from the parent at spawn, so a worker holds it before it has built
        # its app; the metrics listener, which each worker binds itself (SO_REUSEPORT) during
        # start-up, is the sign that the worker is up. Wait for both, bounded.
        deadline = time.monotonic() + 20
        while True:
            listening = tcp_sockets(port, "0A")
            metrics_listening = tcp_sockets(proc.metrics_port, "0A")
            workers = [p for p in children(proc.pid) if socket_inodes(p) & listening]
            started = [w for w in workers if socket_inodes(w) & metrics_listening]
            if len(started) == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert len(workers) == 2, "expected two worker processes listening on the port"
        # Issue 9, point 6: each worker binds the metrics listener; the public port never serves
        # /metrics.
        assert started == workers, "each worker should bind the metrics listener"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proc.metrics_url}/metrics") as resp:
                assert resp.status == 200
            async with http.get(f"{url}/metrics") as resp:
                assert resp.status == 404

        cookie = await login(url, "worker-user")
        headers = {"X-CSRF": "1", "Cookie": f"{COOKIE_NAME}={cookie}"}
        # Many connections held open at once: the kernel spreads them over both listeners.
        sessions = [aiohttp.ClientSession() for _ in range(24)]
        try:
            statuses = []
            for http in sessions:
                async with http.get(f"{url}/api/x", headers=headers) as resp:
                    statuses.append(resp.status)
            assert statuses == [200] * len(sessions)
            established = tcp_sockets(port, "01")
            serving = [w for w in workers if socket_inodes(w) & established]
            assert len(serving) == 2, "both workers should hold client connections"
        finally:
            for http in sessions:
                await http.close()
        assert all(s.header("authorization") for s in upstream.seen)
    finally:
        await asyncio.to_thread(proc.close)
        await upstream.close()
