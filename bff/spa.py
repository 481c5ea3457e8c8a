"""Serve the SPA: files from the static folder, ``index.html`` for client-side routes."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["add_routes"]


def add_routes(app: web.Application, root: Path, reserved: tuple[str, ...]) -> None:
    root = root.resolve()
    index = root / "index.html"

    async def serve(request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        if any(request.path == r or request.path.startswith(r + "/") for r in reserved):
            raise web.HTTPNotFound()
        target = (root / path).resolve() if path else index
        # resolve() folds "..": anything that lands outside the root is not ours to serve.
        if target != root and root not in target.parents:
            raise web.HTTPNotFound()
        if target.is_file():
            return web.FileResponse(target)
        if index.is_file():
            response = web.FileResponse(index)
            response.headers["Cache-Control"] = "no-cache"
            return response
        raise web.HTTPNotFound()

    app.router.add_get("/{tail:.*}", serve)
