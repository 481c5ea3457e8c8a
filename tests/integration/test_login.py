"""Issue 2 (login) proven against a real redis-server and the real oidc-provider test OP.

Each test serves a real ``create_app`` on a loopback port (or runs ``python -m bff`` as a
subprocess where a process boundary matters: a Redis outage, the CLI), and drives it with an
aiohttp session that keeps cookies like a browser and records every response it sees.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from yarl import URL

from bff.app import create_app
from bff.config import parse_settings
from bff.keys import (
    DecryptError,
    Keyring,
    SessionSecret,
    new_secret,
    open_sealed,
    secret_key,
    store_id,
)
from bff.sessions import LoginTransaction, SessionData, session_key
from tests.support.bff_procs import BffProcess
from tests.support.procs import (
    OidcProvider,
    RedisServer,
    _walk,
    browser_session,
    free_port,
    op_login,
)

ROOT = Path(__file__).resolve().parents[2]
KEY_A = "integration-key-A-" + "a1" * 20
KEY_B = "integration-key-B-" + "b2" * 20
COOKIE = "__Host-bff"
TX_COOKIE = f"{COOKIE}-tx"
CSRF = {"X-CSRF": "1"}


def config_yaml(
    port: int, issuer: str, client: dict[str, Any], redis_url: str, keys: list[str]
) -> str:
    return f"""\
public_url: http://127.0.0.1:{port}
listen: {{host: 127.0.0.1, port: {port}}}
oidc:
  issuer: {json.dumps(issuer)}
  client_id: {json.dumps(client["client_id"])}
  client_secret: {json.dumps(client.get("client_secret", "unused"))}
  scopes: [openid, profile, email, offline_access]
session:
  store: {redis_url}
  cookie: {{name: {COOKIE}, secure: true, same_site: strict}}
keys: [{", ".join(keys)}]
log: {{level: warning}}
workers: 1
"""


@dataclass
class Bff:
    """A running bff (in-process) and the OP client it was registered as."""

    port: int
    client: dict[str, Any]
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, op: OidcProvider, redis: RedisServer, keys: list[str]) -> None:
        settings = parse_settings(config_yaml(self.port, op.issuer, self.client, redis.url, keys))
        self.runner = web.AppRunner(create_app(settings), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def bff(
    oidc_op: OidcProvider, redis_server: RedisServer, ensure_running: None
) -> AsyncIterator[Bff]:
    port = free_port()
    client = await oidc_op.register_client([f"http://127.0.0.1:{port}/bff/callback"])
    running = Bff(port, client)
    await running.start(oidc_op, redis_server, [KEY_A])
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Browser:
    """A cookie-keeping client that records every response it is shown, headers and body."""

    http: aiohttp.ClientSession
    seen: list[str] = field(default_factory=list)

    async def get(self, url: str | URL, **kw: Any) -> tuple[aiohttp.ClientResponse, str]:
        async with self.http.get(url, allow_redirects=False, **kw) as resp:
            body = await resp.text(errors="replace")
            return resp, body

    def cookie(self, bff: Bff, name: str = COOKIE) -> str | None:
        jar = self.http.cookie_jar.filter_cookies(URL(bff.url + "/"))
        return jar[name].value if name in jar else None


def recording_trace(seen: list[str]) -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def on_end(
        session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        resp = params.response
        body = await resp.read()  # cached: the caller still reads it
        headers = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        seen.append(f"{params.method} {params.url} -> {resp.status}\n{headers}\n\n{body!r}")

    trace.on_request_end.append(on_end)
    return trace


@contextlib.asynccontextmanager
async def browser_for(bff: Bff) -> AsyncIterator[Browser]:
    seen: list[str] = []
    async with browser_session(bff.url, trace_configs=[recording_trace(seen)]) as http:
        yield Browser(http, seen)


@pytest.fixture
async def browser(bff: Bff) -> AsyncIterator[Browser]:
    async with browser_for(bff) as b:
        yield b


async def start_login(browser: Browser, bff: Bff, return_to: str | None = None) -> str:
    path = "/bff/login" if return_to is None else f"/bff/login?returnTo={return_to}"
    resp, body = await browser.get(bff.url + path)
    assert resp.status == 302, body
    return resp.headers["Location"]


async def callback_url(browser: Browser, bff: Bff, user: str = "alice") -> str:
    """Start a login and log in at the OP; the callback URL the OP sends the browser to."""
    location = await op_login(browser.http, await start_login(browser, bff), user)
    assert location.startswith(f"{bff.url}/bff/callback?"), location
    return location


async def full_login(browser: Browser, bff: Bff, user: str = "alice") -> aiohttp.ClientResponse:
    resp, body = await browser.get(await callback_url(browser, bff, user))
    assert resp.status == 200, body
    return resp


async def user_status(bff: Bff, cookie: str | None) -> tuple[int, dict[str, Any]]:
    """/bff/user from a fresh connection with exactly this cookie value (or none)."""
    headers = {**CSRF, **({"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {})}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{bff.url}/bff/user", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def session_keys(redis: aioredis.Redis) -> set[bytes]:
    return {k async for k in redis.scan_iter(match="bff:*:s")}


def read_session(cookie: str, blob: bytes, keys: list[str]) -> SessionData:
    """Open a session record the only way there is: with the secret in the user's cookie."""
    secret = Keyring(keys).unsign(cookie)
    assert secret is not None
    sid = store_id(SessionSecret(secret))
    return SessionData.from_bytes(
        open_sealed(secret_key(SessionSecret(secret)), blob, sid.encode())
    )


async def session_of_cookie(
    redis: aioredis.Redis, cookie: str, keys: list[str]
) -> tuple[bytes, bytes, SessionData]:
    secret = Keyring(keys).unsign(cookie)
    assert secret is not None
    key = session_key(store_id(SessionSecret(secret))).encode()
    blob = await redis.get(key)
    assert isinstance(blob, bytes)
    return key, blob, read_session(cookie, blob, keys)


def set_cookie_attrs(resp: aiohttp.ClientResponse, name: str) -> dict[str, str] | None:
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        if name in jar:
            attrs = {k: str(v) for k, v in jar[name].items() if v}
            attrs["value"] = jar[name].value
            return attrs
    return None


def encodings(token: str) -> list[str]:
    raw = token.encode()
    return [
        token,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
        raw.hex(),
    ]


# -------------------------------------------------------------------------------------------------
# 1. A full login; no token anywhere the browser looked


async def test_a_full_login_ends_with_user_claims_and_no_token_ever_reaches_the_browser(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    resp, body = await browser.get(await callback_url(browser, bff))
    assert resp.status == 200
    assert 'content="0;url=/"' in body

    resp, body = await browser.get(f"{bff.url}/bff/user", headers=CSRF)
    assert resp.status == 200, body
    user = json.loads(body)
    assert user["sub"] == "alice"
    assert user["claims"]["name"] == "Test User alice"
    assert user["claims"]["email"] == "alice@example.com"

    cookie = browser.cookie(bff)
    assert cookie is not None
    _, _, data = await session_of_cookie(raw_redis, cookie, [KEY_A])
    tokens = [data.access_token, data.refresh_token, data.id_token]
    assert all(tokens), "the OP should have issued access, refresh and ID tokens"
    assert data.sub == "alice"
    assert data.id_token is not None
    id_payload = data.id_token.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(id_payload + "==="))["sub"] == "alice"

    assert len(browser.seen) >= 4  # login, OP pages, callback, user
    # The record holds bodies too: the /bff/user answer, with its claims, is in it.
    assert any("/bff/user -> 200" in r and "alice@example.com" in r for r in browser.seen)
    everything = "\n".join(browser.seen)
    for token in tokens:
        assert token is not None
        for form in encodings(token):
            assert form not in everything
    for segment in data.id_token.split(".")[1:]:
        assert segment not in everything


async def test_cookies_have_their_attributes_and_pkce_s256_is_used_with_a_hidden_verifier(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    resp, _ = await browser.get(f"{bff.url}/bff/login")
    tx_cookie = set_cookie_attrs(resp, TX_COOKIE)
    assert tx_cookie is not None
    assert tx_cookie["httponly"] and tx_cookie["secure"] and tx_cookie["path"] == "/"
    assert tx_cookie["samesite"] == "Lax" and "domain" not in tx_cookie
    authorize = URL(resp.headers["Location"])
    assert authorize.query["code_challenge_method"] == "S256"

    # The verifier sits in the transaction record, sealed under the browser's tx cookie secret.
    browser_secret = Keyring([KEY_A]).unsign(tx_cookie["value"], "login")
    assert browser_secret is not None
    state = authorize.query["state"]
    tx_key = f"bff:{{{store_id(SessionSecret(state), 'tx')}}}:tx"
    sealed = await raw_redis.get(tx_key)
    assert isinstance(sealed, bytes)
    tx = LoginTransaction(
        **json.loads(
            open_sealed(secret_key(SessionSecret(browser_secret), "tx"), sealed, tx_key.encode())
        )
    )
    assert tx.state == state and tx.nonce == authorize.query["nonce"]
    digest = hashlib.sha256(tx.code_verifier.encode()).digest()
    assert (
        authorize.query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    )

    location = await op_login(browser.http, str(authorize), "alice")
    resp, _ = await browser.get(location)
    assert resp.status == 200
    session_cookie = set_cookie_attrs(resp, COOKIE)
    assert session_cookie is not None
    assert session_cookie["httponly"] and session_cookie["secure"]
    assert session_cookie["path"] == "/" and session_cookie["samesite"] == "Strict"
    assert "domain" not in session_cookie
    for record in browser.seen:  # every URL, Location, header and body of the flow
        assert tx.code_verifier not in record

    # A second login: fresh state and nonce.
    again = URL(await start_login(browser, bff))
    assert again.query["state"] != state and again.query["nonce"] != tx.nonce


async def test_every_login_makes_a_new_session_and_ends_the_previous_one(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    await full_login(browser, bff)
    first = browser.cookie(bff)
    assert first is not None
    first_key, _, _ = await session_of_cookie(raw_redis, first, [KEY_A])

    await full_login(browser, bff)  # the OP session exists: no form this time
    second = browser.cookie(bff)
    assert second is not None and second != first
    second_key, _, _ = await session_of_cookie(raw_redis, second, [KEY_A])
    assert second_key != first_key
    assert await raw_redis.exists(first_key) == 0
    assert (await user_status(bff, first))[0] == 401
    assert (await user_status(bff, second))[0] == 200


# -------------------------------------------------------------------------------------------------
# 2. Every failure: 4xx JSON naming the problem, and no session


async def assert_refused(
    browser: Browser,
    url: str,
    fragment: str,
    raw_redis: aioredis.Redis,
    status: int = 400,
) -> None:
    before = await session_keys(raw_redis)
    resp, body = await browser.get(url)
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    error = json.loads(body)
    assert fragment in error["error_description"], error
    assert set_cookie_attrs(resp, COOKIE) is None
    assert await session_keys(raw_redis) == before


async def test_state_missing_unknown_foreign_or_reused_is_refused_without_a_session(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    callback = URL(await callback_url(browser, bff))
    await assert_refused(
        browser,
        str(callback.without_query_params("state")),
        "state parameter is missing",
        raw_redis,
    )
    await assert_refused(
        browser,
        str(callback.update_query(state=new_secret())),
        "unknown, expired or already used state",
        raw_redis,
    )
    # Another browser, with a login cookie of its own, cannot finish this browser's login ...
    async with browser_for(bff) as attacker:
        await start_login(attacker, bff)
        await assert_refused(attacker, str(callback), "not started in this browser", raw_redis)
    # ... nor one without any.
    async with browser_for(bff) as attacker:
        await assert_refused(attacker, str(callback), "not started in this browser", raw_redis)

    # The owner still can, once.
    resp, _ = await browser.get(str(callback))
    assert resp.status == 200
    await assert_refused(
        browser, str(callback), "unknown, expired or already used state", raw_redis
    )


async def test_a_replayed_code_is_refused(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis, oidc_op: OidcProvider
) -> None:
    first = URL(await callback_url(browser, bff))
    resp, _ = await browser.get(str(first))
    assert resp.status == 200
    # Same callback again: refused (the state is spent).
    await assert_refused(browser, str(first), "already used state", raw_redis)
    # The old code under a fresh transaction of the same browser: the OP refuses it.
    fresh = URL(await callback_url(browser, bff))
    before = (await oidc_op.stats())["token_errors"]["authorization_code"]
    await assert_refused(
        browser,
        str(fresh.update_query(code=first.query["code"])),
        "authorization code is invalid, expired or already used",
        raw_redis,
    )
    after = (await oidc_op.stats())["token_errors"]["authorization_code"]
    assert after == before + 1  # bff did present it, and the real OP said no


async def test_a_wrong_iss_response_parameter_is_refused_before_the_code_is_spent(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis, oidc_op: OidcProvider
) -> None:
    callback = URL(await callback_url(browser, bff))
    assert callback.query["iss"] == oidc_op.issuer
    before = (await oidc_op.stats())["token"]["authorization_code"]
    await assert_refused(
        browser,
        str(callback.update_query(iss="https://evil.example")),
        "came from another issuer",
        raw_redis,
    )
    assert (await oidc_op.stats())["token"]["authorization_code"] == before


def cancel(html: str, forms: list[Any]) -> tuple[Any, dict[str, str]] | None:
    """What a person who clicks the OP's Cancel button does (its abort path: access_denied)."""
    for form in forms:
        if form.id == "abort-form":
            return form, {}
    raise AssertionError(f"no cancel form:\n{html[:500]}")


async def test_an_access_denied_answer_from_the_op_is_refused(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    authorize = await start_login(browser, bff)
    location = await _walk(browser.http, authorize, cancel)
    assert URL(location).query["error"] == "access_denied"
    await assert_refused(browser, location, "access_denied", raw_redis)


async def test_a_person_who_cancels_at_the_op_lands_back_in_the_app_with_the_error(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    """Issue 9, point 11: a browser navigation never ends on a JSON page after a failed login."""
    authorize = await start_login(browser, bff, "/orders%3Fid%3D7")
    tx_key = f"bff:{{{store_id(SessionSecret(URL(authorize).query['state']), 'tx')}}}:tx"
    assert await raw_redis.exists(tx_key)
    sessions = await session_keys(raw_redis)
    location = await _walk(browser.http, authorize, cancel)
    assert URL(location).query["error"] == "access_denied"
    assert URL(location).query["error_description"]  # the OP's own words ...
    navigation = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    resp, body = await browser.get(location, headers=navigation)
    assert resp.status == 303, body
    # ... never reach the app: only the fixed code, on the login's returnTo.
    assert resp.headers["Location"] == "/orders?id=7&bff_error=access_denied"
    assert set_cookie_attrs(resp, COOKIE) is None
    assert await session_keys(raw_redis) == sessions
    assert not await raw_redis.exists(tx_key)
    # The state was spent: the same answer again no longer knows its returnTo.
    resp, _ = await browser.get(location, headers=navigation)
    assert resp.headers["Location"] == "/?bff_error=access_denied"


@pytest.mark.parametrize(
    "return_to",
    [
        "https://evil.example",
        "//evil.example",
        "/%5Cevil.example",  # /\evil
        "%5C%5Cevil.example",  # \\evil
        "/%252F%252Fevil.example",  # /%2F%2Fevil
        "%252F%252Fevil.example",  # %2F%2Fevil
        "/%255Cevil.example",  # /%5Cevil
        "javascript:alert(1)",
        "/%09/evil.example",  # a tab
        "/%0D%0A/evil.example",
        "http:/evil.example",
    ],
)
async def test_return_to_another_origin_is_refused_at_login(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis, return_to: str
) -> None:
    # Sent exactly as written (already percent-encoded): the server decodes it once.
    resp, body = await browser.get(URL(f"{bff.url}/bff/login?returnTo={return_to}", encoded=True))
    assert resp.status == 400, body
    assert json.loads(body)["error"] == "invalid_return_to"
    assert set_cookie_attrs(resp, TX_COOKIE) is None


# -------------------------------------------------------------------------------------------------
# 3. Bad cookies: 401, never 500


async def test_tampered_truncated_foreign_empty_huge_or_non_ascii_cookies_get_401(
    bff: Bff, browser: Browser
) -> None:
    await full_login(browser, bff)
    good = browser.cookie(bff)
    assert good is not None
    value, _, sig = good.rpartition(".")
    foreign = Keyring(["a-key-from-another-deployment-" + "z" * 20])
    bad = {
        "tampered value": ("B" if value[0] == "A" else "A") + value[1:] + "." + sig,
        "tampered signature": value + "." + sig[:-2] + ("B" if sig[-2] == "A" else "A") + sig[-1],
        "truncated": good[: len(good) // 2],
        "foreign key, same secret": foreign.sign(value),
        "foreign key, new secret": foreign.sign(new_secret()),
        "empty": "",
        "huge": "A" * 6000,
    }
    assert (await user_status(bff, good))[0] == 200
    for label, cookie in bad.items():
        status, body = await user_status(bff, cookie)
        assert status == 401, (label, body)
        assert body["error"] == "login_required"

    # Non-ASCII cannot go through aiohttp's client headers reliably: write the request by hand.
    for cookie in (good + "\u20ac", "\u00e9" + good, "\u2603"):
        reader, writer = await asyncio.open_connection("127.0.0.1", bff.port)
        writer.write(
            (
                f"GET /bff/user HTTP/1.1\r\nHost: 127.0.0.1:{bff.port}\r\nX-CSRF: 1\r\n"
                f"Cookie: {COOKIE}={cookie}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
    assert (await user_status(bff, good))[0] == 200


# -------------------------------------------------------------------------------------------------
# 4. Tokens at rest; key rotation


def _config_key_attempts(blob: bytes, aads: list[bytes]) -> int:
    """Try every way the config's keys could open the blob; count the successes."""
    opened = 0
    for key in (KEY_A, KEY_B):
        with contextlib.suppress(DecryptError):
            for aad in aads:
                with contextlib.suppress(DecryptError):
                    Keyring([key]).decrypt(blob, aad)
                    opened += 1
        candidates = [hashlib.sha256(key.encode()).digest()]
        for info in (b"bff/server/aead", b"bff/session/aead", b"bff/tx/aead", b""):
            candidates.append(
                HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
                    key.encode()
                )
            )
        for aes_key in candidates:
            for offset in (0, 1, 5):
                nonce, ciphertext = blob[offset : offset + 12], blob[offset + 12 :]
                for aad in [*aads, b"\x00"]:
                    with contextlib.suppress(InvalidTag, ValueError):
                        AESGCM(aes_key).decrypt(nonce, ciphertext, aad)
                        opened += 1
    return opened


async def test_the_stored_session_holds_no_token_and_the_config_keys_cannot_open_it(
    bff: Bff, browser: Browser, raw_redis: aioredis.Redis
) -> None:
    await full_login(browser, bff)
    cookie = browser.cookie(bff)
    assert cookie is not None
    key, blob, data = await session_of_cookie(raw_redis, cookie, [KEY_A])

    # The store key is a hash: neither the cookie nor its secret appear in any key or value.
    secret = Keyring([KEY_A]).unsign(cookie)
    assert secret is not None
    every_key = [k async for k in raw_redis.scan_iter(match="*")]
    for k in every_key:
        assert secret.encode() not in k and cookie.encode() not in k
    for token in (data.access_token, data.refresh_token, data.id_token):
        assert token is not None
        for form in encodings(token):
            assert form.encode() not in blob
    assert b"alice" not in blob and b"example.com" not in blob  # claims are sealed too

    aads = [b"", key, key.split(b":")[1].strip(b"{}")]
    assert _config_key_attempts(blob, aads) == 0
    # The control: the same attempts do open what the config's keys did seal.
    assert _config_key_attempts(Keyring([KEY_A]).encrypt(b"x", key), aads) > 0
    # The control: the same blob opens with the cookie's secret.
    assert read_session(cookie, blob, [KEY_A]).access_token == data.access_token


async def test_a_cookie_survives_key_rotation_and_dies_when_its_key_is_removed(
    bff: Bff, browser: Browser, oidc_op: OidcProvider, redis_server: RedisServer
) -> None:
    await full_login(browser, bff)
    cookie_a = browser.cookie(bff)
    assert cookie_a is not None
    assert (await user_status(bff, cookie_a))[0] == 200

    await bff.stop()
    await bff.start(oidc_op, redis_server, [KEY_B, KEY_A])  # rotate: B signs, A still verifies
    status, body = await user_status(bff, cookie_a)
    assert status == 200 and body["sub"] == "alice"
    async with browser_for(bff) as fresh:
        await full_login(fresh, bff, "bob")
        cookie_b = fresh.cookie(bff)
    assert cookie_b is not None
    assert Keyring([KEY_B]).unsign(cookie_b) is not None  # new cookies are signed with B
    assert Keyring([KEY_A]).unsign(cookie_b) is None

    await bff.stop()
    await bff.start(oidc_op, redis_server, [KEY_B])  # A retired
    assert (await user_status(bff, cookie_a))[0] == 401
    assert (await user_status(bff, cookie_b))[0] == 200


# -------------------------------------------------------------------------------------------------
# 5 & 6. Processes: a Redis outage, the CLI, an OP that is down at start


@contextlib.asynccontextmanager
async def bff_process(config_text: str, port: int, tmp_path: Path) -> AsyncIterator[BffProcess]:
    """``bff run`` on ``config_text``, up once ``/healthz`` answers (the OP may be down)."""
    config = tmp_path / f"bff-{port}.yaml"
    config.write_text(config_text)
    proc = BffProcess(config, port=port, wait_ready=False)
    await asyncio.to_thread(proc.start)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.terminate)
        proc.close()


async def get_json(url: str, **kw: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False, **kw) as resp:
        body = await resp.read()
        data = json.loads(body) if resp.content_type == "application/json" else {}
        return resp.status, dict(resp.headers), data


async def test_a_redis_outage_gives_503_and_bff_recovers_without_a_restart(
    oidc_op: OidcProvider, redis_server: RedisServer, ensure_running: None, tmp_path: Path
) -> None:
    port = free_port()
    client = await oidc_op.register_client([f"http://127.0.0.1:{port}/bff/callback"])
    text = config_yaml(port, oidc_op.issuer, client, redis_server.url, [KEY_A])
    async with bff_process(text, port, tmp_path) as proc:
        bff = Bff(port, client)
        async with browser_for(bff) as browser:
            await full_login(browser, bff)
            cookie = browser.cookie(bff)
        assert cookie is not None
        assert (await user_status(bff, cookie))[0] == 200
        async with aioredis.from_url(redis_server.url) as r:
            key, blob, _ = await session_of_cookie(r, cookie, [KEY_A])
            ttl_ms = await r.pttl(key)
        pid = proc.pid

        redis_server.stop()
        await asyncio.sleep(1.2)  # past session.cache_ttl: the store must really be asked
        for _ in range(3):
            status, headers, body = await get_json(
                f"{proc.url}/bff/user", headers={**CSRF, "Cookie": f"{COOKIE}={cookie}"}
            )
            assert status == 503, body
            assert body["error"] == "store_unavailable"
            assert int(headers["Retry-After"]) > 0
        status, headers, body = await get_json(f"{proc.url}/bff/login")
        assert status == 503 and body["error"] == "store_unavailable"
        assert "Retry-After" in headers
        assert proc.is_running()
        assert (await get_json(f"{proc.url}/healthz"))[0] == 200

        redis_server.start()  # same port, empty: put the session back as it was
        async with aioredis.from_url(redis_server.url) as r:
            await r.set(key, blob, px=ttl_ms)
        status, _, body = await get_json(
            f"{proc.url}/bff/user", headers={**CSRF, "Cookie": f"{COOKIE}={cookie}"}
        )
        assert status == 200 and body["sub"] == "alice"
        status, _, _ = await get_json(f"{proc.url}/bff/login")
        assert status == 302
        assert proc.is_running() and proc.pid == pid


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bff", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_config_reports_every_problem_with_its_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "public_url: http://127.0.0.1:8080\n"  # 1
        "oidc:\n"  # 2: client_id missing
        "  issuer: http://127.0.0.1:9\n"  # 3
        "  client_secret: abc\n"  # 4
        "  scops: [openid]\n"  # 5: typo
        "sesion:\n"  # 6: typo
        "  store: memory://\n"  # 7
        "listen: {port: notaport}\n"  # 8: wrong type
        "keys: [short]\n"  # 9: too short
    )
    result = run_cli("check-config", str(bad))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    expected = {
        2: "oidc.client_id",
        5: "oidc.scops",
        6: "sesion",
        8: "listen.port",
        9: "keys[0]",
    }
    assert len(lines) == len(expected), lines
    for line_no, key in expected.items():
        assert any(line.startswith(f"{bad}:{line_no}: {key}:") for line in lines), (key, lines)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("public_url: [unclosed\noidc: {\n", ":2: invalid YAML"),
        ("public_url: http://127.0.0.1:8080\n\tkeys: []\n", "invalid YAML"),
        ("", "the config is empty"),
    ],
)
def test_check_config_refuses_broken_yaml_without_a_traceback(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr, result.stderr


def test_check_config_of_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "nope.yaml" in result.stderr


def test_check_config_reports_an_unreachable_issuer_and_accepts_a_reachable_one(
    tmp_path: Path, oidc_op: OidcProvider
) -> None:
    client = {"client_id": "c", "client_secret": "s"}
    dead = tmp_path / "dead.yaml"
    dead_issuer = f"http://127.0.0.1:{free_port()}"
    dead.write_text(config_yaml(8080, dead_issuer, client, "memory://", [KEY_A]))
    result = run_cli("check-config", str(dead))
    assert result.returncode != 0
    assert f"oidc.issuer {dead_issuer} is unreachable" in result.stderr
    assert "Traceback" not in result.stderr

    live = tmp_path / "live.yaml"
    live.write_text(config_yaml(8080, oidc_op.issuer, client, "memory://", [KEY_A]))
    result = run_cli("check-config", str(live))
    assert result.returncode == 0, result.stderr
    assert "discovery OK" in result.stdout


async def test_an_issuer_down_at_start_gives_503_at_login_until_it_comes_up(
    tmp_path: Path, redis_server: RedisServer, ensure_running: None
) -> None:
    port, op_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{op_port}"
    client = {"client_id": "late-client", "client_secret": "s"}
    text = config_yaml(port, issuer, client, redis_server.url, [KEY_A])
    async with bff_process(text, port, tmp_path) as proc:
        assert (await get_json(f"{proc.url}/healthz"))[0] == 200
        status, headers, body = await get_json(f"{proc.url}/bff/login")
        assert status == 503 and body["error"] == "provider_unavailable"
        assert "Retry-After" in headers

        # PAR off: "late-client" is registered nowhere, and a pushed request would be refused.
        with OidcProvider(port=op_port, par="off") as late:
            assert late.issuer == issuer
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                status, headers, body = await get_json(f"{proc.url}/bff/login")
                if status != 503:
                    break
                await asyncio.sleep(0.25)
            assert status == 302, body
            assert headers["Location"].startswith(f"{issuer}/auth?")
            assert proc.is_running()
