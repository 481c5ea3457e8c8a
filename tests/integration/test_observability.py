"""What operators see: logs that never carry a secret (invariant 9), health, readiness, metrics.

One real ``bff run`` process logs at debug level while a user logs in through the real OP, calls
an API, has the access token refreshed, and logs out. Every secret of that flow (the code, the
state, the cookie, the client secret, each access, refresh and ID token) is then searched for in
everything the process wrote.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    read_session,
    write_config,
)
from tests.support.procs import OidcProvider, RedisServer, browser_session, op_login

CSRF = {"X-CSRF": "1"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture(scope="module")
def keys() -> list[str]:
    return [secrets.token_urlsafe(32)]


@pytest.fixture(scope="module")
def bff(
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    upstream: EchoUpstream,
    keys: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BffProcess, dict[str, Any]]]:
    workdir = tmp_path_factory.mktemp("observability")
    config = workdir / "bff.yaml"
    proc = BffProcess(config)
    client: dict[str, Any] = asyncio.run(
        oidc_op.register_client(
            [f"{proc.url}/bff/callback"], post_logout_redirect_uris=[f"{proc.url}/"]
        )
    )
    settings = base_config(
        public_url=proc.url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=keys,
        static=workdir,
        upstreams=[{"path": "/api/echo", "url": upstream.url, "token": "user"}],
    )
    settings["log"] = {"level": "debug", "format": "json"}
    write_config(workdir, settings)
    with proc:
        yield proc, client


@pytest.fixture
async def browser(bff: tuple[BffProcess, dict[str, Any]]) -> AsyncIterator[aiohttp.ClientSession]:
    async with browser_session(bff[0].url) as http:
        yield http


def _session_cookie(http: aiohttp.ClientSession) -> str:
    return next(c.value for c in http.cookie_jar if c.key == COOKIE_NAME)


async def test_no_secret_of_a_whole_session_reaches_the_logs(
    bff: tuple[BffProcess, dict[str, Any]],
    browser: aiohttp.ClientSession,
    upstream: EchoUpstream,
    redis_server: RedisServer,
    keys: list[str],
) -> None:
    proc, client = bff
    url = proc.url
    secrets_seen: set[str] = {client["client_secret"]}

    async with browser.get(f"{url}/bff/login", allow_redirects=False) as resp:
        assert resp.status == 302
    callback = await op_login(browser, resp.headers["Location"], "logwatch")
    query = parse_qs(urlsplit(callback).query)
    secrets_seen.update(query["code"] + query["state"])
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 200
    cookie = _session_cookie(browser)
    secrets_seen.add(cookie)
    first = await read_session(redis_server.url, keys, cookie)
    assert first is not None and first.refresh_token and first.id_token
    secrets_seen.update({first.access_token, first.refresh_token, first.id_token})

    async with browser.get(f"{url}/api/echo/one", headers=CSRF) as resp:
        assert resp.status == 200
    # Past the OP's 5 s access-token lifetime (minus the 1 s skew): the next call refreshes.
    await asyncio.sleep(max(0.0, (first.access_expires_at or 0) - time.time()) + 0.2)
    async with browser.get(f"{url}/api/echo/two", headers=CSRF) as resp:
        assert resp.status == 200
    second = await read_session(redis_server.url, keys, cookie)
    assert second is not None and second.refresh_token
    assert second.access_token != first.access_token, "the access token was not refreshed"
    secrets_seen.update({second.access_token, second.refresh_token})
    secrets_seen.update(s.token for s in upstream.seen() if s.token)

    async with browser.get(f"{url}/bff/user", headers=CSRF) as resp:
        logout_url = (await resp.json())["logout_url"]
    async with browser.get(f"{url}{logout_url}", allow_redirects=False) as resp:
        assert resp.status == 302

    await asyncio.sleep(0.5)  # let the last lines reach the log file
    logs = "".join(p.read_text(errors="replace") for p in sorted(proc.workdir.glob("*.log")))
    lines = [line for line in logs.splitlines() if line.strip()]
    assert any('"session.created"' in line for line in lines), "the flow logged nothing"
    assert any('"session.refreshed"' in line for line in lines), "the refresh logged nothing"
    for line in lines:
        if line.startswith("{"):
            json.loads(line)  # structured: one JSON object per line
    for secret in secrets_seen:
        assert secret not in logs, f"a secret ({len(secret)} chars) reached the logs"


async def test_health_readiness_and_metrics_follow_the_store(
    bff: tuple[BffProcess, dict[str, Any]],
    redis_server: RedisServer,
    ensure_running: None,
) -> None:
    url = bff[0].url
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["checks"] == {"store": "ok", "provider": "ok"}
        async with http.get(f"{bff[0].metrics_url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "# TYPE bff_logins_total counter" in text
        assert 'bff_logins_total{outcome="ok"}' in text
        # Issue 9, point 6: not on the public listener by default, and no SPA page either.
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"

        redis_server.stop()
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            assert (await resp.json())["checks"]["store"] == "store_unavailable"
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200, "liveness must not depend on the store"

        redis_server.start()
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200, "readiness recovers without a restart"
