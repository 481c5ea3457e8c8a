"""bff.proxy without sockets: routing, path normalisation, header hygiene."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from bff.access import REQUEST_ID
from bff.config import Upstream
from bff.errors import NotFound, PathRejected
from bff.proxy import UpstreamTable, downstream_headers, normalise_path, upstream_headers
from bff.proxy.headers import (
    CLIENT_ADDRESS,
    IDENTITY,
    OVERRIDES,
    REQUEST_DROP,
    answer_fields,
    header_key,
    private_cache_control,
)
from bff.proxy.overrides import drop_override_params


def table(*upstreams: Upstream) -> UpstreamTable:
    return UpstreamTable(upstreams, public_url="https://app.example.com")


ROUTES = table(
    Upstream(path="/api", url="http://api.internal:9000"),
    Upstream(path="/api/orders/export", url="http://export.internal/x/y/"),
    Upstream(path="/api/orders", url="http://orders.internal:8080/v1"),
)


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "prefix", "upstream"),
    [
        ("/api/orders/42", "/api/orders", "/v1/42"),
        ("/api/orders", "/api/orders", "/v1"),
        ("/api/orders/", "/api/orders", "/v1/"),
        ("/api/orders/export/csv", "/api/orders/export", "/x/y/csv"),
        ("/api/ordersX", "/api", "/ordersX"),
        ("/api", "/api", "/"),
        ("/api/other/thing", "/api", "/other/thing"),
    ],
)
def test_the_longest_prefix_wins_and_is_replaced_by_the_upstream_path(
    target: str, prefix: str, upstream: str
) -> None:
    route, path = ROUTES.resolve(target)
    assert route.prefix == prefix
    assert path == upstream


def test_the_query_string_is_kept_exactly_as_sent() -> None:
    _, path = ROUTES.resolve("/api/orders/42?a=%2F..%2F&b=1&b=2&c")
    assert path == "/v1/42?a=%2F..%2F&b=1&b=2&c"


def test_an_empty_query_keeps_its_question_mark() -> None:
    assert ROUTES.resolve("/api/orders?")[1] == "/v1?"


def test_a_path_under_no_prefix_is_not_found() -> None:
    with pytest.raises(NotFound):
        ROUTES.resolve("/other/api/orders")


def test_an_encoded_prefix_still_routes_to_its_upstream() -> None:
    route, path = ROUTES.resolve("/%61pi/orders/42")
    assert route.prefix == "/api/orders"
    assert path == "/v1/42"


def test_empty_segments_fold_so_they_cannot_dodge_a_longer_prefix() -> None:
    route, path = ROUTES.resolve("/api//orders//export/csv")
    assert route.prefix == "/api/orders/export"
    assert path == "/x/y/csv"


def test_encoded_characters_are_forwarded_canonically_encoded() -> None:
    assert ROUTES.resolve("/api/orders/caf%c3%a9%20x")[1] == "/v1/caf%C3%A9%20x"
    assert ROUTES.resolve("/api/orders/100%25")[1] == "/v1/100%25"


def test_a_resolved_target_kept_is_never_another_targets_answer() -> None:
    routes = table(
        Upstream(path="/api", url="http://api.internal:9000"),
        Upstream(path="/api/orders", url="http://orders.internal:8080/v1"),
    )
    expected = [
        ("/api/orders/42", "/api/orders", "/v1/42"),
        ("/api/orders/43", "/api/orders", "/v1/43"),
        ("/api/orders/42?_method=DELETE&a=1", "/api/orders", "/v1/42?a=1"),
        ("/api//orders/42", "/api/orders", "/v1/42"),
        ("/api/ordersX", "/api", "/ordersX"),
        ("/api/items", "/api", "/items"),
    ]
    for _ in range(2):  # the second round answers from what the first kept
        for target, prefix, upstream in expected:
            route, path = routes.resolve(target)
            assert (route.prefix, path) == (prefix, upstream)
        # A refusal is never kept as an answer, nor an answer given to a refused spelling.
        for refused in ("/api/orders/../admin", "/api/orders/%2e%2e/admin"):
            with pytest.raises(PathRejected):
                routes.resolve(refused)
        with pytest.raises(NotFound):
            routes.resolve("/other")


def test_the_kept_targets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bff.proxy.routing._RESOLVED_MAX", 8)
    routes = table(Upstream(path="/api", url="http://api.internal"))
    for i in range(40):
        assert routes.resolve(f"/api/{i}")[1] == f"/{i}"
    assert len(routes._resolved) == 8
    assert routes.resolve("/api/0")[1] == "/0"
    long = "/api/" + "x" * 600
    assert routes.resolve(long)[1] == long[4:]
    assert long not in routes._resolved


def test_dotted_names_that_are_not_dot_segments_pass() -> None:
    assert normalise_path("/api/.well-known/x.json") == "/api/.well-known/x.json"
    assert normalise_path("/api/a..b/...") == "/api/a..b/..."


@pytest.mark.parametrize(
    "path",
    [
        "/api/orders/../admin",
        "/api/orders/..",
        "/api/orders/./42",
        "/api/orders/%2e%2e/admin",
        "/api/orders/%2E%2E/admin",
        "/api/orders/.%2e/admin",
        "/api/orders/%2e./admin",
        "/api/orders/%2e",
        "/api/orders/..%2fadmin",
        "/api/orders/%2f..%2fadmin",
        "/api/orders/a%2Fb",
        "/api/orders/..%5cadmin",
        "/api/orders/a%5Cb",
        "/api/orders/..\\admin",
        "/api/orders\\..\\admin",
        "/api/orders/%252e%252e/admin",
        "/api/orders/%252fadmin",
        "/api/orders/..;/admin",
        "/api/orders/..;jsessionid=x/admin",
        "/api/orders/%2e%2e;/admin",
        "/api/orders/..%3b/admin",
        "/api/orders/.;/admin",
        "/api/orders/%u002e%u002e/admin",
        "/api/orders/%252e%252e%253b/admin",
        "/api/orders/a%00b",
        "/api/orders/a%0d%0aX-Injected:%201",
        "/api/orders/%ff%fe",
        "/api/orders/a#frag",
        "api/orders",
    ],
)
def test_each_traversal_spelling_is_refused(path: str) -> None:
    with pytest.raises(PathRejected) as caught:
        ROUTES.resolve(path)
    assert caught.value.status == 400


# -- headers ------------------------------------------------------------------------------------


def browser_request(headers: dict[str, str] | list[tuple[str, str]]) -> Any:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("192.0.2.7", 50000) if name == "peername" else default
    )
    return make_mocked_request(
        "GET", "/api/orders/1", headers=CIMultiDict(headers), transport=transport
    )


def test_the_browsers_credentials_and_hop_by_hop_headers_stay_behind() -> None:
    route = ROUTES.resolve("/api/orders/1")[0]
    request = browser_request(
        [
            ("Cookie", "__Host-bff=secret"),
            ("Authorization", "Bearer browser-made"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic x"),
            ("Host", "app.example.com"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6"),
            ("Accept", "application/json"),
            ("X-Request-Id", "abc"),
            ("X-Request-Id", "def"),
        ]
    )
    request[REQUEST_ID] = "abc"  # what bff.access kept of the browser's (the first, well-formed)
    sent = upstream_headers(
        request, route.drop, route.set_headers, ROUTES.peers.forwarding(request), "tok"
    )
    names = [k.lower() for k, _ in sent]
    for gone in (
        "cookie",
        "connection",
        "x-private",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "host",
    ):
        assert gone not in names
    assert ("Authorization", "Bearer tok") in sent
    assert names.count("authorization") == 1
    assert ("Accept", "application/json") in sent
    assert [v for k, v in sent if k.lower() == "x-request-id"] == ["abc"]  # one, bff's
    assert ("X-Forwarded-Proto", "https") in sent
    assert ("X-Forwarded-Host", "app.example.com") in sent
    assert [v for k, v in sent if k.lower() == "x-forwarded-for"] == ["192.0.2.7"]
    assert [v for k, v in sent if k.lower() == "forwarded"] == [
        "for=192.0.2.7;host=app.example.com;proto=https"
    ]


def test_without_a_token_no_authorization_header_is_sent() -> None:
    route = ROUTES.resolve("/api/orders/1")[0]
    request = browser_request({"Authorization": "Basic Zm9vOmJhcg=="})
    sent = upstream_headers(
        request, route.drop, route.set_headers, ROUTES.peers.forwarding(request), None
    )
    assert all(k.lower() != "authorization" for k, _ in sent)


def test_route_headers_are_set_and_removed() -> None:
    routes = table(
        Upstream(
            path="/api",
            url="http://api.internal",
            set_headers=MappingProxyType({"X-Api-Key": "k1", "Accept-Language": "en"}),
            remove_headers=("x-debug",),
        )
    )
    route = routes.routes[0]
    request = browser_request({"X-Debug": "1", "X-Api-Key": "forged", "Accept-Language": "fr"})
    sent = upstream_headers(
        request, route.drop, route.set_headers, routes.peers.forwarding(request), None
    )
    assert ("X-Api-Key", "k1") in sent
    assert ("Accept-Language", "en") in sent
    names = [k.lower() for k, _ in sent]
    assert "x-debug" not in names
    assert names.count("x-api-key") == 1
    assert names.count("accept-language") == 1


def test_an_upstreams_cookies_and_hop_by_hop_headers_never_reach_the_browser() -> None:
    upstream = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Content-Type", "application/json"),
                ("Set-Cookie", "track=1"),
                ("Connection", "close, X-Internal"),
                ("X-Internal", "10.0.0.5"),
                ("Transfer-Encoding", "chunked"),
                ("Keep-Alive", "timeout=5"),
                ("Cache-Control", "private"),
                ("Link", "<a>"),
                ("Link", "<b>"),
            ]
        )
    )
    out = downstream_headers(SimpleNamespace(headers=upstream), private=False)  # type: ignore[arg-type]
    assert dict(out) == {
        "Content-Type": "application/json",
        "Cache-Control": "private",
        "Link": "<a>",
    }
    assert out.getall("Link") == ["<a>", "<b>"]


def test_a_route_hides_its_upstream_address_in_its_repr() -> None:
    assert "internal" not in repr(ROUTES.routes[0])


# -- header hygiene by meaning (issue 9, point 4) ------------------------------------------------


def spellings(name: str) -> list[str]:
    """``name`` as a browser may spell it so that some server reads it as ``name``."""
    upper = name.upper()
    return [
        name,
        upper,
        name.title(),
        name.replace("-", "_"),
        upper.replace("-", "_"),
        name.title().replace("-", "_", 1),
    ]


@pytest.mark.parametrize(
    "name",
    sorted(
        CLIENT_ADDRESS
        | OVERRIDES
        | IDENTITY
        | {
            "x-forwarded",
            "x-forwarded-anything",
            "x-auth-request-user",
            "x-ms-client-principal-name",
            "x-amzn-oidc-identity",
            "x-pomerium-claim-email",
        }
    ),
)
def test_client_address_and_override_headers_are_dropped_in_every_spelling(name: str) -> None:
    route = ROUTES.resolve("/api/orders/1")[0]
    request = browser_request([(s, "6.6.6.6") for s in spellings(name)] + [("Accept", "x/y")])
    sent = upstream_headers(
        request, route.drop, route.set_headers, ROUTES.peers.forwarding(request), None
    )
    assert all(v != "6.6.6.6" for _, v in sent), sent
    assert ("Accept", "x/y") in sent


def test_the_research_list_is_all_there() -> None:
    for name in (
        "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "cf-connecting-ip",
        "fastly-client-ip", "x-cluster-client-ip", "x-originating-ip", "x-remote-ip",
        "x-remote-addr", "client-ip", "x-proxyuser-ip",
    ):  # fmt: skip
        assert name in CLIENT_ADDRESS
    for name in (
        "x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
        "x-rewrite-url", "x-original-method",
    ):  # fmt: skip
        assert name in OVERRIDES
    for name in (
        "x-middleware-subrequest", "x-invoke-path", "x-invoke-query", "x-now-route-matches",
        "x-matched-path",
    ):  # fmt: skip
        assert name in OVERRIDES  # framework-internal routing (Next.js CVE-2025-29927)
    for name in (
        "x-ssl-client-cert", "x-client-cert", "ssl-client-cert", "x-arr-clientcert",
        "x-client-verify", "x-ssl-client-verify", "x-ssl-client-dn", "x-ssl-client-s-dn",
    ):  # fmt: skip
        assert name in IDENTITY  # client certificates as TLS-terminating proxies pass them
    request = browser_request({"X-Forwarded-Client-Cert": "By=x;Hash=y", "Accept": "x/y"})
    assert upstream_headers(request, REQUEST_DROP, (), [], None) == [("Accept", "x/y")]
    assert "x-envoy-external-address" not in REQUEST_DROP  # dropped by prefix instead:
    request = browser_request({"X_Envoy_External_Address": "6.6.6.6", "X-Forwarded-Uri": "/a"})
    sent = upstream_headers(request, REQUEST_DROP, (), [], None)
    assert sent == []


def test_header_key_reads_a_name_as_cgi_would() -> None:
    assert header_key("X_Forwarded_For") == header_key("x-forwarded-for") == "x-forwarded-for"
    assert header_key("Accept") == "accept"


def test_route_headers_match_by_meaning_too() -> None:
    routes = table(
        Upstream(
            path="/api",
            url="http://api.internal",
            set_headers=MappingProxyType({"X-Api-Key": "k1"}),
            remove_headers=("x-debug",),
        )
    )
    route = routes.routes[0]
    request = browser_request(
        [("X_DEBUG", "1"), ("x_api_key", "forged"), ("Connection", "X_Hop"), ("x-hop", "h")]
    )
    sent = upstream_headers(request, route.drop, route.set_headers, [], None)
    assert sent == [("X-Api-Key", "k1")]


# -- method override parameters in the query ----------------------------------------------------


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        ("a=1&b=2", "a=1&b=2"),
        ("_method=DELETE", ""),
        ("a=1&_method=DELETE&b=2", "a=1&b=2"),
        ("_method=DELETE&a=1", "a=1"),
        ("a=1&_method=DELETE", "a=1"),
        ("a=1;_method=DELETE;b=2", "a=1;b=2"),  # Rack 2 splits on ";" too
        ("a=1&_METHOD=PUT", "a=1"),
        ("a=1&%5Fmethod=PUT", "a=1"),
        ("a=1&%5f%6D%65thod=PUT", "a=1"),
        ("a=1&.method=PUT", "a=1"),  # PHP reads "." in a name as "_"
        ("a=1&+_method=PUT", "a=1"),  # PHP drops leading spaces
        ("a=1&_method[]=PUT", "a=1"),
        ("a=1&_method", "a=1"),
        ("a=1&x-http-method-override=PUT&X_HTTP_METHOD=PUT&x_method_override=1", "a=1"),
        (
            "method=1&my_method=2&_methods=3&a_method=4",
            "method=1&my_method=2&_methods=3&a_method=4",
        ),
        ("q=_method%3DDELETE", "q=_method%3DDELETE"),  # a value, not a name
        ("a=%ZZ&b=%C3%28", "a=%ZZ&b=%C3%28"),
        ("", ""),
    ],
)
def test_method_override_parameters_are_dropped_from_the_query(query: str, forwarded: str) -> None:
    _, target = ROUTES.resolve("/api/orders/1?" + query)
    assert target == "/v1/1?" + forwarded


def test_a_query_without_an_override_is_passed_as_it_is() -> None:
    query = "b=2&&a=%2F..%2F;c&method=x&%41=1"
    assert drop_override_params(query) is query


# -- answers that carry a user's data (issue 9, point 6) ----------------------------------------


@pytest.mark.parametrize(
    ("upstream", "browser"),
    [
        (None, "private"),
        ("public, max-age=60", "private, max-age=60"),
        ("max-age=60, s-maxage=600, proxy-revalidate", "private, max-age=60"),
        ('private="Set-Cookie", max-age=5', "private, max-age=5"),
        ("PUBLIC, Max-Age=1, must-revalidate", "private, Max-Age=1, must-revalidate"),
        ("no-cache, stale-while-revalidate=30", "private, no-cache, stale-while-revalidate=30"),
        ('no-cache="a, public", max-age=3', 'private, no-cache="a, public", max-age=3'),
        ("no-store", "no-store"),
        ("no-store, public, s-maxage=60", "no-store"),
        ("max-age=3,,public", "private, max-age=3"),
        ("garbage(", "private"),
        ('max-age=1, x="unterminated', "private"),
        ("no-store, garbage(", "no-store"),
    ],
)
def test_a_users_answer_is_private_and_loses_shared_cache_directives(
    upstream: str | None, browser: str
) -> None:
    headers = [("Content-Type", "application/json")]
    if upstream is not None:
        headers.append(("Cache-Control", upstream))
    response = SimpleNamespace(headers=CIMultiDictProxy(CIMultiDict(headers)))
    out = downstream_headers(response, private=True)  # type: ignore[arg-type]
    assert out.getall("Cache-Control") == [browser]
    assert private_cache_control(upstream or "") == browser


def test_several_cache_control_lines_are_read_as_one() -> None:
    headers = [("Cache-Control", "public"), ("Cache-Control", "max-age=9")]
    response = SimpleNamespace(headers=CIMultiDictProxy(CIMultiDict(headers)))
    out = downstream_headers(response, private=True)  # type: ignore[arg-type]
    assert out.getall("Cache-Control") == ["private, max-age=9"]


def test_a_users_answer_loses_the_headers_cdns_obey_over_cache_control() -> None:
    cdn = [
        ("Surrogate-Control", "max-age=3600"),
        ("CDN-Cache-Control", "max-age=3600"),
        ("Cloudflare-CDN-Cache-Control", "max-age=3600"),
        ("Akamai-Cache-Control", "max-age=3600"),
        ("Edge-Control", "cache-maxage=1h"),
        ("X-Accel-Expires", "3600"),
    ]
    response = SimpleNamespace(
        headers=CIMultiDictProxy(CIMultiDict([*cdn, ("ETag", '"1"'), ("Expires", "0")]))
    )
    private = downstream_headers(response, private=True)  # type: ignore[arg-type]
    assert dict(private) == {"ETag": '"1"', "Expires": "0", "Cache-Control": "private"}
    # A route that carries no user's token passes the upstream's caching on as it was.
    public = downstream_headers(response, private=False)  # type: ignore[arg-type]
    assert len(public) == len(cdn) + 2 and "Cache-Control" not in public


@pytest.mark.parametrize(
    ("token", "private"),
    [("user", True), ("user_or_none", True), ("client", False), ("none", False)],
)
def test_which_routes_answers_are_private(token: str, private: bool) -> None:
    routes = table(Upstream(path="/api", url="http://api.internal", token=token))  # type: ignore[arg-type]
    assert routes.routes[0].private is private


# -- what the header policy keeps between requests (per name and drop set, bounded) --------------


def test_a_names_verdict_kept_for_one_route_is_never_anothers() -> None:
    routes = table(
        Upstream(path="/a", url="http://a.internal", remove_headers=("x-debug",)),
        Upstream(path="/b", url="http://b.internal"),
    )
    a, b = routes.routes if routes.routes[0].prefix == "/a" else routes.routes[::-1]
    for _ in range(2):  # the second round answers from what the first kept
        request = browser_request([("X-Debug", "1"), ("X_Debug", "2"), ("Accept", "x/y")])
        assert upstream_headers(request, a.drop, (), (), None) == [("Accept", "x/y")]
        assert upstream_headers(request, b.drop, (), (), None) == [
            ("X-Debug", "1"),
            ("X_Debug", "2"),
            ("Accept", "x/y"),
        ]


def test_the_connection_list_kept_for_one_value_is_never_anothers() -> None:
    sent = [("X-One", "1"), ("X_Two", "2"), ("Accept", "x/y")]
    for _ in range(2):
        one = browser_request([("Connection", "x-one"), *sent])
        two = browser_request([("Connection", "X-Two"), *sent])
        none = browser_request(sent)
        assert upstream_headers(one, REQUEST_DROP, (), (), None) == [sent[1], sent[2]]
        assert upstream_headers(two, REQUEST_DROP, (), (), None) == [sent[0], sent[2]]
        assert upstream_headers(none, REQUEST_DROP, (), (), None) == sent
        for private in (False, True):
            answer = [("X-One", "1"), ("X-Two", "2"), ("ETag", '"e"')]
            for connection, kept in (("x-one", ["X-Two", "ETag"]), ("X-TWO", ["X-One", "ETag"])):
                headers = CIMultiDictProxy(CIMultiDict([("Connection", connection), *answer]))
                out = downstream_headers(SimpleNamespace(headers=headers), private=private)  # type: ignore[arg-type]
                assert [k for k in out if k != "Cache-Control"] == kept


def test_an_answers_verdicts_differ_between_private_and_shared_routes() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("CDN-Cache-Control", "max-age=9"), ("ETag", '"e"')]))
    for _ in range(2):
        for private, names in (
            (True, ["ETag", "Cache-Control"]),
            (False, ["CDN-Cache-Control", "ETag"]),
        ):
            out = downstream_headers(SimpleNamespace(headers=headers), private=private)  # type: ignore[arg-type]
            assert list(out) == names


def test_an_answer_sent_whole_loses_only_the_upstreams_content_length() -> None:
    headers = CIMultiDictProxy(
        CIMultiDict([("Content-Length", "2"), ("ETag", '"e"'), ("Set-Cookie", "a=1")])
    )
    answer: Any = SimpleNamespace(headers=headers)
    for _ in range(2):
        for private in (False, True):
            tail = [("Cache-Control", "private")] if private else []
            assert answer_fields(answer, private=private, whole=True) == [("ETag", '"e"'), *tail]
            assert answer_fields(answer, private=private) == [
                ("Content-Length", "2"),
                ("ETag", '"e"'),
                *tail,
            ]


def test_the_kept_verdicts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from bff.proxy import headers as policy

    monkeypatch.setattr(policy, "_VERDICTS", {})
    monkeypatch.setattr(policy, "_CONNECTION_TOKENS", {})
    monkeypatch.setattr(policy, "_NAMES_MAX", 8)
    for i in range(40):
        request = browser_request([(f"X-N{i}", "1"), ("Cookie", "s=1"), ("Connection", f"x-c{i}")])
        assert upstream_headers(request, REQUEST_DROP, (), (), None) == [(f"X-N{i}", "1")]
    assert [len(names) for names in policy._VERDICTS.values()] == [8]
    assert len(policy._CONNECTION_TOKENS) == 8
    request = browser_request([("X-N0", "1"), ("Cookie", "s=1")])
    assert upstream_headers(request, REQUEST_DROP, (), (), None) == [("X-N0", "1")]
