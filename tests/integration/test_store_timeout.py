"""A hung Redis is a quick 503, never a long wait: ``session.store_timeout`` bounds every call.

"Hung" two ways: a TCP listener that accepts connections and never answers (a half-dead
proxy or a frozen VM), and a real redis-server stopped with SIGSTOP under a running ``bff run``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from bff.errors import StoreUnavailable
from bff.store import open_store
from tests.support.bff_procs import BffProcess, EchoUpstream, base_config, login, write_config
from tests.support.procs import HOST, OidcProvider
from tests.support.redis_procs import PASSWORD, USER, RedisNode

API = "/api/echo"


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port whose listener completes TCP handshakes (backlog) but never reads or answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("store_timeout", [0.3, 1.0])
async def test_every_store_call_on_a_silent_server_fails_within_the_store_timeout(
    silent_listener: int, store_timeout: float
) -> None:
    store = open_store(f"redis://{HOST}:{silent_listener}/0", timeout=store_timeout)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("bff:{a}:s"),
        lambda: store.set("bff:{a}:s", b"v", 10),
        lambda: store.replace("bff:{a}:s", b"v", b"w", 10),
        lambda: store.acquire_lock("bff:{a}:lock", "me", 5),
        lambda: store.index_add("bff:{sub:x}:sessions", "a", 10),
        lambda: store.take_token("bff:{rl:x}:login", 1.0, 5),
        lambda: store.ping(),
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            elapsed = time.monotonic() - started
            # The configured timeout is what it waits (not less), and never the old 8 s.
            assert store_timeout * 0.9 <= elapsed < store_timeout + 2.0, elapsed
    finally:
        await store.close()


async def test_a_stopped_redis_gives_503_with_retry_after_quickly_and_service_resumes(
    oidc_op: OidcProvider, tmp_path: Path
) -> None:
    with RedisNode() as node, EchoUpstream() as upstream:
        proc = BffProcess(tmp_path / "bff.yaml")
        client = await oidc_op.register_client([f"{proc.url}/bff/callback"])
        config = base_config(
            public_url=proc.url,
            issuer=oidc_op.issuer,
            client=client,
            store=f"redis://{HOST}:{node.port}/0",
            keys=["k" * 43],
            static=tmp_path / "static",
            upstreams=[{"path": API, "url": upstream.url, "token": "user"}],
            cache_ttl="0s",
        )
        # ACL user and password from session.redis (the password a Secret).
        config["session"]["redis"] = {"username": USER, "password": PASSWORD}
        config["session"]["store_timeout"] = "300ms"
        write_config(tmp_path, config)
        with proc:
            cookie = await login(proc.url, "hung-redis")
            headers = {"Cookie": f"bff-session={cookie}", "X-CSRF": "1"}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                async with http.get(f"{proc.url}{API}/x", headers=headers) as resp:
                    assert resp.status == 200
                node.pause()
                try:
                    for path in (f"{API}/x", "/bff/user", "/readyz"):
                        started = time.monotonic()
                        async with http.get(proc.url + path, headers=headers) as resp:
                            elapsed = time.monotonic() - started
                            body = await resp.json()
                            assert resp.status == 503, (path, body)
                            assert resp.headers["Retry-After"]
                        assert elapsed < 3.0, f"{path} took {elapsed:.1f} s on a hung Redis"
                    assert "store_unavailable" in str(body)
                finally:
                    node.resume()
                deadline = time.monotonic() + 20
                while True:
                    async with http.get(f"{proc.url}{API}/x", headers=headers) as resp:
                        if resp.status == 200:
                            break
                        assert time.monotonic() < deadline, "no recovery after SIGCONT"
                    await asyncio.sleep(0.1)
