"""The integration harness itself: real redis-server and the real test OP behave as documented."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlencode, urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support.procs import (
    OidcProvider,
    RedisServer,
    browser_session,
    free_port,
    op_login,
    op_logout,
)

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


# -------------------------------------------------------------------------------------------------
# helpers


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def basic_auth(client: dict[str, Any]) -> dict[str, str]:
    """client_secret_basic header (RFC 6749 2.3.1: form-encode, then base64)."""
    pair = f"{quote_plus(client['client_id'])}:{quote_plus(client['client_secret'])}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}


def callback_uri() -> str:
    # Nothing listens there: op_login returns the redirect without following it.
    return f"http://127.0.0.1:{free_port()}/bff/callback"


async def register_web_client(op: OidcProvider, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("redirect_uris", [callback_uri()])
    return await op.register_client(**kwargs)


async def token_request(
    op: OidcProvider, client: dict[str, Any], **form: str
) -> tuple[int, dict[str, Any]]:
    """POST to the token endpoint with client_secret_basic."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{op.issuer}/token", data=form, headers=basic_auth(client)) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def introspect(op: OidcProvider, client: dict[str, Any], token: str) -> dict[str, Any]:
    form = {"token": token}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{op.issuer}/token/introspection", data=form, headers=basic_auth(client)
        ) as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


def authorize_url(op: OidcProvider, client: dict[str, Any], **params: str) -> str:
    return f"{op.issuer}/auth?{urlencode({'client_id': client['client_id'], **params})}"


async def login(
    op: OidcProvider,
    http: aiohttp.ClientSession,
    client: dict[str, Any],
    username: str = "alice",
    scope: str = "openid profile email api:read",
    **extra: str,
) -> dict[str, Any]:
    """Full code flow with PKCE through op_login; returns the token response."""
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    url = authorize_url(
        op,
        client,
        response_type="code",
        redirect_uri=client["redirect_uris"][0],
        scope=scope,
        state=state,
        nonce=nonce,
        code_challenge=challenge,
        code_challenge_method="S256",
        **extra,
    )
    location = await op_login(http, url, username)
    assert location.startswith(client["redirect_uris"][0] + "?")
    params = query(location)
    assert params["state"] == state
    assert params["iss"] == op.issuer  # RFC 9207, sent by default
    status, tokens = await token_request(
        op,
        client,
        grant_type="authorization_code",
        code=params["code"],
        redirect_uri=client["redirect_uris"][0],
        code_verifier=verifier,
    )
    assert status == 200, tokens
    tokens["_nonce"] = nonce
    return tokens


async def verified_id_token(op: OidcProvider, id_token: str) -> jwt.Token:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{op.issuer}/jwks") as resp,
    ):
        keys = KeySet.import_key_set(await resp.json())
    return jwt.decode(id_token, keys, algorithms=["RS256", "ES256"])


def delta(before: dict[str, Any], after: dict[str, Any], *path: str) -> int:
    """How much the stats counter at ``path`` grew."""
    old: Any = before
    new: Any = after
    for key in path:
        old, new = old[key], new[key]
    return int(new) - int(old)


# -------------------------------------------------------------------------------------------------
# redis-server


async def test_redis_stops_and_restarts_empty_on_the_same_port(
    redis_server: RedisServer, ensure_running: None
) -> None:
    port, url = redis_server.port, redis_server.url
    # redis-py does not retry by default: the first command on a connection that the restart
    # killed raises ConnectionError("Connection closed by server"). One retry hides that.
    client = aioredis.from_url(
        url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError]
    )
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"

        redis_server.stop()
        assert not redis_server.ping()
        with pytest.raises(RedisConnectionError):
            await client.ping()

        redis_server.start()
        assert (redis_server.port, redis_server.url) == (port, url)
        assert await client.ping()  # the same client reconnects
        assert await client.get("k") is None  # no persistence

        await client.set("k", "v")
        redis_server.restart()
        assert redis_server.port == port
        assert await client.get("k") is None
    finally:
        await client.aclose()


# -------------------------------------------------------------------------------------------------
# OP: discovery, registration


async def test_discovery_document_has_the_endpoints_bff_needs(oidc_op: OidcProvider) -> None:
    doc = await oidc_op.discovery()
    issuer = oidc_op.issuer
    assert doc["issuer"] == issuer
    assert doc["authorization_endpoint"] == f"{issuer}/auth"
    assert doc["token_endpoint"] == f"{issuer}/token"
    assert doc["jwks_uri"] == f"{issuer}/jwks"
    assert doc["revocation_endpoint"] == f"{issuer}/token/revocation"
    assert doc["end_session_endpoint"] == f"{issuer}/session/end"
    assert doc["registration_endpoint"] == f"{issuer}/reg"
    assert doc["userinfo_endpoint"] == f"{issuer}/me"
    assert doc["introspection_endpoint"] == f"{issuer}/token/introspection"
    assert doc["backchannel_logout_supported"] is True
    assert doc["backchannel_logout_session_supported"] is True
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert set(doc["id_token_signing_alg_values_supported"]) == {"RS256", "ES256"}
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        doc["token_endpoint_auth_methods_supported"]
    )
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        doc["grant_types_supported"]
    )
    assert {"openid", "profile", "email", "offline_access", "api:read", "api:write"} <= set(
        doc["scopes_supported"]
    )


async def test_a_client_can_be_registered(oidc_op: OidcProvider) -> None:
    redirect = callback_uri()
    client = await oidc_op.register_client(
        [redirect],
        post_logout_redirect_uris=["http://127.0.0.1:1/"],
        backchannel_logout_uri="http://127.0.0.1:1/bff/backchannel-logout",
    )
    assert client["client_id"] and client["client_secret"]
    assert client["redirect_uris"] == [redirect]
    assert client["token_endpoint_auth_method"] == "client_secret_basic"
    assert client["grant_types"] == ["authorization_code", "refresh_token"]
    assert client["backchannel_logout_session_required"] is True


# -------------------------------------------------------------------------------------------------
# OP: code flow


async def test_login_with_pkce_gives_access_refresh_and_id_tokens(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    tokens = await login(oidc_op, browser_http, client, "alice")

    assert tokens["token_type"] == "Bearer"
    assert tokens["access_token"] and tokens["refresh_token"]
    assert 0 < tokens["expires_in"] <= 5  # OP_ACCESS_TTL of the session fixture
    assert set(tokens["scope"].split()) == {"openid", "profile", "email", "api:read"}

    id_token = await verified_id_token(oidc_op, tokens["id_token"])
    assert id_token.header["alg"] == "RS256"
    claims = id_token.claims
    assert claims["iss"] == oidc_op.issuer
    assert claims["aud"] == client["client_id"]
    assert claims["sub"] == "alice"
    assert claims["nonce"] == tokens["_nonce"]
    assert claims["name"] == "Test User alice"
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert "sid" not in claims  # only for clients with a backchannel_logout_uri
    assert claims["exp"] > time.time()

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{oidc_op.issuer}/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        ) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["sub"] == "alice"


async def test_an_existing_op_session_logs_in_without_a_form(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    await login(oidc_op, browser_http, client, "alice")
    before = await oidc_op.stats()
    # op_login would fail on a login form for "bob": the OP session of "alice" is reused silently
    tokens = await login(oidc_op, browser_http, client, "bob")
    claims = (await verified_id_token(oidc_op, tokens["id_token"])).claims
    assert claims["sub"] == "alice"
    assert delta(before, await oidc_op.stats(), "authorizations") == 1

    tokens = await login(oidc_op, browser_http, client, "bob", prompt="login")
    claims = (await verified_id_token(oidc_op, tokens["id_token"])).claims
    assert claims["sub"] == "bob"


async def test_prompt_consent_shows_a_consent_form_and_grants_offline_access(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    tokens = await login(
        oidc_op, browser_http, client, scope="openid offline_access orders:read", prompt="consent"
    )
    assert set(tokens["scope"].split()) == {"openid", "offline_access", "orders:read"}
    # without prompt=consent oidc-provider silently drops offline_access
    tokens = await login(oidc_op, browser_http, client, scope="openid offline_access")
    assert tokens["scope"] == "openid"
    assert tokens["refresh_token"]  # issued anyway by this OP's configuration


async def test_authorization_request_without_code_challenge_is_refused(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    redirect = client["redirect_uris"][0]
    common = {"response_type": "code", "redirect_uri": redirect, "scope": "openid", "state": "s1"}

    async with browser_http.get(
        authorize_url(oidc_op, client, **common), allow_redirects=False
    ) as r:
        assert r.status == 303
        location = r.headers["Location"]
    assert location.startswith(redirect + "?")
    params = query(location)
    assert params["error"] == "invalid_request"
    assert "PKCE" in params["error_description"]
    assert params["state"] == "s1"
    assert params["iss"] == oidc_op.issuer

    plain = {**common, "code_challenge": "x" * 43, "code_challenge_method": "plain"}
    async with browser_http.get(
        authorize_url(oidc_op, client, **plain), allow_redirects=False
    ) as r:
        assert query(r.headers["Location"])["error"] == "invalid_request"


async def test_a_code_cannot_be_exchanged_with_a_wrong_verifier(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    _, challenge = pkce_pair()
    url = authorize_url(
        oidc_op,
        client,
        response_type="code",
        redirect_uri=client["redirect_uris"][0],
        scope="openid",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    code = query(await op_login(browser_http, url, "alice"))["code"]
    status, body = await token_request(
        oidc_op,
        client,
        grant_type="authorization_code",
        code=code,
        redirect_uri=client["redirect_uris"][0],
        code_verifier=pkce_pair()[0],
    )
    assert (status, body["error"]) == (400, "invalid_grant")


# -------------------------------------------------------------------------------------------------
# OP: refresh


async def test_refresh_rotates_and_reuse_of_a_rotated_token_revokes_the_grant(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    tokens = await login(oidc_op, browser_http, client)
    first = tokens["refresh_token"]
    before = await oidc_op.stats()

    status, refreshed = await token_request(
        oidc_op, client, grant_type="refresh_token", refresh_token=first
    )
    assert status == 200, refreshed
    second = refreshed["refresh_token"]
    assert second != first
    assert refreshed["access_token"] != tokens["access_token"]
    assert refreshed["id_token"]
    assert set(refreshed["scope"].split()) == {"openid", "profile", "email", "api:read"}
    assert (await introspect(oidc_op, client, refreshed["access_token"]))["active"] is True

    status, body = await token_request(
        oidc_op, client, grant_type="refresh_token", refresh_token=first
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert body["error_description"] == "grant request is invalid"

    # the reuse revoked the whole grant: the rotated token and its access token are dead too
    status, body = await token_request(
        oidc_op, client, grant_type="refresh_token", refresh_token=second
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await introspect(oidc_op, client, refreshed["access_token"]))["active"] is False

    after = await oidc_op.stats()
    assert delta(before, after, "token", "refresh_token") == 3
    assert delta(before, after, "token_errors", "refresh_token") == 2
    assert delta(before, after, "token", "authorization_code") == 0


async def test_stats_can_be_reset(oidc_op: OidcProvider) -> None:
    await oidc_op.reset_stats()
    stats = await oidc_op.stats()
    assert stats["token"] == {"authorization_code": 0, "refresh_token": 0, "client_credentials": 0}
    assert stats["revocations"] == stats["backchannel_logouts_sent"] == stats["end_sessions"] == 0


# -------------------------------------------------------------------------------------------------
# OP: client credentials and client authentication methods


async def test_client_credentials_with_client_secret_basic_and_post(oidc_op: OidcProvider) -> None:
    before = await oidc_op.stats()
    for method in ("client_secret_basic", "client_secret_post"):
        client = await oidc_op.register_client(
            grant_types=["client_credentials"], token_endpoint_auth_method=method
        )
        form = {"grant_type": "client_credentials", "scope": "api:read orders:read"}
        headers = {}
        if method == "client_secret_basic":
            headers = basic_auth(client)
        else:
            form |= {"client_id": client["client_id"], "client_secret": client["client_secret"]}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{oidc_op.issuer}/token", data=form, headers=headers) as resp,
        ):
            body = await resp.json()
        assert resp.status == 200, body
        assert body["token_type"] == "Bearer"
        assert body["scope"] == "api:read orders:read"
        assert 0 < body["expires_in"] <= 5
        assert "refresh_token" not in body
    assert delta(before, await oidc_op.stats(), "token", "client_credentials") == 2


async def test_client_credentials_with_private_key_jwt(oidc_op: OidcProvider) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "bff-test"})
    client = await oidc_op.register_client(
        grant_types=["client_credentials"],
        token_endpoint_auth_method="private_key_jwt",
        jwks={"keys": [key.as_dict(private=False)]},
    )
    assert "client_secret" not in client
    now = int(time.time())
    assertion = jwt.encode(
        {"alg": "RS256", "kid": "bff-test"},
        {
            "iss": client["client_id"],
            "sub": client["client_id"],
            "aud": oidc_op.issuer,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + 60,
        },
        key,
    )
    form = {
        "grant_type": "client_credentials",
        "scope": "api:write",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{oidc_op.issuer}/token", data=form) as resp,
    ):
        body = await resp.json()
    assert resp.status == 200, body
    assert body["scope"] == "api:write"


# -------------------------------------------------------------------------------------------------
# OP: logout


async def test_rp_initiated_logout_sends_back_channel_logout_and_revokes_the_grant(
    oidc_op: OidcProvider, aiohttp_server: AiohttpServer
) -> None:
    received: list[dict[str, str]] = []

    async def backchannel(request: web.Request) -> web.Response:
        received.append(dict(await request.post()))  # type: ignore[arg-type]
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/bff/backchannel-logout", backchannel)
    rp = await aiohttp_server(app)
    landing = f"http://127.0.0.1:{rp.port}/logged-out"
    client = await register_web_client(
        oidc_op,
        post_logout_redirect_uris=[landing],
        backchannel_logout_uri=f"http://127.0.0.1:{rp.port}/bff/backchannel-logout",
    )

    async with browser_session() as browser:
        tokens = await login(oidc_op, browser, client, "carol")
        id_claims = (await verified_id_token(oidc_op, tokens["id_token"])).claims
        before = await oidc_op.stats()

        end_session = f"{oidc_op.issuer}/session/end?" + urlencode(
            {
                "client_id": client["client_id"],
                "post_logout_redirect_uri": landing,
                "state": "st",
                "logout_hint": "carol",
            }
        )
        location = await op_logout(browser, end_session)

    assert location == f"{landing}?state=st"
    after = await oidc_op.stats()
    assert delta(before, after, "end_sessions") == 1
    assert delta(before, after, "backchannel_logouts_sent") == 1

    assert len(received) == 1
    logout = (await verified_id_token(oidc_op, received[0]["logout_token"])).claims
    assert logout["iss"] == oidc_op.issuer
    assert logout["aud"] == client["client_id"]
    assert logout["sub"] == "carol"
    assert logout["sid"] == id_claims["sid"]
    assert "http://schemas.openid.net/event/backchannel-logout" in logout["events"]
    assert "nonce" not in logout

    status, body = await token_request(
        oidc_op, client, grant_type="refresh_token", refresh_token=tokens["refresh_token"]
    )
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_logout_without_post_logout_redirect_ends_on_the_op_page(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    await login(oidc_op, browser_http, client)
    location = await op_logout(browser_http, f"{oidc_op.issuer}/session/end")
    assert location == f"{oidc_op.issuer}/session/end/success"


async def test_revocation_of_a_refresh_token_is_counted(
    oidc_op: OidcProvider, browser_http: aiohttp.ClientSession
) -> None:
    client = await register_web_client(oidc_op)
    tokens = await login(oidc_op, browser_http, client)
    before = await oidc_op.stats()
    form = {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{oidc_op.issuer}/token/revocation", data=form, headers=basic_auth(client)
        ) as resp,
    ):
        assert resp.status == 200
    after = await oidc_op.stats()
    assert delta(before, after, "revocations") == 1
    assert delta(before, after, "revoked", "RefreshToken") == 1
    assert (await introspect(oidc_op, client, tokens["access_token"]))["active"] is False


# -------------------------------------------------------------------------------------------------
# OP process


async def test_op_restart_keeps_the_port_and_static_clients_but_loses_all_other_state() -> None:
    static = {
        "client_id": "static-bff",
        "client_secret": "static-secret",
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "response_types": [],
    }
    with OidcProvider(clients=[static]) as op:
        dynamic = await op.register_client(grant_types=["client_credentials"])
        assert (await token_request(op, dynamic, grant_type="client_credentials"))[0] == 200
        port = op.port

        op.restart()

        assert op.port == port
        assert (await op.discovery())["issuer"] == op.issuer
        status, body = await token_request(op, dynamic, grant_type="client_credentials")
        assert (status, body["error"]) == (401, "invalid_client")
        assert (await token_request(op, static, grant_type="client_credentials"))[0] == 200
