"""An upstream 401 whose token renewal fails must not keep the upstream connection checked out.

The 401's body streams (no Content-Length), so ``forward._http`` holds the response open while it
asks for a new token; when that raises (OP down, a route token refused, the session gone), the
connection must go back (or be closed), else every such call takes one slot of the route's pool
for good and the route stops answering once ``pool_size`` slots are gone.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from bff.config import Upstream
from bff.errors import ProviderUnavailable
from bff.metrics import Metrics
from bff.proxy.forward import _http
from bff.proxy.routing import UpstreamTable


async def _refuse_streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=401)
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"error": "invalid_token"}')
    await response.write_eof()
    return response


class _DownOp:
    """Client credentials whose renewal fails: the OP is down."""

    async def token(self, scopes: tuple[str, ...], reject: str | None = None) -> str:
        raise ProviderUnavailable("the OP is down")


async def test_a_failed_renewal_after_an_upstream_401_frees_the_pool_slot() -> None:
    upstream_app = web.Application()
    upstream_app.router.add_get("/{tail:.*}", _refuse_streamed)
    async with TestServer(upstream_app, host="127.0.0.1") as server:
        url = str(server.make_url("")).rstrip("/")
        table = UpstreamTable(
            [Upstream(path="/api", url=url, token="client", timeout=3.0)],
            public_url="https://app.example.com",
            pool_size=2,
        )
        await table.open()
        route = table.routes[0]
        services: Any = SimpleNamespace(client_tokens=_DownOp(), metrics=Metrics())
        try:
            for _ in range(3):  # more calls than the pool has slots
                request = make_mocked_request("GET", "/api/x", headers={"Host": "app.example.com"})
                with pytest.raises(ProviderUnavailable):
                    await _http(request, services, table, route, "/x", None, "cc-1", False)
            assert route.pool is not None
            assert route.pool._open <= 1, "a connection stayed checked out after the failure"
        finally:
            await table.close()
