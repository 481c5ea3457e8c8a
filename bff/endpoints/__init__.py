"""The ``/bff/*`` endpoints of the design doc's contract, one thin handler module each."""

from __future__ import annotations

from aiohttp import web

from bff.endpoints import backchannel, callback, login, logout, user

__all__ = ["add_routes"]


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/login", login.handle)
    app.router.add_get(f"{prefix}/callback", callback.handle)
    # The other providers' redirect URIs (``Settings.callback_path``); the handler checks that
    # the path is the one of the provider the login went to.
    app.router.add_get(f"{prefix}/callback/{{idp}}", callback.handle)
    app.router.add_get(f"{prefix}/user", user.handle)
    app.router.add_get(f"{prefix}/logout", logout.handle)
    app.router.add_post(f"{prefix}/backchannel-logout", backchannel.handle)
