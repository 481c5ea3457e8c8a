"""Issue 12, point 4: pushed authorization requests (RFC 9126) against the real oidc-provider.

The OP here offers PAR (``OP_PAR=optional``, oidc-provider's default) or requires it
(``OP_PAR=required``); the suite's shared OP has it off. What the browser is given is read from
bff's redirect; ``par_requests`` in the OP's stats counts the pushed requests it accepted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from joserfc.jwk import ECKey
from test_logout_helpers import KEY, RunningBff, get_user, running_bff, static_dir

from bff.config import parse_settings
from tests.support.procs import OidcProvider, RedisServer, browser_session, free_port, op_login

ROOT = Path(__file__).resolve().parents[2]
REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"


@pytest.fixture(scope="module")
def op_par() -> Iterator[OidcProvider]:
    with OidcProvider(par="optional", cookie_prefix="par") as op:
        yield op


@pytest.fixture(scope="module")
def op_par_required() -> Iterator[OidcProvider]:
    with OidcProvider(par="required", cookie_prefix="parq") as op:
        yield op


def par_yaml(
    port: int, op: OidcProvider, client: dict[str, Any], redis_url: str, static: Path, **extra: str
) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    secret = (
        f"  client_secret: {json.dumps(client['client_secret'])}\n"
        if "client_secret" in client
        else ""
    )
    return f"""\
public_url: http://127.0.0.1:{port}
listen: {{host: 127.0.0.1, port: {port}}}
static: {static}
oidc:
  issuer: {op.issuer}
  client_id: {json.dumps(client["client_id"])}
{secret}  scopes: [openid, profile, email]
{lines}session:
  store: {redis_url}
keys: [{KEY}]
log: {{level: warning}}
"""


async def serve(
    op: OidcProvider, redis: RedisServer, tmp_path: Path, *, register: dict[str, Any] | None = None,
    **extra: str,
) -> AsyncIterator[RunningBff]:  # fmt: skip
    port = free_port()
    client = await op.register_client([f"http://127.0.0.1:{port}/bff/callback"], **(register or {}))
    text = par_yaml(port, op, client, redis.url, static_dir(tmp_path), **extra)
    async with running_bff(parse_settings(text)) as bff:
        yield bff


async def login_location(bff: RunningBff, http: aiohttp.ClientSession) -> tuple[int, str, Any]:
    async with http.get(f"{bff.url}/bff/login", allow_redirects=False) as resp:
        if resp.status == 302:
            return resp.status, resp.headers["Location"], None
        return resp.status, "", await resp.json()


def private_key_client(tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(registration metadata, bff settings) for private_key_jwt with a fresh EC key."""
    key = ECKey.generate_key("P-256", parameters={"kid": "par-key"}, private=True)
    key_file = tmp_path / "client.pem"
    key_file.write_bytes(key.as_pem(private=True))
    public = key.as_dict(private=False)
    register = {"token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [public]}}
    settings = {
        "private_key_file": str(key_file),
        "private_key_kid": "par-key",
        "token_endpoint_auth_method": "private_key_jwt",
    }
    return register, settings


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post", "private_key_jwt"])
async def test_the_browser_gets_only_client_id_and_request_uri_and_the_login_completes(
    op_par: OidcProvider, redis_server: RedisServer, tmp_path: Path, auth: str
) -> None:
    """PAR authenticates like the token endpoint, with each client authentication method."""
    register: dict[str, Any] = {"token_endpoint_auth_method": auth}
    extra: dict[str, str] = {"token_endpoint_auth_method": auth}
    if auth == "private_key_jwt":
        register, extra = private_key_client(tmp_path)
    await op_par.reset_stats()
    async for bff in serve(op_par, redis_server, tmp_path, register=register, **extra):
        async with browser_session(bff.url) as browser:
            status, location, body = await login_location(bff, browser)
            assert status == 302, body
            parts = urlsplit(location)
            query = parse_qs(parts.query)
            assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{op_par.issuer}/auth"
            assert set(query) == {"client_id", "request_uri"}
            assert query["request_uri"][0].startswith(REQUEST_URI_PREFIX)
            assert (await op_par.stats())["par_requests"] == 1
            callback = await op_login(browser, location, "par-alice")
            assert callback.startswith(f"{bff.url}/bff/callback?")
            async with browser.get(callback, allow_redirects=False) as resp:
                assert resp.status == 200, await resp.text()
            status, me = await get_user(bff.url, browser=browser)
            assert (status, me["sub"], me["idp"]) == (200, "par-alice", "default")


async def test_an_op_that_requires_par_is_honoured_and_refuses_a_plain_request(
    op_par_required: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    async for bff in serve(op_par_required, redis_server, tmp_path):
        async with browser_session(bff.url) as browser:
            status, location, body = await login_location(bff, browser)
            assert status == 302, body
            query = parse_qs(urlsplit(location).query)
            assert set(query) == {"client_id", "request_uri"}
            # The same request in the URL, as bff would send it with PAR off, is refused there.
            plain = (
                f"{op_par_required.issuer}/auth?client_id={query['client_id'][0]}"
                f"&response_type=code&scope=openid&redirect_uri={bff.url}/bff/callback"
                "&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
                "&code_challenge_method=S256&state=s&nonce=n"
            )
            async with browser.get(plain, allow_redirects=False) as resp:
                refused = resp.headers.get("Location", "") + await resp.text()
            assert "invalid_request" in refused and "code=" not in refused
            callback = await op_login(browser, location, "par-bob")
            async with browser.get(callback, allow_redirects=False) as resp:
                assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    ("which", "par", "reason"),
    [
        ("shared", "required", "par: required, but"),
        ("required", "off", "par: off, but"),
    ],
)
async def test_a_par_setting_the_op_cannot_honour_keeps_bff_unready_and_logins_503(
    oidc_op: OidcProvider,
    op_par_required: OidcProvider,
    redis_server: RedisServer,
    tmp_path: Path,
    which: str,
    par: str,
    reason: str,
) -> None:
    op = oidc_op if which == "shared" else op_par_required
    async for bff in serve(op, redis_server, tmp_path, par=par):
        async with aiohttp.ClientSession() as http:
            status, _, body = await login_location(bff, http)
            assert status == 503
            assert body["error"] == "provider_unavailable"
            assert reason in body["error_description"]
            async with http.get(f"{bff.url}/readyz") as resp:
                ready = await resp.json()
                assert resp.status == 503
            assert ready["checks"]["provider"] == "provider_refused"


def test_check_config_refuses_par_off_for_an_op_that_requires_it(
    op_par_required: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    client = {"client_id": "x", "client_secret": "unused"}
    text = par_yaml(
        free_port(), op_par_required, client, redis_server.url, static_dir(tmp_path), par="off"
    )
    config = tmp_path / "bff.yaml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "bff", "check-config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    subject = f"oidc.issuer {op_par_required.issuer}"
    assert f"{subject}: par: off, but {op_par_required.issuer} requires pushed" in out
    assert f"{subject} offers pushed authorization requests (PAR, RFC 9126): yes, required" in out
