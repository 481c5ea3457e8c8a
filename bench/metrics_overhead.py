"""What the metrics cost per request: ``python -m bench.metrics_overhead``.

Times, in this process, the per-request instrumentation (``bff.metrics.request_middleware``, one
upstream timing, one timed store call) against the same work without it, first with values in
process memory and then, in a child process, in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
as ``bff run`` runs). Prints microseconds of CPU per call; asserts nothing. Bounded: a fixed
number of calls, best of a few rounds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

N = 100_000
ROUNDS = 5


async def _best(call: Callable[[], Awaitable[object]]) -> float:
    """Microseconds of CPU per call, the best of ``ROUNDS`` rounds of ``N`` calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(N):
            await call()
        best = min(best, time.process_time() - started)
    return best / N * 1e6


async def measure() -> None:
    from bff import metrics
    from bff.store.instrumented import InstrumentedStore
    from bff.store.memory import MemoryStore

    app = web.Application()
    response = web.Response(text="ok")

    async def handler(request: web.Request) -> web.StreamResponse:
        return response

    app.router.add_get("/api/{tail:.*}", handler)
    request = make_mocked_request("GET", "/api/items/1", app=app)
    match = await app.router.resolve(request)
    request._match_info = match  # what the server does before the middlewares run
    middleware = metrics.request_middleware()
    plain = await _best(lambda: handler(request))
    counted = await _best(lambda: middleware(request, handler))

    started = time.perf_counter()

    async def upstream() -> None:
        metrics.observe_upstream("/api", started)

    async def nothing() -> None:
        return None

    bare = await _best(nothing)
    timed = await _best(upstream)
    memory = MemoryStore()
    await memory.set("k", b"v", 60)
    wrapped = InstrumentedStore(memory)
    store_plain = await _best(lambda: memory.get("k"))
    store_timed = await _best(lambda: wrapped.get("k"))
    mode = "multiprocess" if metrics.MULTIPROCESS else "in-process"
    print(
        f"{mode:>12}: request middleware +{counted - plain:.2f} us "
        f"({plain:.2f} -> {counted:.2f}); upstream timing +{timed - bare:.2f} us; "
        f"store call +{store_timed - store_plain:.2f} us ({store_plain:.2f} -> {store_timed:.2f})"
    )
    without, with_ = await _served(middleware)
    print(
        f"{mode:>12}: a whole loopback request (aiohttp server and client, this process) "
        f"{without:.0f} us CPU without the middleware, {with_:.0f} us with it"
    )


async def _served(middleware: Any) -> tuple[float, float]:
    """CPU microseconds per keep-alive GET served and fetched in this process, without and with
    the middleware: rounds interleaved (warm-up and machine load hit both alike), best of each."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @web.middleware
    async def passthrough(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request)  # stands for bff's error middleware, there either way

    apps = [
        web.Application(middlewares=[passthrough]),
        web.Application(middlewares=[middleware, passthrough]),
    ]
    for app in apps:
        app.router.add_get("/api/{tail:.*}", ok)
    calls = 2000
    best = [float("inf"), float("inf")]
    async with TestClient(TestServer(apps[0])) as a, TestClient(TestServer(apps[1])) as b:
        for _ in range(ROUNDS * 2):
            for i, client in enumerate((a, b)):
                started = time.process_time()
                for _ in range(calls):
                    async with client.get("/api/x") as resp:
                        await resp.read()
                best[i] = min(best[i], time.process_time() - started)
    return best[0] / calls * 1e6, best[1] / calls * 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        asyncio.run(measure())
        return
    asyncio.run(measure())
    with tempfile.TemporaryDirectory(prefix="bff-bench-metrics-") as path:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path}
        subprocess.run(
            [sys.executable, "-m", "bench.metrics_overhead", "--child"], env=env, check=True
        )


if __name__ == "__main__":
    main()
