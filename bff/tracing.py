"""OpenTelemetry traces: optional (``pip install 'bff[otel]'``), off unless ``tracing.enabled``.

This is the only module that knows OpenTelemetry, and it imports it lazily, in :func:`start`:
bff imports and runs without the packages. While tracing is off (the default) the cost is a None
check: :func:`span` hands back one shared no-op context manager, :func:`traced` adds one await,
and the store wrapper and the server-span middleware are not installed at all.

The exporter is configured only by the standard ``OTEL_*`` environment variables, read by the
SDK itself (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_TRACES_SAMPLER``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``, ...); ``OTEL_TRACES_EXPORTER`` picks
``otlp`` (default), ``console`` or ``none``. Setting them does not turn tracing on: the YAML does,
so an environment shared with other services cannot start exporting from bff by surprise.

What a span may carry: span names and attributes are route *templates* (``/api/{tail}``, the
configured prefix), methods, status codes, peer host and port, and exception class names. Never a
header value, cookie, token, code, store key, raw path or query string; exception messages are
not recorded either (``record_exception=False``), since a driver's message may quote a URL.

W3C trace context: a server span continues the browser's ``traceparent`` when one is present and
``tracing.trust_incoming`` is true (the default). A client can thereby only choose the trace id
and parent span id its request is filed under, and, with the SDK's default parent-based sampler,
whether it is sampled; it cannot change what bff does. Set ``trust_incoming: false`` to start a
new trace for every request instead. Upstream calls carry bff's own ``traceparent``/
``tracestate`` (the browser's are replaced); bff does not read ``baggage`` (a browser's passes
on like any other header). Probes (``/healthz``, ``/readyz``, ``/metrics``) make no spans at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from bff.config import TracingSettings
    from bff.store import SessionStore

__all__ = [
    "annotate",
    "available",
    "default_exporter",
    "enabled",
    "end_span",
    "flush",
    "inject",
    "middleware",
    "span",
    "start",
    "start_span",
    "stop",
    "traced",
    "traced_store",
    "upstream_span",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SpanContext = contextlib.AbstractContextManager["Span | None"]

_NOOP: Final = contextlib.nullcontext()  # stateless, so one instance serves every caller
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_CONTEXT_HEADERS: Final = frozenset({"traceparent", "tracestate"})
#: Probes and scrapes, every few seconds from every load balancer: no trace is worth their noise.
_UNTRACED: Final = frozenset({"/healthz", "/readyz", "/metrics"})

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_propagator: TraceContextTextMapPropagator | None = None
_quiet: ContextVar[bool] = ContextVar("bff_tracing_quiet", default=False)
_opened: ContextVar[list[Span] | None] = ContextVar("bff_tracing_opened", default=None)
_kinds: dict[str, Any] = {}  # SpanKind, StatusCode members (and get_current_span), once imported


def available() -> bool:
    """Whether the ``bff[otel]`` extra is installed (asked only when tracing is configured)."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    return _tracer is not None


def default_exporter() -> SpanExporter | None:
    """The exporter ``OTEL_TRACES_EXPORTER`` names (``otlp`` by default); None for ``none``.

    The OTLP exporter reads its endpoint, headers, timeout and compression from ``OTEL_*``.
    """
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if name == "none":
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: bff supports otlp, console or none")
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter as GrpcExporter,
        )

        exporter: SpanExporter = GrpcExporter()
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def start(settings: TracingSettings) -> None:
    """Turn tracing on for this process (a no-op when ``settings.enabled`` is false).

    Called once per worker at start-up, so the exporter's thread belongs to the worker. The state
    is per process: a second call replaces (and shuts down) the first one's provider.
    """
    global _tracer, _provider, _propagator
    if not settings.enabled:
        return
    stop()
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind, StatusCode, get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins over the YAML.
    resource = Resource.create({"process.pid": os.getpid()})  # which worker, with several
    from_env = os.environ.get("OTEL_SERVICE_NAME") or any(
        pair.split("=", 1)[0].strip() == SERVICE_NAME
        for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )
    if not from_env:
        resource = resource.merge(Resource({SERVICE_NAME: settings.service_name}))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    try:
        exporter = default_exporter()
    except (ValueError, ImportError) as exc:
        # Serving matters more than tracing: say why nothing is exported, and go on.
        log.error("tracing.no_exporter", extra={"event": "tracing.no_exporter", "error": str(exc)})
        exporter = None
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    # Our own provider, not the global one: bff never changes what other code in the process sees.
    _kinds.update(
        server=SpanKind.SERVER,
        client=SpanKind.CLIENT,
        internal=SpanKind.INTERNAL,
        error=StatusCode.ERROR,
        current=get_current_span,
    )
    _provider = provider
    _propagator = TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("bff")


def flush(timeout_millis: int = 30_000) -> bool:
    """Export every ended span now (tests; ``stop`` does it at shutdown)."""
    return _provider.force_flush(timeout_millis) if _provider is not None else True


def stop() -> None:
    """Flush what is pending and turn tracing off (at shutdown)."""
    global _tracer, _provider, _propagator
    provider = _provider
    _tracer = _provider = _propagator = None
    if provider is not None:
        provider.shutdown()


# -- spans ------------------------------------------------------------------------------------


def span(
    name: str, attributes: dict[str, str | int] | None = None, *, kind: str = "internal"
) -> SpanContext:
    """``with tracing.span("bff.x") as s:``; ``s`` is None (and nothing happens) when off."""
    if _tracer is None or _quiet.get():
        return _NOOP
    return _active(_tracer, name, attributes, kind, None)


@contextlib.contextmanager
def _active(
    tracer: Tracer,
    name: str,
    attributes: dict[str, str | int] | None,
    kind: str,
    context: Any,
) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=_kinds[kind],
        attributes=attributes,
        record_exception=False,  # a message may quote a URL or a value: the class name only
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:  # CancelledError too: a route timeout, a client gone
            current.set_attribute("error.type", type(exc).__qualname__)
            current.set_status(_kinds["error"])
            raise


def traced(
    name: str, *, kind: str = "internal"
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate a coroutine function to run inside a span named ``name`` (when tracing is on)."""

    def decorate(
        fn: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer is None or _quiet.get():
                return await fn(*args, **kwargs)
            opened: list[Span] = []
            with _active(_tracer, name, None, kind, None):
                token = _opened.set(opened)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    _opened.reset(token)
                    for left in opened:  # a start_span no end_span reached (an exception)
                        end_span(left)

        return wrapper

    return decorate


def annotate(key: str, value: str | int) -> None:
    """Set an attribute on the current span; a None check when tracing is off."""
    if _tracer is None:
        return
    _kinds["current"]().set_attribute(key, value)


def start_span(name: str) -> Span | None:
    """A span started now and ended by :func:`end_span`, for a wait that is not one block.

    Inside a :func:`traced` function, one that is still open when the function ends (an
    exception left it) is ended then.
    """
    if _tracer is None or _quiet.get():
        return None
    started = _tracer.start_span(name)
    opened = _opened.get()
    if opened is not None:
        opened.append(started)
    return started


def end_span(current: Span | None) -> None:
    if current is not None and current.is_recording():
        current.end()


# -- HTTP ---------------------------------------------------------------------------------------


def middleware(settings: TracingSettings) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The server-span middleware, outermost; an empty list when tracing is not configured."""
    if not settings.enabled:
        return []
    trust_incoming = settings.trust_incoming

    @web.middleware
    async def server_span(request: web.Request, handler: Handler) -> web.StreamResponse:
        tracer = _tracer
        if tracer is None:
            return await handler(request)
        if request.path in _UNTRACED:
            quiet = _quiet.set(True)  # nor its store ping: no root spans from probes either
            try:
                return await handler(request)
            finally:
                _quiet.reset(quiet)
        method = request.method if request.method in _METHODS else "_OTHER"
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.scheme": request.scheme,
        }
        if route is not None:
            attributes["http.route"] = route
        parent = None
        if trust_incoming and _propagator is not None and "traceparent" in request.headers:
            parent = _propagator.extract(request.headers)
        name = f"{method} {route}" if route is not None else method
        with _active(tracer, name, attributes, "server", parent) as current:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                current.set_attribute("http.response.status_code", exc.status)
                raise
            current.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                current.set_status(_kinds["error"])
            return response

    return [server_span]


@functools.lru_cache(maxsize=256)
def _peer(origin: str) -> tuple[str, str, int]:
    parts = urlsplit(origin)
    scheme = parts.scheme
    return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


def upstream_span(method: str, route: str, origin: str) -> SpanContext:
    """A client span for one upstream call: ``route`` is the configured prefix (a template)."""
    if _tracer is None or _quiet.get():
        return _NOOP
    scheme, host, port = _peer(origin)
    method = method if method in _METHODS else "_OTHER"
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.scheme": scheme,
        "server.address": host,
        "server.port": port,
        "bff.route": route,
    }
    return _active(_tracer, f"{method} {route}", attributes, "client", None)


def inject(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with the current span's ``traceparent`` (and ``tracestate``) in place of any
    the browser sent; unchanged when tracing is off."""
    if _propagator is None:
        return headers
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if not carrier:
        return headers
    out = [(k, v) for k, v in headers if k.lower() not in _CONTEXT_HEADERS]
    out.extend(carrier.items())
    return out


# -- store --------------------------------------------------------------------------------------


def traced_store(store: SessionStore) -> SessionStore:
    """``store`` itself when tracing is off, else a wrapper with one client span per operation."""
    if _tracer is None:
        return store
    from bff.store.traced import TracedStore

    system = "memory" if type(store).__name__ == "MemoryStore" else "redis"
    return TracedStore(store, system)
