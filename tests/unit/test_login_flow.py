"""/bff/login, /bff/callback and /bff/user end to end against the hostile OP, on a MemoryStore.

Each failure case checks three things: a 4xx JSON error that says what was wrong, no session in
the store, and no session cookie set. The hostile OP (tests/support/hostile_op.py) lies in one way
at a time; the happy path through it is the control that shows each lie is what gets refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bff import errors  # noqa: E402
from bff.app import create_app  # noqa: E402
from bff.config import Settings, parse_settings  # noqa: E402
from bff.endpoints.callback import back_to_app  # noqa: E402
from bff.keys import Keyring, new_secret  # noqa: E402
from bff.services import SERVICES  # noqa: E402
from bff.store.memory import MemoryStore  # noqa: E402
from tests.support.hostile_op import ID_TOKEN_DEFECTS, HostileOp  # noqa: E402

PUBLIC_URL = "http://127.0.0.1:8080"
KEY = "unit-test-key-0123456789abcdefghijklmnopqrstuvwxyz"
COOKIE = "bff-session"
TX_COOKIE = f"{COOKIE}-tx"
CSRF = {"X-CSRF": "1"}

Browser = TestClient[Any, Any] | aiohttp.ClientSession
AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


def make_settings(op: HostileOp, public_url: str = PUBLIC_URL, cookie: str = "") -> Settings:
    cookie = cookie or f"{{name: {COOKIE}, secure: false}}"
    return parse_settings(
        f"""
public_url: {public_url}
oidc:
  issuer: {op.issuer}
  client_id: {op.client_id}
  client_secret: {op.client_secret}
  scopes: [openid, profile, email]
session:
  store: memory://
  cookie: {cookie}
keys: [{KEY}]
"""
    )


@dataclass
class Bff:
    """One bff app on a MemoryStore, a browser for it, and what that browser has seen."""

    client: TestClient[Any, Any]
    store: MemoryStore
    op: HostileOp
    public_url: str = PUBLIC_URL
    seen: list[str] = field(default_factory=list)  # every status line, header and body

    def session_keys(self) -> set[str]:
        return {k for k in list(self.store._data) if k.endswith(":s") and self.store._live(k)}

    def tx_keys(self) -> set[str]:
        return {k for k in list(self.store._data) if k.endswith(":tx") and self.store._live(k)}

    async def get(
        self, path: str, client: Browser | None = None, **kw: Any
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        c = client or self.client
        resp = await c.get(path, allow_redirects=False, **kw)
        body = await resp.read()
        self.seen.append(f"{resp.status} {path}\n{dict(resp.headers)}\n{body.decode('latin-1')}")
        return resp, body

    async def login(self, return_to: str | None = None, client: Browser | None = None) -> str:
        """GET /bff/login; returns the authorization URL it redirects to."""
        path = "/bff/login" if return_to is None else f"/bff/login?returnTo={quote(return_to)}"
        resp, _ = await self.get(path, client)
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]

    async def authorize(self, authorization_url: str) -> str:
        """The OP's answer to the authorization request: the callback path with its query."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(authorization_url, allow_redirects=False) as resp,
        ):
            assert resp.status == 302
            location = URL(resp.headers["Location"])
        assert str(location.with_query(None)) == f"{self.public_url}/bff/callback"
        return str(location.relative())

    async def callback(
        self, path: str, client: Browser | None = None
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        return await self.get(path, client)

    async def full_login(
        self, return_to: str | None = None, client: Browser | None = None
    ) -> aiohttp.ClientResponse:
        callback = await self.authorize(await self.login(return_to, client))
        resp, _ = await self.callback(callback, client)
        assert resp.status == 200, await resp.text()
        return resp

    async def user(self, client: Browser | None = None, **kw: Any) -> aiohttp.ClientResponse:
        headers = {**CSRF, **kw.pop("headers", {})}
        resp, _ = await self.get("/bff/user", client, headers=headers, **kw)
        return resp


@pytest.fixture
async def op() -> AsyncIterator[HostileOp]:
    async with HostileOp() as hostile:
        yield hostile


async def start_bff(aiohttp_client: AiohttpClient, op: HostileOp, **kw: Any) -> Bff:
    store = MemoryStore()
    settings = make_settings(op, **kw)
    client = await aiohttp_client(create_app(settings, store=store))
    return Bff(client, store, op, settings.public_url)


@pytest.fixture
async def bff(aiohttp_client: AiohttpClient, op: HostileOp) -> Bff:
    return await start_bff(aiohttp_client, op)


async def second_browser(bff: Bff) -> AsyncIterator[aiohttp.ClientSession]:
    """Another browser on the same bff: its own cookie jar."""
    root = str(bff.client.make_url("/"))
    async with aiohttp.ClientSession(
        base_url=root, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as other:
        yield other


def set_cookie(resp: aiohttp.ClientResponse, name: str) -> dict[str, str] | None:
    """The attributes of the Set-Cookie for ``name`` (lower-cased keys), None if not set."""
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        if name in jar:
            morsel = jar[name]
            attrs = {k: str(v) for k, v in morsel.items() if v}
            attrs["value"] = morsel.value
            attrs["raw"] = header
            return attrs
    return None


async def assert_refused(
    bff: Bff,
    resp: aiohttp.ClientResponse,
    body: bytes,
    fragment: str,
    sessions_before: set[str] | None = None,
    status: int = 400,
) -> dict[str, Any]:
    """A 4xx JSON error naming the problem, no session in the store, no session cookie."""
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    error: dict[str, Any] = await resp.json()
    assert fragment in error["error_description"], error
    assert bff.session_keys() == (sessions_before or set())
    assert set_cookie(resp, COOKIE) is None
    return error


# -------------------------------------------------------------------------------------------------
# The happy path


async def test_a_full_login_gives_user_claims_and_the_browser_never_sees_a_token(bff: Bff) -> None:
    landing = await bff.full_login("/orders?id=7")
    page = await landing.text()
    assert landing.content_type == "text/html"
    # The landing page navigates to returnTo itself (a Strict cookie travels on that navigation).
    assert 'content="0;url=/orders?id=7"' in page
    assert len(bff.session_keys()) == 1

    resp = await bff.user()
    assert resp.status == 200
    user = await resp.json()
    assert user["sub"] == "alice"
    assert user["claims"]["name"] == "Test User alice"
    assert user["claims"]["email"] == "alice@example.com"
    assert user["claims"]["locale"] == "en"  # merged from userinfo
    assert "nonce" not in user["claims"]
    assert user["logout_url"].startswith("/bff/logout?sid=")

    issued = bff.op.issued[-1]
    seen = "\n".join(bff.seen)
    for token in (issued.access_token, issued.refresh_token, issued.id_token):
        assert token not in seen
        assert base64.b64encode(token.encode()).decode() not in seen
    for segment in issued.id_token.split("."):
        assert segment not in seen


async def test_the_session_and_login_cookies_have_the_right_attributes(
    aiohttp_client: AiohttpClient, op: HostileOp
) -> None:
    """Secure when configured, HttpOnly, Path=/, no Domain; Strict session, Lax transaction."""
    bff = await start_bff(
        aiohttp_client, op, public_url="https://app.example.com", cookie="{name: __Host-bff}"
    )
    resp, _ = await bff.get("/bff/login")
    tx = set_cookie(resp, "__Host-bff-tx")
    assert tx is not None
    assert tx["httponly"] and tx["secure"] and tx["path"] == "/"
    assert tx["samesite"] == "Lax"
    assert "domain" not in tx

    # The aiohttp jar will not send a Secure cookie over http: pass the tx cookie by hand.
    callback = await bff.authorize(resp.headers["Location"])
    callback_resp, _ = await bff.get(callback, headers={"Cookie": f"__Host-bff-tx={tx['value']}"})
    assert callback_resp.status == 200
    session = set_cookie(callback_resp, "__Host-bff")
    assert session is not None
    assert session["httponly"] and session["secure"] and session["path"] == "/"
    assert session["samesite"] == "Strict"
    assert "domain" not in session
    assert len(session["value"]) >= 43  # 256 random bits, base64, plus the signature


async def test_dev_cookies_are_not_secure_but_otherwise_the_same(bff: Bff) -> None:
    resp, _ = await bff.get("/bff/login")
    tx = set_cookie(resp, TX_COOKIE)
    assert tx is not None and not tx.get("secure") and tx["samesite"] == "Lax"
    landing = await bff.full_login()
    session = set_cookie(landing, COOKIE)
    assert session is not None and not session.get("secure")
    assert session["httponly"] and session["path"] == "/" and session["samesite"] == "Strict"


async def test_pkce_s256_is_sent_and_the_verifier_never_appears_in_a_url(bff: Bff) -> None:
    authorization_url = await bff.login()
    callback = await bff.authorize(authorization_url)
    await bff.callback(callback)
    authorize = bff.op.authorize_requests[-1]
    verifier = bff.op.token_requests[-1].form["code_verifier"]
    assert authorize["code_challenge_method"] == "S256"
    digest = hashlib.sha256(verifier.encode()).digest()
    assert authorize["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert len(verifier) >= 43
    for url in (authorization_url, callback, *bff.seen):
        assert verifier not in url


async def test_state_and_nonce_differ_at_every_login(bff: Bff) -> None:
    queries = [URL(await bff.login()).query for _ in range(3)]
    states = {q["state"] for q in queries}
    nonces = {q["nonce"] for q in queries}
    assert len(states) == 3 and len(nonces) == 3
    assert not states & nonces
    assert all(len(v) >= 32 for v in states | nonces)


async def test_every_login_gets_a_new_session_and_the_previous_one_ends(bff: Bff) -> None:
    first = set_cookie(await bff.full_login(), COOKIE)
    first_keys = bff.session_keys()
    assert first is not None and len(first_keys) == 1

    second = set_cookie(await bff.full_login(), COOKIE)
    assert second is not None and second["value"] != first["value"]
    second_keys = bff.session_keys()
    assert len(second_keys) == 1 and second_keys != first_keys
    assert (await bff.user()).status == 200

    # The first cookie, presented again, finds nothing.
    async for other in second_browser(bff):
        resp = await bff.user(other, headers={"Cookie": f"{COOKIE}={first['value']}"})
        assert resp.status == 401


# -------------------------------------------------------------------------------------------------
# state: missing, unknown, another browser's, used twice


async def test_a_callback_without_state_is_refused(bff: Bff) -> None:
    callback = await bff.authorize(await bff.login())
    without_state = str(URL(callback).without_query_params("state"))
    resp, body = await bff.callback(without_state)
    await assert_refused(bff, resp, body, "state parameter is missing")


async def test_a_callback_with_an_unknown_state_is_refused(bff: Bff) -> None:
    callback = await bff.authorize(await bff.login())
    forged = str(URL(callback).update_query(state="forged-" + new_secret()))
    resp, body = await bff.callback(forged)
    await assert_refused(bff, resp, body, "unknown, expired or already used state")
    assert len(bff.op.token_requests) == 0  # refused before the code was spent


async def test_a_callback_in_another_browser_is_refused_and_leaves_the_login_usable(
    bff: Bff,
) -> None:
    callback = await bff.authorize(await bff.login())
    async for attacker in second_browser(bff):
        await bff.login(client=attacker)  # the attacker has a login cookie of its own
        resp, body = await bff.callback(callback, attacker)
        await assert_refused(bff, resp, body, "not started in this browser")
        # ... and one without any login cookie at all.
        attacker.cookie_jar.clear()
        resp, body = await bff.callback(callback, attacker)
        await assert_refused(bff, resp, body, "not started in this browser")
    assert len(bff.op.token_requests) == 0
    # The victim's own login was not burnt by the attempts.
    resp, _ = await bff.callback(callback)
    assert resp.status == 200


async def test_a_state_used_twice_is_refused_the_second_time(bff: Bff) -> None:
    callback = await bff.authorize(await bff.login())
    assert (await bff.callback(callback))[0].status == 200
    sessions = bff.session_keys()
    resp, body = await bff.callback(callback)
    await assert_refused(bff, resp, body, "unknown, expired or already used state", sessions)


async def test_a_replayed_code_with_a_fresh_state_is_refused(bff: Bff) -> None:
    old = await bff.authorize(await bff.login())
    assert (await bff.callback(old))[0].status == 200
    sessions = bff.session_keys()
    fresh = await bff.authorize(await bff.login())
    replay = str(URL(fresh).update_query(code=URL(old).query["code"]))
    resp, body = await bff.callback(replay)
    await assert_refused(bff, resp, body, "authorization code is invalid", sessions)
    assert bff.op.token_requests[-1].status == 400  # the OP was asked, and refused


async def test_a_login_transaction_expires(aiohttp_client: AiohttpClient, op: HostileOp) -> None:
    bff = await start_bff(aiohttp_client, op)
    callback = await bff.authorize(await bff.login())
    services = bff.client.app[SERVICES]
    services.sessions.login_timeout = 0.0  # the transaction is now older than allowed
    resp, body = await bff.callback(callback)
    await assert_refused(bff, resp, body, "took too long")


# -------------------------------------------------------------------------------------------------
# The OP's lies


_DEFECT_REASONS = {
    "bad_signature": "signature is invalid",
    "tampered": "signature is invalid",
    "alg_none": "algorithm 'none' is not allowed",
    "hs256_public_key": "algorithm 'HS256' is not allowed",
    "wrong_iss": "another issuer",
    "wrong_aud": "not meant for this client",
    "extra_aud": "audiences this client does not trust",
    "wrong_azp": "azp is another client",
    "expired": "expired",
    "iat_future": "issued in the future",
    "wrong_nonce": "nonce does not match",
    "missing_nonce": "nonce does not match",
    "unknown_kid": "key the OP does not publish",
}


@pytest.mark.parametrize("defect", ID_TOKEN_DEFECTS)
async def test_an_id_token_defect_ends_the_login_with_400_and_no_session(
    bff: Bff, defect: str
) -> None:
    bff.op.id_token_defect = defect
    callback = await bff.authorize(await bff.login())
    resp, body = await bff.callback(callback)
    error = await assert_refused(bff, resp, body, _DEFECT_REASONS[defect])
    assert error["error"] == "login_failed"
    assert bff.op.token_requests[-1].status == 200  # the OP did hand out the bad token
    assert bff.op.issued[-1].id_token not in body.decode()


@pytest.mark.parametrize(
    ("defect", "reason"),
    [("wrong_iss", "came from another issuer"), ("no_iss", "lacks the iss parameter")],
)
async def test_a_wrong_or_missing_iss_response_parameter_is_refused(
    bff: Bff, defect: str, reason: str
) -> None:
    bff.op.response_defect = defect
    callback = await bff.authorize(await bff.login())
    resp, body = await bff.callback(callback)
    await assert_refused(bff, resp, body, reason)
    assert len(bff.op.token_requests) == 0  # a mix-up answer never reaches the token endpoint


async def test_an_error_response_from_the_op_is_refused_and_burns_the_state(bff: Bff) -> None:
    bff.op.response_defect = "access_denied"
    callback = await bff.authorize(await bff.login())
    assert bff.tx_keys()
    resp, body = await bff.callback(callback)
    await assert_refused(bff, resp, body, "access_denied")
    assert not bff.tx_keys()
    assert len(bff.op.token_requests) == 0


async def test_an_unreachable_token_endpoint_answers_503_and_creates_no_session(bff: Bff) -> None:
    callback = await bff.authorize(await bff.login())
    bff.op.token_status = 502
    resp, body = await bff.callback(callback)
    await assert_refused(bff, resp, body, "502", status=503)
    assert resp.headers["Retry-After"].isdigit()


# -------------------------------------------------------------------------------------------------
# returnTo: only same-origin paths


OFF_SITE = [
    "https://evil.example",
    "http://evil.example/",
    "//evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/%2F%2Fevil.example",
    "%2F%2Fevil.example",
    "/%5Cevil.example",
    "/%5C%5Cevil.example",
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "http:/evil.example",
    "https:evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "/%09/evil.example",
    "/%0a/evil.example",
    "\x00/evil",
    " //evil.example",
    "evil.example",
    "",
]


@pytest.mark.parametrize("return_to", OFF_SITE)
async def test_return_to_off_this_origin_is_refused_at_login(bff: Bff, return_to: str) -> None:
    # Encoded so that the server sees exactly `return_to` after its one decoding.
    path = URL(f"/bff/login?returnTo={quote(return_to, safe='')}", encoded=True)
    resp = await bff.client.get(path, allow_redirects=False)
    body = await resp.read()
    assert resp.status == 400, (return_to, body)
    assert (await resp.json())["error"] == "invalid_return_to"
    assert not bff.tx_keys() and not bff.op.authorize_requests
    assert set_cookie(resp, TX_COOKIE) is None


@pytest.mark.parametrize("raw", ["//evil.example", "/\\evil.example", "https://evil.example"])
async def test_return_to_off_this_origin_is_refused_when_sent_unencoded(bff: Bff, raw: str) -> None:
    resp = await bff.client.get(
        URL(f"/bff/login?returnTo={raw}", encoded=True), allow_redirects=False
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_return_to"


@pytest.mark.parametrize("return_to", ["/", "/orders", "/a/b?x=1&y=%2F#frag", "/%E2%9C%93"])
async def test_return_to_on_this_origin_is_kept_to_the_landing_page(
    bff: Bff, return_to: str
) -> None:
    landing = await bff.full_login(return_to)
    assert f'content="0;url={return_to.replace("&", "&amp;")}"' in await landing.text()


# -------------------------------------------------------------------------------------------------
# Bad cookies at /bff/user: 401, never 500


def _bad_cookies(good: str) -> dict[str, str]:
    value, _, sig = good.rpartition(".")
    other = Keyring(["another-key-" + "x" * 40]).sign(value)
    return {
        "tampered value": ("A" if value[0] != "A" else "B") + value[1:] + "." + sig,
        "tampered signature": value + "." + ("A" if sig[0] != "A" else "B") + sig[1:],
        "truncated": good[:-5],
        "signature only": "." + sig,
        "no signature": value,
        "foreign key": other,
        "fresh secret, foreign key": Keyring(["another-key-" + "x" * 40]).sign(new_secret()),
        "valid signature, unknown session": Keyring([KEY]).sign(new_secret()),
        "empty": "",
        "huge": "A" * 4000,
        "dots": "....",
        "non-ASCII tail": good + "\u20ac",
    }


async def test_bad_session_cookies_get_401_from_user_never_500(bff: Bff) -> None:
    cookie = set_cookie(await bff.full_login(), COOKIE)
    assert cookie is not None
    assert (await bff.user()).status == 200
    async for other in second_browser(bff):
        for label, bad in _bad_cookies(cookie["value"]).items():
            other.cookie_jar.clear()
            resp = await bff.user(other, headers={"Cookie": f"{COOKIE}={bad}"})
            assert resp.status == 401, label
            assert (await resp.json())["error"] == "login_required", label
        # The control: the same browser with the real cookie gets in.
        resp = await bff.user(other, headers={"Cookie": f"{COOKIE}={cookie['value']}"})
        assert resp.status == 200


async def test_a_non_ascii_or_oversized_session_cookie_gets_a_4xx(bff: Bff) -> None:
    cookie = set_cookie(await bff.full_login(), COOKIE)
    assert cookie is not None
    host, port = bff.client.server.host, bff.client.server.port
    for value in ("é" + cookie["value"], cookie["value"] + "€", "\u2603.\u2603"):
        reader, writer = await asyncio.open_connection(host, port)
        request = (
            f"GET /bff/user HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\n"
            f"Cookie: {COOKIE}={value}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(request)
        raw = await reader.read()
        writer.close()
        status_line = raw.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 401"), (value, raw[:300])
    # Past the server's header limit the HTTP parser answers 400 itself: still never a 500.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /bff/user HTTP/1.1\r\nHost: {host}\r\nX-CSRF: 1\r\n"
        f"Cookie: {COOKIE}={'A' * 20000}\r\nConnection: close\r\n\r\n".encode()
    )
    raw = await reader.read()
    writer.close()
    assert raw.split(b"\r\n", 1)[0].endswith(b"400 Bad Request"), raw[:200]


async def test_user_without_the_anti_forgery_header_is_refused(bff: Bff) -> None:
    await bff.full_login()
    resp, _ = await bff.get("/bff/user")
    assert resp.status == 403


# -------------------------------------------------------------------------------------------------
# The OP down at start


async def test_login_answers_503_until_discovery_succeeds(
    aiohttp_client: AiohttpClient,
) -> None:
    async with HostileOp() as dead:
        pass
    port = dead.port
    bff = await start_bff(aiohttp_client, dead)
    resp, body = await bff.get("/bff/login")
    assert resp.status == 503, body
    assert resp.headers["Retry-After"]
    assert (await resp.json())["error"] == "provider_unavailable"
    assert set_cookie(resp, TX_COOKIE) is None and not bff.tx_keys()

    async with HostileOp(port=port) as late:
        bff.op = late
        deadline = time.monotonic() + 10
        status = 503
        while status == 503 and time.monotonic() < deadline:
            resp, _ = await bff.get("/bff/login")
            status = resp.status
            if status == 503:
                await asyncio.sleep(0.2)
        assert status == 302
        assert resp.headers["Location"].startswith(f"{late.issuer}/authorize?")


async def test_the_previous_session_ends_even_when_the_callback_carries_no_session_cookie(
    bff: Bff,
) -> None:
    """A SameSite=Strict cookie never comes with the OP's cross-site redirect to the callback."""
    await bff.full_login()
    first_keys = bff.session_keys()
    assert len(first_keys) == 1
    callback = await bff.authorize(await bff.login())  # /bff/login sees the session cookie
    jar = bff.client.session.cookie_jar
    tx_cookie = next(c for c in jar if c.key == f"{COOKIE}-tx")
    resp, _ = await bff.get(callback, headers={"Cookie": f"{tx_cookie.key}={tx_cookie.value}"})
    assert resp.status == 200
    assert not first_keys & bff.session_keys(), "the first session outlived the second login"
    assert len(bff.session_keys()) == 1


# -------------------------------------------------------------------------------------------------
# A failed login is not a dead end (issue 9, point 11): a browser navigation goes back to the app
# with ?bff_error=<fixed code>; API clients keep the JSON error.

NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": "text/html"}


async def assert_back_in_app(
    bff: Bff, resp: aiohttp.ClientResponse, location: str, sessions_before: set[str] | None = None
) -> None:
    """A 303 to ``location`` on this origin, no session made, no session cookie set."""
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == location
    assert resp.headers["Cache-Control"] == "no-store"
    assert bff.session_keys() == (sessions_before or set())
    assert set_cookie(resp, COOKIE) is None


async def test_a_refused_login_takes_the_browser_back_to_its_return_to_with_the_code(
    bff: Bff,
) -> None:
    bff.op.response_defect = "access_denied"
    callback = await bff.authorize(await bff.login("/orders?id=7#top"))
    resp, body = await bff.get(callback, headers=NAVIGATION)
    await assert_back_in_app(bff, resp, "/orders?id=7&bff_error=access_denied#top")
    assert not bff.tx_keys()  # the state is burnt all the same
    assert b"the user said no" not in body and "said" not in resp.headers["Location"]


async def test_api_clients_still_get_the_json_error(bff: Bff) -> None:
    bff.op.response_defect = "access_denied"
    callback = await bff.authorize(await bff.login("/orders"))
    # A script's fetch says so in its fetch metadata, whatever it accepts.
    resp, body = await bff.get(
        callback,
        headers={"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Accept": "text/html"},
    )
    error = await assert_refused(bff, resp, body, "access_denied")
    assert error["error"] == "login_failed"


async def test_a_browser_without_fetch_metadata_is_recognised_by_accept(bff: Bff) -> None:
    bff.op.response_defect = "access_denied"
    callback = await bff.authorize(await bff.login())
    resp, _ = await bff.get(callback, headers={"Accept": "text/html,*/*;q=0.8"})
    await assert_back_in_app(bff, resp, "/?bff_error=access_denied")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("consent_required", "consent_required"),
        ("temporarily_unavailable", "temporarily_unavailable"),
        ("made_up_error", "login_failed"),  # not an OAuth/OIDC code: not passed on
        ("<script>alert(1)</script>", "login_failed"),
        ("access_denied&bff_error=x", "login_failed"),
    ],
)
async def test_only_allow_listed_op_error_codes_reach_the_app(
    bff: Bff, error: str, code: str
) -> None:
    state = URL(await bff.login("/here")).query["state"]
    query = {"error": error, "error_description": "<b>free text</b> from the OP", "state": state}
    resp, _ = await bff.get(str(URL("/bff/callback").with_query(query)), headers=NAVIGATION)
    await assert_back_in_app(bff, resp, f"/here?bff_error={code}")
    assert not bff.tx_keys()


async def test_every_state_failure_lands_on_the_root(bff: Bff) -> None:
    callback = await bff.authorize(await bff.login("/orders"))
    without_state = str(URL(callback).without_query_params("state"))
    forged = str(URL(callback).update_query(state="forged-" + new_secret()))
    for path in (without_state, forged):
        resp, _ = await bff.get(path, headers=NAVIGATION)
        await assert_back_in_app(bff, resp, "/?bff_error=login_failed")
    async for other in second_browser(bff):  # a login started in another browser
        resp, _ = await bff.get(callback, other, headers=NAVIGATION)
        await assert_back_in_app(bff, resp, "/?bff_error=login_failed")
    assert (await bff.callback(callback))[0].status == 200  # the real one was not burnt
    sessions = bff.session_keys()
    resp, _ = await bff.get(callback, headers=NAVIGATION)  # used twice
    await assert_back_in_app(bff, resp, "/?bff_error=login_failed", sessions)


async def test_an_expired_login_goes_back_to_its_return_to(bff: Bff) -> None:
    callback = await bff.authorize(await bff.login("/orders"))
    bff.client.app[SERVICES].sessions.login_timeout = 0.0
    resp, _ = await bff.get(callback, headers=NAVIGATION)
    await assert_back_in_app(bff, resp, "/orders?bff_error=login_failed")


async def test_an_invalid_code_or_id_token_goes_back_to_the_return_to(bff: Bff) -> None:
    old = await bff.authorize(await bff.login())
    assert (await bff.callback(old))[0].status == 200
    sessions = bff.session_keys()
    fresh = await bff.authorize(await bff.login("/a"))
    replay = str(URL(fresh).update_query(code=URL(old).query["code"]))
    resp, _ = await bff.get(replay, headers=NAVIGATION)
    await assert_back_in_app(bff, resp, "/a?bff_error=login_failed", sessions)
    bff.op.id_token_defect = "wrong_nonce"
    callback = await bff.authorize(await bff.login("/b"))
    resp, body = await bff.get(callback, headers=NAVIGATION)
    await assert_back_in_app(bff, resp, "/b?bff_error=login_failed", sessions)
    assert bff.op.issued[-1].id_token not in body.decode()


async def test_an_op_that_fails_at_the_token_endpoint_goes_back_with_provider_unavailable(
    bff: Bff,
) -> None:
    callback = await bff.authorize(await bff.login("/orders"))
    bff.op.token_status = 502
    resp, _ = await bff.get(callback, headers=NAVIGATION)
    await assert_back_in_app(bff, resp, "/orders?bff_error=provider_unavailable")


async def test_a_navigation_to_login_with_a_bad_return_to_goes_to_the_root(bff: Bff) -> None:
    path = URL(f"/bff/login?returnTo={quote('//evil.example', safe='')}", encoded=True)
    resp = await bff.client.get(path, headers=NAVIGATION, allow_redirects=False)
    await assert_back_in_app(bff, resp, "/?bff_error=invalid_return_to")
    assert not bff.tx_keys() and not bff.op.authorize_requests


async def test_a_navigation_to_login_while_the_op_is_down_goes_back_with_the_code(
    aiohttp_client: AiohttpClient,
) -> None:
    async with HostileOp() as dead:
        pass
    bff = await start_bff(aiohttp_client, dead)
    resp, _ = await bff.get("/bff/login?returnTo=/orders", headers=NAVIGATION)
    await assert_back_in_app(bff, resp, "/orders?bff_error=provider_unavailable")
    assert set_cookie(resp, TX_COOKIE) is None and not bff.tx_keys()


def test_every_bff_error_code_is_a_code_the_way_back_can_carry() -> None:
    """``bff_error`` carries ``BffError.error`` as it is: each must be a plain fixed code."""
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    codes = {c.error for c in classes if issubclass(c, errors.BffError)}
    assert {"login_failed", "rate_limited", "provider_unavailable"} <= codes
    for code in codes:
        assert back_to_app("/x", code).headers["Location"] == f"/x?bff_error={code}"
    assert back_to_app("/x", "Not A Code").headers["Location"] == "/x?bff_error=login_failed"
