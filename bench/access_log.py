"""``python -m bench.access_log``: what the access log and the request id cost per request.

Runs bff's access middleware on one mocked, routed request around a trivial handler, in one process,
three ways: ``log.access: false`` (request id only), ``log.access: true`` with the line formatted
by the JSON formatter into a buffer (what ``bff run`` does, minus the write to stderr), and the
same with a session cookie (the session handle's two hashes). Bounded: a fixed number of
iterations; it prints numbers, asserts nothing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bff.access import SESSION_SECRET, access_middleware
from bff.log import setup_logging

N = 20_000

Run = Callable[[], Awaitable[object]]


async def handler(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b'{"ok":true}', content_type="application/json")


async def per_call(run: Run, n: int = N) -> float:
    """Microseconds per call of ``run``, best of three runs of ``n``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(n):
            await run()
        best = min(best, (time.perf_counter_ns() - start) / n / 1000)
    return best


async def mocked(*, session: bool = False, request_id: str | None = None) -> web.Request:
    """One routed request, built once: building requests is not what is measured."""
    app = web.Application()
    app.router.add_get("/api/{tail:.*}", handler)
    headers = {"X-Request-ID": request_id} if request_id else {}
    request = make_mocked_request("GET", "/api/orders/7", headers=headers, app=app)
    match = await app.router.resolve(request)
    match.add_app(app)
    request._match_info = match
    if session:
        request[SESSION_SECRET] = "s" * 43
    return request


async def case(enabled: bool, *, session: bool = False, request_id: str | None = None) -> Run:
    middleware = access_middleware(enabled=enabled)
    request = await mocked(session=session, request_id=request_id)

    async def run() -> object:
        return await middleware(request, handler)

    return run


async def main() -> None:
    setup_logging("info", "json")
    handler_ = logging.getLogger().handlers[0]
    assert isinstance(handler_, logging.StreamHandler)
    sink = io.StringIO()
    handler_.setStream(sink)
    request = await mocked()

    async def bare() -> object:
        return await handler(request)

    base = await per_call(bare)
    results = {
        "request id only (log.access: false)": await per_call(await case(False)) - base,
        "access line, no session": await per_call(await case(True)) - base,
        "access line, client's X-Request-ID": await per_call(await case(True, request_id="abc-1"))
        - base,
        "access line, with session handle": await per_call(await case(True, session=True)) - base,
    }
    print(f"bench.access_log: {N} requests per run, best of 3, cost over a bare handler call")
    for name, us in results.items():
        print(f"  {name:40s} {us:7.2f} us/request")
    print(f"  (one line is {len(sink.getvalue().splitlines()[-1])} bytes of JSON)")


if __name__ == "__main__":
    asyncio.run(main())
