"""``trusted_proxies`` through a real ``bff run``: what the upstream is told about the client
(issue 9, point 4). The test client connects from 127.0.0.1, so ``127.0.0.1/32`` makes it a
trusted proxy; without it, it is just a browser whose forwarding headers mean nothing."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.support.bff_procs import BffProcess, EchoUpstream, Seen, base_config, write_config
from tests.support.procs import OidcProvider, RedisServer

CSRF = {"X-CSRF": "1"}
PLANTED = [
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "gopher"),
    ("X-Real-IP", "6.6.6.6"),
    ("X_Real_IP", "6.6.6.6"),
    ("CF-Connecting-IP", "6.6.6.6"),
]


class Site:
    """bff (a real process) in front of the recording upstream, on a ``token: none`` route."""

    def __init__(self, proc: BffProcess, upstream: EchoUpstream, trusted: bool) -> None:
        self.proc = proc
        self.upstream = upstream
        self.trusted = trusted

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.proc.port}"

    async def call(self, headers: list[tuple[str, str]]) -> Seen:
        self.upstream.clear()
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{self.proc.url}/api/who", headers=CIMultiDict([*CSRF.items(), *headers])
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        (seen,) = self.upstream.seen()
        return seen


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture(
    scope="module", params=[(), ("127.0.0.1/32", "10.0.0.0/8")], ids=["untrusted", "trusted"]
)
def site(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    workdir: Path = tmp_path_factory.mktemp("trusted-proxies")
    proc = BffProcess(workdir / "bff.yaml")
    client = asyncio.run(oidc_op.register_client([f"{proc.url}/bff/callback"]))
    config = base_config(
        public_url=proc.url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=[secrets.token_urlsafe(32)],
        static=workdir / "static",
        upstreams=[{"path": "/api", "url": upstream.url, "token": "none"}],
    )
    if request.param:
        config["trusted_proxies"] = list(request.param)
    write_config(workdir, config)
    with proc:
        yield Site(proc, upstream, bool(request.param))


async def test_the_upstream_hears_bffs_own_proto_and_host_and_no_planted_address(
    site: Site,
) -> None:
    seen = await site.call([("X-Forwarded-For", "198.51.100.7"), *PLANTED])
    assert seen.header("x-forwarded-proto") == ["http"]
    assert seen.header("x-forwarded-host") == [site.host]
    for name in ("x-real-ip", "x_real_ip", "cf-connecting-ip"):
        assert seen.header(name) == []
    assert not any("6.6.6.6" in v or "evil" in v or "gopher" in v for _, v in seen.headers)
    if site.trusted:
        assert seen.header("x-forwarded-for") == ["198.51.100.7, 127.0.0.1"]
        assert seen.header("forwarded") == [
            f'for=198.51.100.7;host="{site.host}";proto=http, for=127.0.0.1'
        ]
    else:
        assert seen.header("x-forwarded-for") == ["127.0.0.1"]
        assert seen.header("forwarded") == [f'for=127.0.0.1;host="{site.host}";proto=http']


async def test_only_the_chain_right_of_the_client_is_passed_on(site: Site) -> None:
    # 6.6.6.6 is what a client wrote itself; a 10.x proxy appended the client's real address.
    seen = await site.call([("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.1.2.3")])
    expected = "198.51.100.7, 10.1.2.3, 127.0.0.1" if site.trusted else "127.0.0.1"
    assert seen.header("x-forwarded-for") == [expected]


async def test_forwarded_from_a_trusted_proxy_is_read_when_no_x_forwarded_for_came(
    site: Site,
) -> None:
    seen = await site.call([("Forwarded", 'for=6.6.6.6, for="[2001:db8::7]:4711";proto=https')])
    if site.trusted:
        assert seen.header("x-forwarded-for") == ["2001:db8::7, 127.0.0.1"]
        assert seen.header("forwarded") == [
            f'for="[2001:db8::7]";host="{site.host}";proto=http, for=127.0.0.1'
        ]
    else:
        assert seen.header("x-forwarded-for") == ["127.0.0.1"]


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Forwarded-For", "unknown")],
        [("X-Forwarded-For", "_hidden, 10.0.0.1")],
        [("X-Forwarded-For", "not an address")],
        [("X-Forwarded-For", "198.51.100.7:port")],
        [("X-Forwarded-For", ",,,")],
        [("Forwarded", "for=unknown")],
        [("Forwarded", "for=_hidden")],
        [("Forwarded", "by=10.0.0.1")],
        [("Forwarded", 'for="unterminated')],
        [("Forwarded", "for=192.0.2.1.5")],
    ],
)
async def test_malformed_forwarding_headers_leave_the_peer_and_never_a_500(
    site: Site, headers: list[tuple[str, str]]
) -> None:
    seen = await site.call(headers)
    assert seen.header("x-forwarded-for") == ["127.0.0.1"]
    assert seen.header("forwarded") == [f'for=127.0.0.1;host="{site.host}";proto=http']
