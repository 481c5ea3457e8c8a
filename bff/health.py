"""``/healthz`` (the process runs), ``/readyz`` (store and every OP's metadata), ``/metrics``.

``/metrics`` is not for the public: by default it is served only on a listener of its own
(``metrics.listen``, loopback unless configured otherwise), which ``add_metrics_listener`` starts
next to the main app, however that app is run. ``metrics.public: true`` puts it back on the public
listener too. ``/healthz`` and ``/readyz`` are on both: load balancers probe the public one.

With several workers, each binds the metrics address with SO_REUSEPORT like the main listener; the
worker a scrape reaches answers for all of them (prometheus-client's multiprocess mode, see
``bff.metrics``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from bff.errors import BffError
from bff.lifecycle import LIFECYCLE
from bff.server import FrontDoorRunner  # the same hardened parser and fixed refusals
from bff.services import SERVICES

__all__ = ["METRICS_PATH", "add_metrics_listener", "add_routes"]

METRICS_PATH = "/metrics"

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return await _readiness(request.app)


async def _readiness(app: web.Application) -> web.Response:
    lifecycle = app.get(LIFECYCLE)
    if lifecycle is not None and lifecycle.draining:  # SIGTERM: tell the load balancer first
        return web.json_response(
            {"status": "draining", "checks": {}}, status=503, headers={"Retry-After": "5"}
        )
    services = app[SERVICES]
    checks: dict[str, str] = {}
    try:
        await services.store.ping()
        checks["store"] = "ok"
    except BffError as exc:
        checks["store"] = exc.error
    # Every provider must have loaded its metadata (each one is someone's only way in). The
    # default is "provider", the others "provider:<name>"; a provider whose OP's discovery
    # document refuses its settings (bff.features) says "provider_refused".
    for name, client in services.providers.items():
        key = "provider" if client is services.oidc else f"provider:{name}"
        if client.ready:
            checks[key] = "ok"
        else:
            checks[key] = "provider_refused" if client.refused else "provider_unavailable"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
        headers={} if ready else {"Retry-After": "5"},
    )


def _metrics_text(app: web.Application) -> web.Response:
    text = app[SERVICES].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def metrics(request: web.Request) -> web.Response:
    return _metrics_text(request.app)


def add_routes(app: web.Application, *, metrics_public: bool = False) -> None:
    """Health on the public listener; ``/metrics`` there only when ``metrics_public``."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics_public:
        app.router.add_get(METRICS_PATH, metrics)


def _metrics_app(main: web.Application) -> web.Application:
    """The metrics listener's app: it reads the main app's services, it has none of its own."""

    async def metrics_handler(request: web.Request) -> web.Response:
        return _metrics_text(main)

    async def readyz_handler(request: web.Request) -> web.Response:
        return await _readiness(main)

    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz_handler)
    return app


def add_metrics_listener(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False
) -> None:
    """Serve ``/metrics`` (and health) on ``host:port`` while ``app`` runs.

    Started and stopped in ``app``'s cleanup_ctx, after its services exist and before they are
    torn down. A port that cannot be bound fails the start-up: metrics that silently vanish are
    worse than a worker that says why it cannot start.
    """
    app.cleanup_ctx.append(_listener_ctx(host, port, reuse_port))


def _listener_ctx(
    host: str, port: int, reuse_port: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        limits = app[SERVICES].settings.limits
        runner = FrontDoorRunner(_metrics_app(app), limits=limits, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            log.error(
                "metrics.listen_failed",
                extra={"event": "metrics.listen_failed", "host": host, "port": port,
                       "reason": exc.strerror or str(exc)},
            )  # fmt: skip
            raise
        bound = [a[1] for a in runner.addresses if isinstance(a, tuple)]
        log.info(
            "metrics.listening",
            extra={"event": "metrics.listening", "host": host, "port": bound[0] if bound else port},
        )
        try:
            yield
        finally:
            await runner.cleanup()

    return ctx
