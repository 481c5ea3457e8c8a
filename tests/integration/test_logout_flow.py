"""Issue 5 against the real OP (oidc-provider 8) and a real redis-server: logout really ends access.

1. /bff/logout ends the session here (401 for the old cookie, nothing left in Redis), at the OP
   (revocation recorded, its own session ended) and never puts the ID token in a URL.
2. A wrong or missing sid changes nothing.
3. A logout at the OP reaches, through back-channel logout, sessions served by other instances.
4. Forged or replayed back-channel logout tokens are refused and end nothing (hostile OP).
6. Idle and absolute timeouts end sessions whose cookie is still held.
7. An open WebSocket through the proxy is closed within 5 s of its session's back-channel logout.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import pytest
from test_logout_helpers import (
    LANDING,
    bff_login,
    bff_settings,
    config_yaml,
    echo_api,
    follow_to_callback,
    get_user,
    new_port,
    peek_session,
    registered_bff_client,
    running_bff,
    session_cookie,
    static_dir,
    store_traces,
    url_recorder,
    wait_for_status,
)

from bff.config import parse_settings
from bff.oidc import BACKCHANNEL_EVENT
from tests.support.hostile_op import HostileOp
from tests.support.procs import OidcProvider, RedisServer, browser_session, op_logout


def delta(before: dict[str, Any], after: dict[str, Any], *path: str) -> int:
    old: Any = before
    new: Any = after
    for key in path:
        old, new = old[key], new[key]
    return int(new) - int(old)


def basic_auth(client: dict[str, Any]) -> str:
    pair = f"{client['client_id']}:{client['client_secret']}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


async def introspect(op: OidcProvider, client: dict[str, Any], token: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{op.issuer}/token/introspection",
            data={"token": token},
            headers={"Authorization": basic_auth(client)},
        ) as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def op_shows_login_form(browser: aiohttp.ClientSession, authorize: str) -> bool:
    """Follow the OP's redirects: True when it asks for a password, False when it lets us back."""
    op_origin = urlsplit(authorize)[:2]
    url = authorize
    for _ in range(10):
        async with browser.get(url, allow_redirects=False) as resp:
            if resp.status in (302, 303):
                url = urljoin(url, resp.headers["Location"])
                if urlsplit(url)[:2] != op_origin:
                    return False
                continue
            body = await resp.text()
            return resp.status == 200 and 'type="password"' in body
    raise AssertionError("too many redirects at the OP")


# -- 1 and 2: RP-initiated logout -------------------------------------------------------------


async def test_logout_ends_the_session_here_and_at_the_op_without_the_id_token_in_any_url(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    port = new_port()
    client = await registered_bff_client(oidc_op, [port])
    trace, urls = url_recorder()
    async with (
        echo_api() as api,
        running_bff(
            bff_settings(oidc_op, client, redis_server.url, tmp_path, port, api=api)
        ) as bff,
        browser_session(bff.url, trace_configs=[trace]) as browser,
    ):
        await bff_login(browser, bff.url, "logout-alice")
        status, me = await get_user(bff.url, browser=browser)
        assert status == 200 and me["sub"] == "logout-alice"
        cookie = session_cookie(browser, bff.url)
        assert cookie is not None
        session = await peek_session(redis_server.url, cookie)
        assert session is not None and session.data.id_token and session.data.refresh_token
        tokens = session.data
        assert await store_traces(redis_server.url, cookie)  # the probe sees a live session
        async with browser.get(f"{bff.url}/api/hello", headers={"X-CSRF": "1"}) as resp:
            assert resp.status == 200 and (await resp.json())["bearer"] is True
        before = await oidc_op.stats()

        async with browser.get(f"{bff.url}{me['logout_url']}", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Cache-Control"] == "no-store"
            end_session = resp.headers["Location"]
            body = await resp.text()
        for token in (tokens.access_token, tokens.refresh_token, tokens.id_token):
            assert token not in body and token not in end_session

        # The browser goes to the OP's end-session endpoint, with the right parameters.
        meta = await oidc_op.discovery()
        assert end_session.startswith(meta["end_session_endpoint"] + "?")
        assert parse_qs(urlsplit(end_session).query) == {
            "client_id": [client["client_id"]],
            "post_logout_redirect_uri": [f"{bff.url}{LANDING}"],
            "logout_hint": [tokens.sid or tokens.sub],
        }
        # Here: the cookie is gone from the browser, the old value opens nothing, Redis is clean.
        assert session_cookie(browser, bff.url) is None
        assert (await get_user(bff.url, cookie=cookie))[0] == 401
        async with aiohttp.ClientSession() as other:
            headers = {"X-CSRF": "1", "Cookie": f"__Host-bff={cookie}"}
            async with other.get(f"{bff.url}/api/hello", headers=headers) as resp:
                assert resp.status == 401
        assert await store_traces(redis_server.url, cookie) == []
        assert await peek_session(redis_server.url, cookie) is None
        # At the OP: both tokens revoked.
        after = await oidc_op.stats()
        assert delta(before, after, "revocations") == 2
        assert delta(before, after, "revocation_errors") == 0
        assert delta(before, after, "revoked", "RefreshToken") == 1
        assert not (await introspect(oidc_op, client, tokens.refresh_token))["active"]
        assert not (await introspect(oidc_op, client, tokens.access_token))["active"]

        # The OP ends its own session and sends the browser back to our landing page.
        landed = await op_logout(browser, end_session)
        assert landed == f"{bff.url}{LANDING}"
        final = await oidc_op.stats()
        assert delta(before, final, "end_sessions") == 1
        # It also tells us by back-channel; the session is already gone, and we say 200.
        assert delta(before, final, "backchannel_logout_errors") == 0
        async with browser.get(landed) as resp:
            assert resp.status == 200

        # A new login in the same browser must show the OP's login form again.
        async with browser.get(f"{bff.url}/bff/login", allow_redirects=False) as resp:
            authorize = resp.headers["Location"]
        assert await op_shows_login_form(browser, authorize)

    # No URL of the whole flow (requests and redirects) carried the ID token.
    assert len(urls) > 8
    assert tokens.id_token is not None
    assert not [u for u in urls if tokens.id_token in u]
    assert not [u for u in urls if tokens.refresh_token in u or tokens.access_token in u]


async def test_logout_with_a_wrong_or_missing_sid_changes_nothing(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    port = new_port()
    client = await registered_bff_client(oidc_op, [port])
    settings = bff_settings(oidc_op, client, redis_server.url, tmp_path, port)
    async with running_bff(settings) as bff, browser_session(bff.url) as browser:
        await bff_login(browser, bff.url, "logout-bob")
        cookie = session_cookie(browser, bff.url)
        before = await oidc_op.stats()
        for path in ("/bff/logout", "/bff/logout?sid=", "/bff/logout?sid=forged"):
            async with browser.get(f"{bff.url}{path}", allow_redirects=False) as resp:
                assert resp.status == 400, path
                assert (await resp.json())["error"] == "invalid_request"
                assert "Set-Cookie" not in resp.headers
        assert session_cookie(browser, bff.url) == cookie
        assert (await get_user(bff.url, browser=browser))[0] == 200
        after = await oidc_op.stats()
        assert delta(before, after, "revocations") == 0
        assert delta(before, after, "end_sessions") == 0


# -- 3: back-channel logout from the real OP, across instances --------------------------------


async def test_an_op_logout_ends_the_users_sessions_in_two_browsers_on_two_instances(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    port_a, port_b = new_port(), new_port()
    # Without backchannel_logout_session_required the OP's logout token names only the sub:
    # "this user logged out", and every session of the user ends (Back-Channel Logout 2.7).
    client = await registered_bff_client(
        oidc_op, [port_a, port_b], backchannel_logout_session_required=False
    )
    a = bff_settings(oidc_op, client, redis_server.url, tmp_path, port_a)
    b = bff_settings(oidc_op, client, redis_server.url, tmp_path, port_b)
    async with (
        running_bff(a) as bff_a,
        running_bff(b) as bff_b,
        browser_session(bff_a.url, bff_b.url) as laptop,
        browser_session(bff_a.url, bff_b.url) as phone,
    ):
        await bff_login(laptop, bff_a.url, "two-browsers")
        await bff_login(phone, bff_b.url, "two-browsers")
        assert (await get_user(bff_a.url, browser=laptop))[0] == 200
        assert (await get_user(bff_b.url, browser=phone))[0] == 200
        before = await oidc_op.stats()

        # The user signs out at the OP in the laptop's browser (not through bff).
        end_session = f"{oidc_op.issuer}/session/end?" + urlencode(
            {"client_id": client["client_id"]}
        )
        await op_logout(laptop, end_session)

        after = await oidc_op.stats()
        assert delta(before, after, "backchannel_logouts_sent") == 1
        assert delta(before, after, "backchannel_logout_errors") == 0
        # The logout token reached instance A only; B stops serving its session too.
        await wait_for_status(401, bff_a.url, browser=laptop, within=3)
        await wait_for_status(401, bff_b.url, browser=phone, within=3)


async def test_an_op_logout_naming_a_sid_ends_only_that_browsers_session_on_any_instance(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    port_a, port_b = new_port(), new_port()
    client = await registered_bff_client(oidc_op, [port_a, port_b])  # logout tokens carry sid
    a = bff_settings(oidc_op, client, redis_server.url, tmp_path, port_a)
    b = bff_settings(oidc_op, client, redis_server.url, tmp_path, port_b)
    async with (
        running_bff(a) as bff_a,
        running_bff(b) as bff_b,
        browser_session(bff_a.url, bff_b.url) as laptop,
        browser_session(bff_a.url, bff_b.url) as phone,
    ):
        await bff_login(laptop, bff_a.url, "two-sids")
        await bff_login(phone, bff_b.url, "two-sids")
        end_session = f"{oidc_op.issuer}/session/end?" + urlencode(
            {"client_id": client["client_id"]}
        )
        before = await oidc_op.stats()

        await op_logout(phone, end_session)  # the phone's OP session: served by instance B
        await wait_for_status(401, bff_b.url, browser=phone, within=3)
        await asyncio.sleep(1.2)  # past every cache_ttl
        assert (await get_user(bff_a.url, browser=laptop))[0] == 200
        assert (await get_user(bff_b.url, browser=laptop))[0] == 200

        await op_logout(laptop, end_session)
        await wait_for_status(401, bff_b.url, browser=laptop, within=3)
        await wait_for_status(401, bff_a.url, browser=laptop, within=3)
        after = await oidc_op.stats()
        assert delta(before, after, "backchannel_logouts_sent") == 2
        assert delta(before, after, "backchannel_logout_errors") == 0


# -- 4: forged and replayed logout tokens (hostile OP whose issuer bff trusts) ----------------


def logout_claims(op: HostileOp, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": op.issuer,
        "aud": op.client_id,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sub": op.subject,
        "sid": "hostile-sid",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    for key, value in overrides.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


async def post_logout_token(bff_url: str, token: str) -> tuple[int, dict[str, Any] | None]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{bff_url}/bff/backchannel-logout", data={"logout_token": token}) as resp,
    ):
        assert resp.headers["Cache-Control"] == "no-store"
        if resp.status == 200:
            return 200, None
        return resp.status, await resp.json()


async def test_forged_and_replayed_logout_tokens_are_refused_and_end_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with HostileOp() as op:
        op.extra_claims = {"sid": "hostile-sid"}
        port = new_port()
        settings = parse_settings(
            config_yaml(
                port=port,
                issuer=op.issuer,
                client_id=op.client_id,
                client_secret=op.client_secret,
                redis_url=redis_server.url,
                static=static_dir(tmp_path),
            )
        )
        async with running_bff(settings) as bff, browser_session(bff.url) as browser:
            await bff_login(browser, bff.url, at_op=follow_to_callback)
            assert (await get_user(bff.url, browser=browser))[0] == 200

            forged = {
                "bad signature": op.sign(logout_claims(op), op.rogue_key, kid=op.signing_key.kid),
                "wrong aud": op.sign(logout_claims(op, aud="another-client")),
                "nonce present": op.sign(logout_claims(op, nonce="n-0S6_WzA2Mj")),
                "events missing": op.sign(logout_claims(op, events=None)),
                "neither sid nor sub": op.sign(logout_claims(op, sid=None, sub=None)),
            }
            for case, token in forged.items():
                status, body = await post_logout_token(bff.url, token)
                assert status == 400, case
                assert body is not None and body["error"] == "invalid_request", case

            # A genuine token (for a session that does not exist) is taken once, then never again.
            genuine = op.sign(logout_claims(op, sid="another-op-session", sub="somebody-else"))
            assert (await post_logout_token(bff.url, genuine))[0] == 200
            status, body = await post_logout_token(bff.url, genuine)
            assert status == 400 and body is not None and "jti" in body["error_description"]

            for garbage in ("", "not-a-jwt", "a.b.c", "A" * 100_000):
                assert (await post_logout_token(bff.url, garbage))[0] == 400
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{bff.url}/bff/backchannel-logout",
                    data=b"x" * (2 * 1024 * 1024),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                ) as resp,
            ):
                assert resp.status == 400

            await asyncio.sleep(1.2)  # past the read cache: what the store says is what we see
            assert (await get_user(bff.url, browser=browser))[0] == 200

            # And the real thing ends the session.
            assert (await post_logout_token(bff.url, op.sign(logout_claims(op))))[0] == 200
            await wait_for_status(401, bff.url, browser=browser, within=3)


# -- 6: idle and absolute timeouts --------------------------------------------------------------


@pytest.fixture
async def short_lived_bff(oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path) -> Any:
    port = new_port()
    client = await registered_bff_client(oidc_op, [port])
    settings = bff_settings(
        oidc_op,
        client,
        redis_server.url,
        tmp_path,
        port,
        idle_timeout="2s",
        absolute_timeout="4s",
        cache_ttl="0.5s",
    )
    async with running_bff(settings) as bff:
        yield bff


async def test_a_session_idle_past_its_idle_timeout_gets_401_with_the_cookie_still_held(
    short_lived_bff: Any, redis_server: RedisServer
) -> None:
    url = short_lived_bff.url
    async with browser_session(url) as browser:
        await bff_login(browser, url, "idle-user")
        cookie = session_cookie(browser, url)
        assert cookie is not None
    status, me = await get_user(url, cookie=cookie)
    assert status == 200
    assert me["idle_expires_at"] <= me["expires_at"] <= time.time() + 4
    await asyncio.sleep(2.6)
    assert (await get_user(url, cookie=cookie))[0] == 401
    assert await store_traces(redis_server.url, cookie) == []


async def test_a_busy_session_past_its_absolute_timeout_gets_401_with_the_cookie_still_held(
    short_lived_bff: Any,
) -> None:
    url = short_lived_bff.url
    async with browser_session(url) as browser:
        await bff_login(browser, url, "busy-user")
        cookie = session_cookie(browser, url)
        assert cookie is not None
    logged_in = time.monotonic()
    # A request every 0.5 s keeps the 2 s idle timeout away; the 4 s absolute one still ends it.
    while time.monotonic() - logged_in < 3.3:
        assert (await get_user(url, cookie=cookie))[0] == 200
        await asyncio.sleep(0.5)
    await asyncio.sleep(max(0.0, logged_in + 4.3 - time.monotonic()))
    assert (await get_user(url, cookie=cookie))[0] == 401


# -- 7: long-lived connections follow the session -----------------------------------------------


async def test_an_open_websocket_is_closed_within_5_s_of_its_sessions_backchannel_logout(
    oidc_op: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    port_a, port_b = new_port(), new_port()
    # The OP's back-channel logout goes to instance A; the WebSocket is held by instance B.
    client = await registered_bff_client(oidc_op, [port_a, port_b], backchannel_port=port_a)
    async with echo_api() as api:
        a = bff_settings(oidc_op, client, redis_server.url, tmp_path, port_a, api=api)
        b = bff_settings(oidc_op, client, redis_server.url, tmp_path, port_b, api=api)
        async with (
            running_bff(a),
            running_bff(b) as bff_b,
            browser_session(bff_b.url) as browser,
        ):
            await bff_login(browser, bff_b.url, "ws-user")
            async with browser.ws_connect(
                f"{bff_b.url}/api/ws", headers={"Origin": bff_b.url}
            ) as ws:
                await ws.send_str("ping")
                assert (await ws.receive(timeout=5)).data == "echo:ping"
                await asyncio.sleep(2.5)  # outlive the first session checks: it stays open
                await ws.send_str("still here")
                assert (await ws.receive(timeout=5)).data == "echo:still here"

                before = await oidc_op.stats()
                end_session = f"{oidc_op.issuer}/session/end?" + urlencode(
                    {"client_id": client["client_id"]}
                )
                await op_logout(browser, end_session)
                logged_out = time.monotonic()
                after = await oidc_op.stats()
                assert delta(before, after, "backchannel_logouts_sent") == 1

                msg = await ws.receive(timeout=10)
                closed_after = time.monotonic() - logged_out
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                assert ws.close_code == 1008
                assert closed_after < 5.0
