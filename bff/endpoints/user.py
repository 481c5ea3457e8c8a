"""``GET /bff/user``: who is logged in, until when, and how to log out. Never a token."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from bff.errors import NoSession
from bff.middlewares import check_anti_forgery
from bff.services import SERVICES, session_of


async def handle(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    check_anti_forgery(request, services.settings.public_url)
    session = await session_of(request)
    if session is None:
        raise NoSession()
    data = session.data
    return web.json_response(
        {
            "sub": data.sub,
            "idp": services.provider_for(session).name,  # the provider of the login
            "claims": data.claims,
            "expires_at": int(data.expires_at),
            "idle_expires_at": int(services.sessions.idle_deadline(session)),
            "logout_url": f"{services.settings.prefix}/logout?sid={quote(session.handle)}",
        },
        headers={"Cache-Control": "no-store"},
    )
