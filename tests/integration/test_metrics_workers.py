"""One scrape of ``bff run --workers 2`` counts what both workers did, each event once (issue 10.3).

A real OP, Redis and upstream: a login, proxied calls on many connections (so both workers serve
some), a forced refresh (the upstream refuses the access token) and a logout; then one scrape of
the shared metrics port, read with prometheus-client's own parser. Each worker's own share is
read from its files in the multiprocess directory, to show that both counted and that the scrape
is their sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    read_session,
    write_config,
)
from tests.support.procfs import children, socket_inodes, tcp_sockets
from tests.support.procs import OidcProvider, RedisServer, free_port
from tests.support.scrape import sample, samples

KEY = "metrics-test-key-" + "m" * 32
CALLS = 24


def multiproc_dir(pid: int) -> Path:
    """The ``PROMETHEUS_MULTIPROC_DIR`` a worker was started with (its environment)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in env:
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError(f"worker {pid} has no PROMETHEUS_MULTIPROC_DIR")


def worker_share(directory: Path, pid: int, into: Path) -> str:
    """The exposition text of one worker's counters alone (its files, collected by the client)."""
    into.mkdir()
    for file in directory.glob(f"*_{pid}.db"):
        shutil.copy(file, into / file.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(into))  # type: ignore[no-untyped-call]
    return generate_latest(registry).decode()


async def test_one_scrape_sums_both_workers_and_counts_each_event_once(
    redis_server: RedisServer, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = await oidc_op.register_client(redirect_uris=[f"{url}/bff/callback"])
    with EchoUpstream() as upstream:
        config = base_config(
            public_url=url,
            issuer=oidc_op.issuer,
            client=client,
            store=redis_server.url,
            keys=[KEY],
            static=tmp_path / "static",
            upstreams=[{"path": "/api", "url": f"{upstream.url}/v1"}],
        )
        proc = BffProcess(write_config(tmp_path, config), port=port, workers=2)
        try:
            await asyncio.to_thread(proc.start)
            assert proc.pid is not None
            deadline = time.monotonic() + 30
            while True:
                listening = tcp_sockets(port, "0A")
                workers = [p for p in children(proc.pid) if socket_inodes(p) & listening]
                if len(workers) == 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert len(workers) == 2, "expected two worker processes listening on the port"

            cookie = await login(url, "metrics-user")
            headers = {"X-CSRF": "1", "Cookie": f"{COOKIE_NAME}={cookie}"}
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{url}/bff/user", headers=headers) as resp,
            ):
                assert resp.status == 200
                logout_url = (await resp.json())["logout_url"]
            # Each call on a connection of its own, all held open: the kernel spreads them.
            sessions = [aiohttp.ClientSession() for _ in range(CALLS)]
            try:
                for http in sessions:
                    async with http.get(f"{url}/api/items/1", headers=headers) as resp:
                        assert resp.status == 200
                established = tcp_sockets(port, "01")
                serving = [w for w in workers if socket_inodes(w) & established]
                assert len(serving) == 2, "both workers should hold client connections"
            finally:
                for http in sessions:
                    await http.close()
            # A refresh: the upstream refuses the current token once, bff refreshes and retries.
            session = await read_session(redis_server.url, [KEY], cookie)
            assert session is not None
            upstream.reject(session.access_token)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/api/items/2", headers=headers) as resp:
                    assert resp.status == 200
                async with http.get(
                    f"{url}{logout_url}", headers=headers, allow_redirects=False
                ) as resp:
                    logout_status = resp.status
                    assert logout_status in (302, 303)
                # Each worker writes its per-request counts once a second (bff.metrics.flush):
                # scrape until the other worker's last second is in, bounded.
                deadline = time.monotonic() + 20
                while True:
                    async with http.get(f"{proc.metrics_url}/metrics") as resp:
                        assert resp.status == 200
                        text = await resp.text()
                    done = sample(
                        text, "bff_requests_total", route="/bff/logout", method="GET",
                        status=str(logout_status),
                    )  # fmt: skip
                    api = sample(
                        text, "bff_requests_total", route="/api", method="GET", status="200"
                    )
                    if (done, api) == (1, CALLS + 1) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)

            seen = upstream.seen()
            # Every refresh gives a new access token, which the next upstream call carries.
            refreshes = len({s.token for s in seen}) - 1
            assert refreshes >= 1
            assert [s.status for s in seen].count(401) == 1

            def requests(route: str, status: int) -> float:
                return sample(
                    text, "bff_requests_total", route=route, method="GET", status=str(status)
                )

            assert requests("/bff/login", 302) == 1
            assert requests("/bff/callback", 200) == 1
            assert requests("/bff/user", 200) == 1
            assert requests("/api", 200) == CALLS + 1
            assert requests("/bff/logout", logout_status) == 1
            assert sample(text, "bff_logins_total", outcome="ok") == 1
            assert sample(text, "bff_refreshes_total", outcome="ok") == refreshes
            assert sample(text, "bff_logouts_total", cause="user") == 1
            hist = "bff_request_duration_seconds_count"
            assert sample(text, hist, kind="proxy") == CALLS + 1
            assert sample(text, "bff_upstream_duration_seconds_count", route="/api") == len(seen)
            # The code exchange and each refresh: one token endpoint call each.
            token_calls = sample(text, "bff_op_request_duration_seconds_count", endpoint="token")
            assert token_calls == 1 + refreshes
            lock_waits = sample(text, "bff_refresh_lock_wait_seconds_count", outcome="acquired")
            assert lock_waits == refreshes
            assert sample(text, "bff_store_duration_seconds_count", op="get") > 0
            assert not any(
                name == "bff_store_errors_total" and value
                for (name, _), value in samples(text).items()
            )
            # The scrape itself is on the metrics listener: nothing is in flight on the public one.
            assert sample(text, "bff_requests_in_flight") == 0

            # Both workers counted proxied calls, and the scrape is exactly their sum.
            directory = multiproc_dir(workers[0])
            assert multiproc_dir(workers[1]) == directory
            shares = [worker_share(directory, pid, tmp_path / f"share-{pid}") for pid in workers]
            per_worker = [
                sample(s, "bff_requests_total", route="/api", method="GET", status="200")
                for s in shares
            ]
            assert all(n > 0 for n in per_worker), per_worker
            assert sum(per_worker) == CALLS + 1
        finally:
            proc.terminate()  # SIGTERM: the parent exits cleanly and removes its directory
    # The parent removes the directory when it exits.
    assert not directory.exists()


def mapped_metrics_dirs(pid: int) -> set[Path]:
    """Directories of the metric files a process or its children (the supervisor's workers)
    have memory-mapped (multiprocess mode)."""
    found = set()
    for each in [pid, *children(pid)]:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{each}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1]
                if path.endswith(".db") and "/bff-metrics-" in path:
                    found.add(Path(path).parent)
    return found


async def test_a_single_worker_run_uses_the_same_multiprocess_mode(
    redis_server: RedisServer, oidc_op: OidcProvider, tmp_path: Path
) -> None:
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
    )
    proc = BffProcess(write_config(tmp_path, config), port=port, workers=1)
    try:
        await asyncio.to_thread(proc.start)
        assert proc.pid is not None
        async with aiohttp.ClientSession() as http:
            before = 0.0
            async with http.get(f"{proc.metrics_url}/metrics") as resp:
                before = sample(
                    await resp.text(), "bff_requests_total", route="/healthz", method="GET",
                    status="200",
                )  # fmt: skip
            for _ in range(3):
                async with http.get(f"{url}/healthz") as resp:
                    assert resp.status == 200
            async with http.get(f"{proc.metrics_url}/metrics") as resp:
                text = await resp.text()
        labels = {"route": "/healthz", "method": "GET", "status": "200"}
        assert sample(text, "bff_requests_total", **labels) == before + 3
        # The values come from the files, as with many workers: the in-process registry's
        # python_gc_* and process_* collectors are not in a multiprocess scrape.
        assert "python_gc_objects_collected_total" not in text
        (directory,) = mapped_metrics_dirs(proc.pid)
        worker = children(proc.pid)
        assert len(worker) == 1  # the supervisor's one worker writes the counters
        assert any(directory.glob(f"counter_{worker[0]}.db"))
    finally:
        proc.terminate()
    assert not directory.exists()
