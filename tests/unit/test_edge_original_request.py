"""Edge mode: what the edge says the original request was. A malformed value is 400, never 500
(an edge passes the browser's own ``X-Original-URL`` through when it sets another header)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from bff.errors import BadRequest
from bff.proxy.edge import original_request


@pytest.mark.parametrize(
    "url",
    ["http://[::1/api/x", "http://[zz]/api/x", "ftp://h/api/x", "http://h"],
)
def test_a_malformed_x_original_url_is_a_400(url: str) -> None:
    request = make_mocked_request(
        "GET", "/bff/authz", headers={"X-Original-URL": url, "X-Original-Method": "GET"}
    )
    with pytest.raises(BadRequest):
        original_request(request)


def test_a_well_formed_x_original_url_gives_its_path_and_query() -> None:
    request = make_mocked_request(
        "GET",
        "/bff/authz",
        headers={"X-Original-URL": "https://app.example.com/api/x?a=1", "X-Original-Method": "GET"},
    )
    assert original_request(request) == ("GET", "/api/x?a=1")
