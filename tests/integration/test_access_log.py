"""Issue 10, point 5: one access-log line per request from a real ``bff run``, the request id
end to end, failed logins with their reason, and no secret in any access line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bff.keys import Keyring, SessionSecret, store_id
from bff.sessions import session_key
from tests.integration.test_proxy import KEY
from tests.support.bff_procs import (
    COOKIE_NAME,
    BffProcess,
    EchoUpstream,
    base_config,
    login,
    write_config,
)
from tests.support.procs import HOST, OidcProvider, RedisServer, free_port

CSRF = {"X-CSRF": "1"}
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"


async def _config(
    oidc_op: OidcProvider, redis_server: RedisServer, upstream: EchoUpstream, tmp: Path, fmt: str
) -> tuple[Path, int]:
    port = free_port()
    url = f"http://{HOST}:{port}"
    client = await oidc_op.register_client(redirect_uris=[f"{url}/bff/callback"])
    config = base_config(
        public_url=url,
        issuer=oidc_op.issuer,
        client=client,
        store=redis_server.url,
        keys=[KEY],
        static=tmp / "static",
        upstreams=[{"path": "/api", "url": f"{upstream.url}/up"}],
    )
    config["log"] = {"level": "info", "format": fmt}
    config["shutdown"] = {"drain": "0s", "grace": "5s"}  # terminate() below: no need to wait
    return write_config(tmp, config), port


def _lines(proc: BffProcess) -> list[str]:
    return (proc.workdir / "stderr.log").read_text(errors="replace").splitlines()


@pytest.fixture
def upstream() -> Any:
    with EchoUpstream() as echo:
        yield echo


async def test_access_lines_request_ids_and_no_secrets(
    redis_server: RedisServer, oidc_op: OidcProvider, upstream: EchoUpstream, tmp_path: Path
) -> None:
    path, port = await _config(oidc_op, redis_server, upstream, tmp_path, "json")
    with BffProcess(path, port=port) as proc:
        cookie = await login(proc.url, "access-user")
        headers = {**CSRF, "Cookie": f"{COOKIE_NAME}={cookie}"}
        given = {"good": "req-123.abc_Z", "bad": "bad id!", "jwt": JWT, "none": None}
        returned: dict[str, str] = {}
        async with aiohttp.ClientSession() as http:
            for name, rid in given.items():
                extra = {"X-Request-ID": rid} if rid is not None else {}
                async with http.get(
                    f"{proc.url}/api/orders/7?code=QUERYSECRET&n={name}",
                    headers={**headers, **extra},
                ) as resp:
                    assert resp.status == 200
                    returned[name] = resp.headers["X-Request-ID"]
            async with http.get(
                f"{proc.url}/bff/callback?code=CALLBACKCODE&state=nosuchstate",
                headers={"Accept": "application/json"},
            ) as resp:
                assert resp.status == 400
            async with http.get(f"{proc.url}/healthz") as resp:
                assert resp.status == 200
                health_rid = resp.headers["X-Request-ID"]
        proc.terminate()
        lines = _lines(proc)

    # Kept when well-formed; else replaced (a JWT is well-formed text but never kept).
    assert returned["good"] == "req-123.abc_Z"
    for name in ("bad", "jwt", "none"):
        assert re.fullmatch(r"[0-9a-f]{32}", returned[name]), returned
    assert len(set(returned.values())) == 4
    # The upstream got the same id, once.
    seen = {s.path.rsplit("=", 1)[1]: s for s in upstream.seen()}
    for name, rid in returned.items():
        assert seen[name].header("X-Request-ID") == [rid]

    records = [json.loads(line) for line in lines]  # every line is JSON: no raw warnings
    access = [r for r in records if r.get("logger") == "bff.access"]
    by_id = {r["request_id"]: r for r in access}
    secret = SessionSecret(Keyring([KEY]).unsign(cookie) or "")
    handle = by_id[returned["good"]]["session"]
    assert re.fullmatch(r"[0-9a-f]{12}", handle)
    for rid in returned.values():
        line = by_id[rid]
        assert line["method"] == "GET" and line["route"] == "/api" and line["status"] == 200
        assert line["upstream_status"] == 200 and line["upstream_ms"] >= 0
        assert line["duration_ms"] >= line["upstream_ms"]
        assert line["bytes"] > 0
        assert line["session"] == handle  # one session, one handle
        assert line["client"] == "127.0.0.1"
        assert line["event"] == "access" and line["level"] == "info"
    assert by_id[health_rid]["route"] == "/healthz"
    assert by_id[health_rid]["session"] == "-" and by_id[health_rid]["upstream_status"] is None
    callback = [r for r in access if r["route"] == "/bff/callback"]
    assert [c["status"] for c in callback] == [200, 400]  # the login's, then ours
    failed = [r for r in records if r.get("event") == "login.failed" and r["step"] == "callback"]
    assert len(failed) == 1 and failed[0]["reason"] and failed[0]["detail"]
    # No secret in any access line: not the cookie, its secret, the store id or key, the
    # query (the code), the JWT-shaped id the client sent.
    sid = store_id(secret)
    text = "\n".join(json.dumps(r) for r in access)
    for leaked in (cookie, secret, sid, session_key(sid), "QUERYSECRET", "CALLBACKCODE", JWT):
        assert leaked not in text


async def test_the_text_format_keeps_the_access_fields(
    redis_server: RedisServer, oidc_op: OidcProvider, upstream: EchoUpstream, tmp_path: Path
) -> None:
    path, port = await _config(oidc_op, redis_server, upstream, tmp_path, "text")
    with BffProcess(path, port=port) as proc:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{proc.url}/api/x", headers={**CSRF, "X-Request-ID": "text-1"}) as resp,
        ):
            assert resp.status == 401  # no session on a user route
        proc.terminate()
        lines = [
            line for line in _lines(proc) if " bff.access access " in line and "text-1" in line
        ]
    assert len(lines) == 1, lines
    for field in ("method=GET", "route=/api", "status=401", "request_id=text-1", "session=-"):
        assert f" {field}" in lines[0], lines[0]
