"""Prometheus metrics (prometheus-client), summed across ``bff run`` workers.

Every metric is declared once, here, at import. ``bff run`` gives its workers a private
``PROMETHEUS_MULTIPROC_DIR`` (``bff.multiproc``) before any of them imports this module, so each
worker writes its values to memory-mapped files there and a scrape of any worker (they share the
metrics port) reads all of them: one scrape, every worker, no counter resets. Without that
variable (tests, an app run in-process) the values live in this process and the default
registry serves them.

Labels are bounded by construction: ``route`` is a registered route's pattern (an upstream's
configured ``path``, a fixed endpoint path, ``/{tail}`` for the SPA) or ``unmatched``, never a
raw path; ``method`` is one of the standard methods or ``other``; no user, session or address.

Call sites use the small :class:`Metrics` facade (``services.metrics.inc(name, **labels)``) or the
module-level helpers; the per-request counting is one middleware (:func:`request_middleware`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import wraps
from typing import Any, Final, ParamSpec, TypeVar

from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

__all__ = [
    "Metrics",
    "describe",
    "flush",
    "flush_ctx",
    "observe_lock_wait",
    "observe_upstream",
    "op_call",
    "render",
    "request_done",
    "request_middleware",
    "request_started",
    "stream_closed",
    "stream_opened",
]

P = ParamSpec("P")
R = TypeVar("R")

# ``*_created`` series double the scrape for nothing an alert uses (multiprocess mode has none).
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Set by ``bff run`` before the workers start (``bff.multiproc``); read once, as the client does.
MULTIPROCESS: Final = "PROMETHEUS_MULTIPROC_DIR" in os.environ

# Seconds. Requests and upstream calls: from a cached hit (~1 ms) to the proxy timeout (30 s).
_LATENCY: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The store answers in well under a millisecond on a LAN; seconds mean trouble.
_STORE: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

REQUESTS: Final = Counter(
    "bff_requests_total",
    "Requests answered, by route pattern, method and status (499: the client went away).",
    ["route", "method", "status"],
)
REQUEST_SECONDS: Final = Histogram(
    "bff_request_duration_seconds",
    "Time from handler start to the last byte, by route kind (proxy, websocket, bff, spa, "
    "health, unmatched).",
    ["kind"],
    buckets=_LATENCY,
)
IN_FLIGHT: Final = Gauge(
    "bff_requests_in_flight", "Requests being handled now.", multiprocess_mode="livesum"
)
OPEN_STREAMS: Final = Gauge(
    "bff_open_streams",
    "Open proxied WebSockets and streamed (unbuffered) responses, by kind.",
    ["kind"],
    multiprocess_mode="livesum",
)
UPSTREAM_SECONDS: Final = Histogram(
    "bff_upstream_duration_seconds",
    "Time until an upstream's response headers, by route (the upstream's configured path).",
    ["route"],
    buckets=_LATENCY,
)
OP_SECONDS: Final = Histogram(
    "bff_op_request_duration_seconds",
    "Calls to the OpenID Provider, by endpoint (token, revocation, userinfo, discovery, jwks).",
    ["endpoint"],
    buckets=_LATENCY,
)
STORE_SECONDS: Final = Histogram(
    "bff_store_duration_seconds", "Session store calls, by operation.", ["op"], buckets=_STORE
)
LOCK_WAIT_SECONDS: Final = Histogram(
    "bff_refresh_lock_wait_seconds",
    "Waiting for the cross-instance refresh lock, by how it ended (acquired, or another "
    "instance's refresh was used).",
    ["outcome"],
    buckets=_LATENCY,
)

#: The counters ``Metrics.inc`` knows by name. An unknown name is declared on first use (with
#: the labels of that call), so a new ``inc`` call site needs no edit here to be exported.
COUNTERS: dict[str, Counter] = {
    "bff_requests_total": REQUESTS,
    "bff_logins_total": Counter(
        "bff_logins_total",
        "Callbacks by outcome: ok, or why the login failed (op_error, invalid_code, rejected).",
        ["outcome"],
    ),
    "bff_refreshes_total": Counter(
        "bff_refreshes_total",
        "Access-token refreshes at the OP, by outcome (ok, invalid_grant, bad_id_token, refused, "
        "unavailable).",
        ["outcome"],
    ),
    "bff_token_exchanges_total": Counter(
        "bff_token_exchanges_total",
        "RFC 8693 token exchanges for token: exchange routes, by outcome (ok, refused, "
        "unavailable).",
        ["outcome"],
    ),
    "bff_logouts_total": Counter(
        "bff_logouts_total", "Sessions ended, by cause (user, refused, backchannel).", ["cause"]
    ),
    "bff_upstream_errors_total": Counter(
        "bff_upstream_errors_total",
        "Upstream failures, by kind (timeout, failed, reset).",
        ["kind"],
    ),
    "bff_rate_limit_total": Counter(
        "bff_rate_limit_total",
        "Rate-limit decisions other than allowed, by endpoint and outcome (limited, store_down).",
        ["endpoint", "outcome"],
    ),
    "bff_store_errors_total": Counter(
        "bff_store_errors_total", "Session store calls that failed, by operation.", ["op"]
    ),
}

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """The facade call sites use: ``inc(name, amount=1, **labels)``.

    Counts go to the process-wide Prometheus counters. The instance also tallies what *it*
    counted, for ``value()``: tests (and in-process checks) read their own instance's counts
    without seeing other apps in the same process.
    """

    def __init__(self) -> None:
        self._counts: Tally[tuple[str, tuple[tuple[str, str], ...]]] = Tally()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self._counts[key] += amount
        _child(key, labels).inc(amount)

    def value(self, name: str, **labels: str) -> int:
        return self._counts[(name, tuple(sorted(labels.items())))]

    def render(self) -> str:
        return render()


_children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}


def _child(key: tuple[str, tuple[tuple[str, str], ...]], labels: Mapping[str, str]) -> Any:
    child = _children.get(key)
    if child is None:
        name = key[0]
        counter = COUNTERS.get(name)
        if counter is None:
            counter = COUNTERS[name] = Counter(name, name, sorted(labels))
        child = _children[key] = counter.labels(**labels) if labels else counter
    return child


def render() -> str:
    """The exposition text: every worker's values in multiprocess mode, else this process's."""
    flush()
    return generate_latest(_registry()).decode()


def _registry() -> CollectorRegistry:
    if not MULTIPROCESS:
        return REGISTRY
    # The collector reads the files on each collect(); one registry serves every scrape.
    global _multiprocess_registry
    if _multiprocess_registry is None:
        _multiprocess_registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(_multiprocess_registry)  # type: ignore[no-untyped-call]
    return _multiprocess_registry


_multiprocess_registry: CollectorRegistry | None = None


# -- per request --------------------------------------------------------------------------------
#
# A value written to prometheus-client in multiprocess mode costs a lock, a getpid() and an mmap
# write; a request touched seven of them (~30 us of CPU measured end to end, ~10% of a proxied
# request). So the per-request metrics (requests, request and upstream durations, in flight)
# are added up here in plain dicts and written once a second by each worker's flush task
# (``flush_ctx``), and before each scrape this process answers. A scrape can lag the other
# workers by up to ``FLUSH_INTERVAL``; nothing is lost, and a worker's exit flushes it too.

FLUSH_INTERVAL: Final = 1.0
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_routes: dict[object, tuple[str, str]] = {}  # resource -> (route label, kind); bounded
_LATENCY_BOUNDS: Final = (*_LATENCY, float("inf"))


class _Pending:
    """What this process counted since its last flush (label keys are bounded, see above)."""

    __slots__ = ("durations", "in_flight", "requests", "upstreams")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # label -> [sum of seconds, count per bucket (``_LATENCY_BOUNDS``)]
        self.durations: dict[str, list[Any]] = {}
        self.upstreams: dict[str, list[Any]] = {}
        self.in_flight = 0


_pending = _Pending()
_flushed_in_flight: int | None = None


def _observe(into: dict[str, list[Any]], label: str, seconds: float) -> None:
    entry = into.get(label)
    if entry is None:
        entry = into[label] = [0.0, [0] * len(_LATENCY_BOUNDS)]
    entry[0] += seconds
    entry[1][bisect_left(_LATENCY_BOUNDS, seconds)] += 1  # buckets are "<= bound", like observe


def flush() -> None:
    """Write what this process counted to prometheus-client (the shared files if multiprocess)."""
    global _pending, _flushed_in_flight
    pending, _pending = _pending, _Pending()
    _pending.in_flight = pending.in_flight
    for (route, method, status), count in pending.requests.items():
        REQUESTS.labels(route, method, str(status)).inc(count)
    for histogram, batch in (
        (REQUEST_SECONDS, pending.durations),
        (UPSTREAM_SECONDS, pending.upstreams),
    ):
        for label, (total, counts) in batch.items():
            child = histogram.labels(label)
            # What observe() does per value, once per batch: the sum and each bucket's count.
            child._sum.inc(total)
            for bucket, count in zip(child._buckets, counts, strict=True):
                if count:
                    bucket.inc(count)
    if pending.in_flight != _flushed_in_flight:
        IN_FLIGHT.set(pending.in_flight)
        _flushed_in_flight = pending.in_flight


async def flush_ctx(app: web.Application) -> AsyncIterator[None]:
    """For ``app.cleanup_ctx``: flush every ``FLUSH_INTERVAL`` while the app runs, and at exit."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            flush()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        flush()


def request_middleware() -> Callable[..., Awaitable[web.StreamResponse]]:
    """Count and time every request once, outermost so error answers are counted too.

    Per request: two clock reads and a few dict updates (see ``flush``): ~1-2 us of CPU
    (``python -m bench.metrics_overhead``).
    """

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        started = request_started()
        status = 500
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            route, kind = _route_of(request)
            request_done(request, route, kind, response, status, started)

    return middleware


def request_started() -> float:
    """A request begins (one more in flight); its start time for :func:`request_done`."""
    _pending.in_flight += 1
    return time.perf_counter()


def request_done(
    request: web.Request,
    route: str,
    kind: str,
    response: web.StreamResponse | None,
    status: int,
    started: float,
    *,
    websocket: bool | None = None,
) -> None:
    """Count a request that :func:`request_started` began, once, under its route label.

    ``websocket``: whether it was one, when the caller knows (the fast lane: never); else it is
    told from the response (or, with none, a cancelled handshake) on a proxied route."""
    pending = _pending  # a flush may have swapped it during the request
    pending.in_flight -= 1
    if websocket is not None:
        if websocket:
            kind = "websocket"
    elif kind == "proxy" and (
        isinstance(response, web.WebSocketResponse)
        # A WebSocket's handler may end cancelled when the browser's connection goes.
        or (response is None and request.headers.get("Upgrade", "").lower() == "websocket")
    ):
        kind = "websocket"
    method = request.method
    key = (route, method if method in _METHODS else "other", status)
    requests = pending.requests
    requests[key] = requests.get(key, 0) + 1
    _observe(pending.durations, kind, time.perf_counter() - started)


def _route_of(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    labels = _routes.get(resource)
    if labels is None:
        labels = _routes[resource] = describe(resource)
    return labels


def describe(resource: web.AbstractResource | None) -> tuple[str, str]:
    """A resource's route label and kind, from its pattern and its handler's module."""
    if resource is None:
        return "unmatched", "unmatched"  # no route took it (404/405 from the router)
    pattern = resource.canonical
    handlers = [r.handler for r in resource]
    module = getattr(handlers[0], "__module__", "") if handlers else ""
    if module.startswith("bff.proxy"):
        return pattern.removesuffix("/{tail}"), "proxy"
    if module.startswith("bff.spa"):
        return pattern, "spa"
    if module.startswith("bff.health"):
        return pattern, "health"
    return pattern, "bff"


# -- instrumentation helpers for the call sites -------------------------------------------------


def stream_opened(kind: str) -> None:
    """A proxied WebSocket or streamed response starts (``kind``: websocket, stream)."""
    OPEN_STREAMS.labels(kind).inc()


def stream_closed(kind: str) -> None:
    OPEN_STREAMS.labels(kind).dec()


def observe_upstream(route: str, started: float) -> None:
    """An upstream answered (headers in) for the route whose configured path is ``route``."""
    _observe(_pending.upstreams, route, time.perf_counter() - started)


def observe_lock_wait(outcome: str, started: float) -> None:
    LOCK_WAIT_SECONDS.labels(outcome).observe(time.perf_counter() - started)


def op_call(
    endpoint: str | Callable[..., str],
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate an OP call to time it: a fixed endpoint name, or a function of the call's args."""

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @wraps(func)
        async def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            name = endpoint if isinstance(endpoint, str) else endpoint(*args, **kwargs)
            started = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                OP_SECONDS.labels(name).observe(time.perf_counter() - started)

        return timed

    return decorate


def get_endpoint(_client: object, url: str, headers: Mapping[str, str] | None = None) -> str:
    """The endpoint a GET to the OP is for (``OidcClient._get_json``'s arguments)."""
    if headers and "Authorization" in headers:
        return "userinfo"
    return "discovery" if "/.well-known/" in url else "jwks"
