"""bff.proxy.direct: proxied requests skip the router and the middleware chain, and take the
same route the router would have taken (its resource, so the same metrics and access labels)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bff.proxy.direct import DirectPath


async def _handler(request: web.Request) -> web.StreamResponse:
    return web.Response()


def _app(
    *prefixes: str,
) -> tuple[web.Application, list[tuple[str, web.AbstractRoute, web.AbstractRoute]]]:
    app = web.Application()
    app.router.add_get("/healthz", _handler)
    routes = []
    for prefix in sorted(prefixes, key=lambda p: (-len(p), p)):
        exact = app.router.add_route("*", prefix, _handler)
        below = app.router.add_route("*", prefix + "/{tail:.*}", _handler)
        routes.append((prefix, exact, below))
    return app, routes


def test_the_longest_prefix_wins_as_in_the_router() -> None:
    app, routes = _app("/api", "/api/v2")
    direct = DirectPath(app, routes, reserved=["/healthz"], access_log=True)
    for path, label in (
        ("/api", "/api"),
        ("/api/x", "/api/{tail}"),
        ("/api/v2", "/api/v2"),
        ("/api/v2/x?y=1", "/api/v2/{tail}"),
        ("/api/v22", "/api/{tail}"),
    ):
        entry = direct.match(make_mocked_request("GET", path))
        assert entry is not None, path
        assert entry.match_info.route.resource is not None
        assert entry.match_info.route.resource.canonical == label
        assert entry.match_info.apps == (app,)


def test_paths_no_upstream_takes_go_to_the_router() -> None:
    app, routes = _app("/api")
    direct = DirectPath(app, routes, reserved=["/healthz"], access_log=True)
    for path in ("/", "/apix", "/bff/session", "/healthz", "/ap"):
        assert direct.match(make_mocked_request("GET", path)) is None, path


def test_a_prefix_an_app_route_could_also_match_is_left_to_the_router() -> None:
    app, routes = _app("/healthz", "/api")
    direct = DirectPath(app, routes, reserved=["/healthz"], access_log=True)
    assert direct.match(make_mocked_request("GET", "/healthz")) is None
    assert direct.match(make_mocked_request("POST", "/healthz/x")) is None
    assert direct.match(make_mocked_request("GET", "/api/x")) is not None


def test_the_edge_auth_endpoint_is_one_exact_path() -> None:
    app, routes = _app("/api")
    authz = app.router.add_route("*", "/bff/authz", _handler)
    direct = DirectPath(
        app,
        routes,
        exact=[("/bff/authz", authz, lambda request: None)],
        reserved=["/healthz"],
        access_log=True,
    )
    entry = direct.match(make_mocked_request("POST", "/bff/authz"))
    assert entry is not None and entry.handler is _handler
    assert entry.match_info.route is authz
    for path in ("/bff/authz/x", "/bff/authzx", "/bff"):
        assert direct.match(make_mocked_request("GET", path)) is None, path
