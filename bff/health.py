"""``/healthz`` (the process runs), ``/readyz`` (store and OP metadata reachable), ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from bff.errors import BffError
from bff.services import SERVICES

__all__ = ["add_routes"]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    checks: dict[str, str] = {}
    try:
        await services.store.ping()
        checks["store"] = "ok"
    except BffError as exc:
        checks["store"] = exc.error
    checks["provider"] = "ok" if services.oidc.ready else "provider_unavailable"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
        headers={} if ready else {"Retry-After": "5"},
    )


async def metrics(request: web.Request) -> web.Response:
    text = request.app[SERVICES].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
