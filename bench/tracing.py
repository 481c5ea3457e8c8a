"""``python -m bench.tracing``: what tracing costs per call on the hot path, off and on.

Times, in one process, the few things the proxy's hot path does for tracing: the
``with tracing.span(...)`` / ``upstream_span`` block, ``tracing.inject`` on the forwarded
headers, and the ``@tracing.traced`` wrapper (login, callback, refresh, OP calls), each against
the same code without them. Tracing "on" uses the SDK with no exporter (the cost of making spans,
not of shipping them). Bounded: a fixed number of iterations; it prints numbers, asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from bff import tracing
from bff.config import TracingSettings

N = 200_000
HEADERS = [("Accept", "application/json"), ("User-Agent", "bench"), ("X-Forwarded-For", "::1")]


def per_call(fn: Callable[[], object], n: int = N) -> float:
    """Nanoseconds per call of ``fn``, best of three runs of ``n``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def sync_cases() -> dict[str, float]:
    def bare() -> None:
        pass

    def with_span() -> None:
        with tracing.upstream_span("GET", "/api", "http://127.0.0.1:8081"):
            pass

    def inject() -> None:
        tracing.inject(HEADERS)

    base = per_call(bare)
    return {
        "upstream_span block": per_call(with_span) - base,
        "inject(headers)": per_call(inject) - base,
    }


async def async_cases() -> dict[str, float]:
    async def work() -> None:
        return None

    wrapped = tracing.traced("bench")(work)
    n = N // 4

    async def run(fn: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter_ns()
            for _ in range(n):
                await fn()  # type: ignore[misc]
            best = min(best, (time.perf_counter_ns() - start) / n)
        return best

    return {"@traced coroutine": await run(wrapped) - await run(work)}


def main() -> None:
    os.environ["OTEL_TRACES_EXPORTER"] = "none"
    for label in ("off", "on"):
        if label == "on":
            tracing.start(TracingSettings(enabled=True))
        results = {**sync_cases(), **asyncio.run(async_cases())}
        for name, ns in results.items():
            print(f"tracing {label:3}  {name:22} {ns:8.0f} ns/call over the bare code")
    tracing.stop()


if __name__ == "__main__":
    main()
