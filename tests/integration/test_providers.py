"""Issue 12, point 5: one bff, two real OpenID Providers (two oidc-provider processes).

Provider ``a`` is the default (the suite's shared OP, redirect URI ``/bff/callback``), provider
``b`` a second OP with its own cookies (``/bff/callback/b``). Both are real oidc-provider 8
processes; the counters of ``/__test/stats`` tell which OP bff talked to. Every browser is a
fresh cookie jar (one user agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from test_logout_helpers import (
    KEY,
    RunningBff,
    echo_api,
    get_user,
    running_bff,
    session_cookie,
    static_dir,
    wait_for_status,
)
from yarl import URL

from bff.config import parse_settings
from tests.support.procs import (
    OidcProvider,
    RedisServer,
    browser_session,
    free_port,
    op_login,
    op_logout,
)

ROOT = Path(__file__).resolve().parents[2]
CSRF = {"X-CSRF": "1"}


@pytest.fixture(scope="module")
def op_b() -> Iterator[OidcProvider]:
    """The second OP: short-lived access tokens like the shared one, cookies of its own."""
    with OidcProvider(access_ttl=5, par="off", cookie_prefix="opb") as op:
        yield op


@dataclass
class Two:
    bff: RunningBff
    a: OidcProvider
    b: OidcProvider
    client_a: dict[str, Any]
    client_b: dict[str, Any]
    yaml: str

    @property
    def url(self) -> str:
        return self.bff.url


def two_provider_yaml(
    port: int,
    a: OidcProvider,
    client_a: dict[str, Any],
    b: OidcProvider,
    client_b: dict[str, Any],
    redis_url: str,
    static: Path,
    *,
    api: str | None = None,
    hosts_a: str = "[]",
    hosts_b: str = "[]",
) -> str:
    upstreams = f"upstreams:\n  - {{path: /api, url: {api}, token: user}}\n" if api else ""
    return f"""\
public_url: http://127.0.0.1:{port}
listen: {{host: 127.0.0.1, port: {port}}}
static: {static}
oidc:
  - name: a
    issuer: {a.issuer}
    client_id: {json.dumps(client_a["client_id"])}
    client_secret: {json.dumps(client_a["client_secret"])}
    scopes: [openid, profile, email]
    post_logout_redirect: /bye-a
    hosts: {hosts_a}
  - name: b
    issuer: {b.issuer}
    client_id: {json.dumps(client_b["client_id"])}
    client_secret: {json.dumps(client_b["client_secret"])}
    scopes: [openid, profile, email]
    post_logout_redirect: /bye-b
    hosts: {hosts_b}
session:
  store: {redis_url}
  cache_ttl: 0s
keys: [{KEY}]
log: {{level: warning}}
{upstreams}"""


async def register(
    op: OidcProvider, port: int, callback: str, landing: str, **metadata: Any
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    return await op.register_client(
        redirect_uris=[f"{url}{callback}"],
        post_logout_redirect_uris=[f"{url}{landing}"],
        backchannel_logout_uri=f"{url}/bff/backchannel-logout",
        **metadata,
    )


@contextlib.asynccontextmanager
async def two_providers(
    a: OidcProvider, b: OidcProvider, redis: RedisServer, tmp_path: Path, **hosts: str
) -> AsyncIterator[Two]:
    port = free_port()
    client_a = await register(a, port, "/bff/callback", "/bye-a")
    # B's logout tokens name the sub alone (no sid): the case where only per-issuer indexes
    # keep B's "carol" from ending A's "carol".
    client_b = await register(
        b, port, "/bff/callback/b", "/bye-b", backchannel_logout_session_required=False
    )
    async with echo_api() as api:
        text = two_provider_yaml(
            port, a, client_a, b, client_b, redis.url, static_dir(tmp_path), api=api, **hosts
        )
        async with running_bff(parse_settings(text)) as bff:
            yield Two(bff, a, b, client_a, client_b, text)


@pytest.fixture
async def two(
    oidc_op: OidcProvider,
    op_b: OidcProvider,
    redis_server: RedisServer,
    tmp_path: Path,
    ensure_running: None,
) -> AsyncIterator[Two]:
    async with two_providers(oidc_op, op_b, redis_server, tmp_path) as running:
        yield running


async def login(
    browser: aiohttp.ClientSession, two: Two, user: str, query: str = ""
) -> tuple[str, str]:
    """A whole login through bff; (the authorization URL, the callback URL)."""
    async with browser.get(f"{two.url}/bff/login{query}", allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        authorize = resp.headers["Location"]
    callback = await op_login(browser, authorize, user)
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
    return authorize, callback


async def test_a_login_at_each_provider_by_idp_and_each_session_remembers_its_provider(
    two: Two,
) -> None:
    async with browser_session(two.url) as alice_a, browser_session(two.url) as alice_b:
        authorize_a, callback_a = await login(alice_a, two, "alice")  # no idp: the default
        authorize_b, callback_b = await login(alice_b, two, "alice", "?idp=b")
        # Each went to its own OP, with its own client, and came back on its own redirect URI.
        assert authorize_a.startswith(two.a.issuer + "/")
        assert parse_qs(urlsplit(authorize_a).query)["client_id"] == [two.client_a["client_id"]]
        assert authorize_b.startswith(two.b.issuer + "/")
        assert parse_qs(urlsplit(authorize_b).query)["client_id"] == [two.client_b["client_id"]]
        assert callback_a.startswith(f"{two.url}/bff/callback?")
        assert callback_b.startswith(f"{two.url}/bff/callback/b?")
        # The OP's iss in each callback is that provider's (RFC 9207).
        assert parse_qs(urlsplit(callback_b).query)["iss"] == [two.b.issuer]
        status_a, me_a = await get_user(two.url, browser=alice_a)
        status_b, me_b = await get_user(two.url, browser=alice_b)
        assert (status_a, me_a["idp"], me_a["sub"]) == (200, "a", "alice")
        assert (status_b, me_b["idp"], me_b["sub"]) == (200, "b", "alice")


async def test_a_callback_on_another_providers_redirect_uri_is_refused(two: Two) -> None:
    """Mix-up defense: B's answer presented at A's redirect URI (same state) is refused and the
    code is never sent to A's token endpoint."""
    async with browser_session(two.url) as browser:
        async with browser.get(f"{two.url}/bff/login?idp=b", allow_redirects=False) as resp:
            authorize = resp.headers["Location"]
        callback = await op_login(browser, authorize, "mallory")
        moved = callback.replace("/bff/callback/b?", "/bff/callback?")
        before_a = await two.a.stats()
        async with browser.get(
            moved, allow_redirects=False, headers={"Accept": "application/json"}
        ) as resp:
            body = await resp.json()
            assert resp.status == 400, body
        assert "another provider's redirect URI" in body["error_description"]
        assert (await two.a.stats())["token"] == before_a["token"]
        assert session_cookie(browser, two.url) is None


async def test_an_unknown_idp_is_a_400_json_error(two: Two) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{two.url}/bff/login?idp=nope", allow_redirects=False) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"] == "unknown_idp"
    # A browser navigation goes back to the app with the code, like any failed login.
    nav = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{two.url}/bff/login?idp=nope&returnTo=/x", headers=nav, allow_redirects=False
        ) as resp,
    ):
        assert resp.status == 303
        assert resp.headers["Location"] == "/x?bff_error=unknown_idp"


async def test_refresh_goes_to_the_sessions_provider_only(two: Two) -> None:
    async with browser_session(two.url) as at_b:
        await login(at_b, two, "refresh-bob", "?idp=b")
        await two.a.reset_stats()
        await two.b.reset_stats()
        # Access tokens live 5 s: after half of that, the next call refreshes first.
        await asyncio.sleep(3.0)
        async with at_b.get(f"{two.url}/api/hello", headers=CSRF) as resp:
            assert resp.status == 200 and (await resp.json())["bearer"] is True
        stats_a, stats_b = await two.a.stats(), await two.b.stats()
        assert stats_b["token"]["refresh_token"] == 1
        assert stats_b["token_errors"]["refresh_token"] == 0
        assert stats_a["token"]["refresh_token"] == 0


async def test_a_logout_at_op_b_ends_bs_session_and_not_the_same_sub_at_a(two: Two) -> None:
    """OP B's back-channel logout token names sub "carol" (and no sid), who has a session at A
    too: only B's session ends (the indexes are per issuer)."""
    async with browser_session(two.url) as at_a, browser_session(two.url) as at_b:
        await login(at_a, two, "carol")
        await login(at_b, two, "carol", "?idp=b")
        before_b = await two.b.stats()
        end_session = (await two.b.discovery())["end_session_endpoint"]
        await op_logout(at_b, f"{end_session}?client_id={two.client_b['client_id']}")
        after_b = await two.b.stats()
        assert after_b["backchannel_logouts_sent"] - before_b["backchannel_logouts_sent"] == 1
        assert after_b["backchannel_logout_errors"] == before_b["backchannel_logout_errors"]
        await wait_for_status(401, two.url, browser=at_b)
        status, me = await get_user(two.url, browser=at_a)
        assert (status, me["idp"], me["sub"]) == (200, "a", "carol")


async def test_rp_logout_goes_to_the_sessions_op_its_client_and_its_landing(two: Two) -> None:
    async with browser_session(two.url) as at_b:
        await login(at_b, two, "dave", "?idp=b")
        _, me = await get_user(two.url, browser=at_b)
        await two.a.reset_stats()
        await two.b.reset_stats()
        async with at_b.get(f"{two.url}{me['logout_url']}", allow_redirects=False) as resp:
            assert resp.status == 302
            location = URL(resp.headers["Location"])
        end_session = (await two.b.discovery())["end_session_endpoint"]
        assert str(location.with_query(None)) == end_session
        assert location.query["client_id"] == two.client_b["client_id"]
        assert location.query["post_logout_redirect_uri"] == f"{two.url}/bye-b"
        # Its tokens were revoked at B, nothing was sent to A.
        assert (await two.b.stats())["revocations"] >= 1
        assert (await two.a.stats())["revocations"] == 0
        landing = await op_logout(at_b, str(location))
        assert landing == f"{two.url}/bye-b"


async def test_a_mapped_host_picks_its_provider_and_other_hosts_are_not_believed(
    oidc_op: OidcProvider,
    op_b: OidcProvider,
    redis_server: RedisServer,
    tmp_path: Path,
    ensure_running: None,
) -> None:
    """``b`` serves the host of public_url (127.0.0.1), ``a`` the host staff.localhost."""
    async with two_providers(
        oidc_op, op_b, redis_server, tmp_path, hosts_a="[staff.localhost]", hosts_b="[127.0.0.1]"
    ) as two:
        port = urlsplit(two.url).port

        async def login_location(**headers: str) -> str:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"{two.url}/bff/login?returnTo=/r", headers=headers, allow_redirects=False
                ) as resp,
            ):
                assert resp.status == 302, await resp.text()
                return resp.headers["Location"]

        # On public_url's host, which b maps: straight to b's OP.
        assert (await login_location()).startswith(two.b.issuer + "/")
        # A forwarded host is never believed (a browser can plant it through most proxies).
        assert (await login_location(**{"X-Forwarded-Host": "staff.localhost"})).startswith(
            two.b.issuer + "/"
        )
        # On a's host, which is not public_url's: on to public_url's login with idp=a.
        moved = await login_location(Host=f"staff.localhost:{port}")
        assert moved == f"{two.url}/bff/login?idp=a&returnTo=%2Fr"
        # An explicit idp wins over the host.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{two.url}/bff/login?idp=a", allow_redirects=False) as resp,
        ):
            assert resp.headers["Location"].startswith(two.a.issuer + "/")
        # A host no provider maps: the default provider (a).
        assert (await login_location(Host=f"other.localhost:{port}")).startswith(two.a.issuer + "/")
        # The host-picked login completes at b.
        async with browser_session(two.url) as browser:
            await login(browser, two, "erin")
            status, me = await get_user(two.url, browser=browser)
            assert (status, me["idp"]) == (200, "b")


async def test_readyz_waits_for_every_provider(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path, ensure_running: None
) -> None:
    """Provider b's OP is down at start: not ready, naming it; login at a works meanwhile."""
    down = OidcProvider(access_ttl=5, par="off")
    down.port = free_port()
    port = free_port()
    client_a = await register(oidc_op, port, "/bff/callback", "/bye-a")
    fake_b = {"client_id": "b", "client_secret": "unused"}
    text = two_provider_yaml(
        port, oidc_op, client_a, down, fake_b, redis_server.url, static_dir(tmp_path)
    )
    async with running_bff(parse_settings(text)) as bff:
        body: dict[str, Any] = {}
        for _ in range(100):
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{bff.url}/readyz") as resp,
            ):
                body = await resp.json()
                if body["checks"].get("provider") == "ok":
                    assert resp.status == 503
                    break
            await asyncio.sleep(0.1)
        assert body["checks"] == {
            "store": "ok",
            "provider": "ok",
            "provider:b": "provider_unavailable",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{bff.url}/bff/login", allow_redirects=False) as resp,
        ):
            assert resp.status == 302
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{bff.url}/bff/login?idp=b", allow_redirects=False) as resp,
        ):
            assert resp.status == 503


def test_check_config_checks_and_reports_each_provider(
    oidc_op: OidcProvider, op_b: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    clients = {"client_id": "x", "client_secret": "unused"}
    text = two_provider_yaml(
        free_port(), oidc_op, clients, op_b, clients, redis_server.url, static_dir(tmp_path)
    )
    config = tmp_path / "bff.yaml"
    config.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bff", "check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    out = done.stdout + done.stderr
    for name, op in (("a", oidc_op), ("b", op_b)):
        subject = f"oidc {name} ({op.issuer})"
        assert f"{subject}: discovery OK" in out, out
        assert f"{subject} offers pushed authorization requests (PAR, RFC 9126): no" in out
        assert f"{subject} offers back-channel logout: yes" in out
        assert f"{subject} offers DPoP (RFC 9449):" in out
        assert f"{subject} offers token exchange (RFC 8693):" in out
    assert f"oidc b ({op_b.issuer}): redirect_uri http://127.0.0.1:" in out
    assert "/bff/callback/b" in out


async def test_the_sessions_cli_works_on_one_providers_subjects(two: Two, tmp_path: Path) -> None:
    config = tmp_path / "bff.yaml"
    config.write_text(two.yaml)

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bff", "sessions", *args, "--config", str(config),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    async with browser_session(two.url) as at_a, browser_session(two.url) as at_b:
        await login(at_a, two, "cli-frank")
        await login(at_b, two, "cli-frank", "?idp=b")
        assert "1 live session(s)" in (await cli("list", "--sub", "cli-frank", "--idp", "b"))[1]
        code, out = await cli("revoke", "--sub", "cli-frank", "--idp", "b")
        assert code == 0 and "ended 1 session(s)" in out
        await wait_for_status(401, two.url, browser=at_b)
        assert (await get_user(two.url, browser=at_a))[0] == 200
        assert "1 live session(s)" in (await cli("list", "--sub", "cli-frank"))[1]  # a: default
        code, out = await cli("list", "--sub", "cli-frank", "--idp", "nope")
        assert code == 2 and "no provider named 'nope'" in out
