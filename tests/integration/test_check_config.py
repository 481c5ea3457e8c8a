"""``bff check-config`` catches what would fail at run time (issue 10, point 7).

Run as operators run it (a subprocess on a config file) against a real ``redis-server`` and the
real test OP, with each thing bff relies on taken away in turn: a Redis that is down, an OP that
advertises no end_session or back-channel logout, another client authentication method, no PKCE
S256; a missing SPA folder. Exit 0: bff will run (warnings may be printed); 1: a check failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.support.procs import OidcProvider, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
KEY = "k" * 43


def check_config(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bff", "check-config", str(path), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(
    tmp_path: Path,
    *,
    issuer: str,
    store: str,
    static: Path | None = None,
    auth_method: str = "client_secret_basic",
) -> Path:
    """A config for client ``c`` (the OP does not know it: discovery needs no client)."""
    if static is None:
        static = tmp_path / "static"
        static.mkdir(exist_ok=True)
        (static / "index.html").write_text("<!doctype html><title>spa</title>")
    config: dict[str, Any] = {
        "public_url": "http://127.0.0.1:8080",
        "static": str(static),
        "oidc": {
            "issuer": issuer,
            "client_id": "c",
            "client_secret": "s",
            "token_endpoint_auth_method": auth_method,
        },
        "session": {"store": store, "cookie": {"name": "bff-session", "secure": False}},
        "keys": [KEY],
        "workers": 1,
    }
    path = tmp_path / "bff.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


@pytest.fixture(scope="module")
def lean_op() -> Iterator[OidcProvider]:
    """An OP that advertises no end_session, no back-channel logout, no PKCE methods, and
    private_key_jwt as its only client authentication."""
    patch = {
        "end_session_endpoint": None,
        "backchannel_logout_supported": None,
        "code_challenge_methods_supported": None,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    }
    with OidcProvider(discovery_patch=patch) as op:
        yield op


def test_everything_in_place_is_exit_0_without_a_warning(
    tmp_path: Path, redis_server: RedisServer, oidc_op: OidcProvider
) -> None:
    result = check_config(write(tmp_path, issuer=oidc_op.issuer, store=redis_server.url))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert f"session.store {redis_server.url}: Redis 7." in out
    assert f"oidc.issuer {oidc_op.issuer}: discovery OK" in out
    assert f"oidc.issuer {oidc_op.issuer}: back-channel logout supported" in out
    assert f"static {tmp_path / 'static'}: index.html found" in out


def test_a_redis_that_is_down_is_an_error(tmp_path: Path, oidc_op: OidcProvider) -> None:
    store = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    result = check_config(write(tmp_path, issuer=oidc_op.issuer, store=store))
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"error: session.store {store} does not answer" in result.stderr
    assert "discovery OK" in result.stdout  # the other checks still ran


def test_the_store_password_is_never_printed(
    tmp_path: Path, redis_server: RedisServer, oidc_op: OidcProvider
) -> None:
    # The test Redis knows no such ACL user: AUTH fails, and the error names the URL, redacted.
    store = f"redis://nobody:hunter2-secret@127.0.0.1:{redis_server.port}/0"
    result = check_config(write(tmp_path, issuer=oidc_op.issuer, store=store))
    assert_no_traceback(result)
    assert result.returncode == 1
    assert "hunter2" not in result.stdout + result.stderr
    assert "error: session.store redis://nobody:**********@127.0.0.1" in result.stderr


async def test_a_redis_user_without_info_is_a_warning(
    tmp_path: Path, redis_server: RedisServer, oidc_op: OidcProvider
) -> None:
    """An ACL user may lack INFO: the store answers, but its version cannot be told."""
    async with aioredis.from_url(redis_server.url) as admin:
        await admin.execute_command(
            "ACL", "SETUSER", "noinfo", "on", ">pw-1", "~*", "+@all", "-info"
        )
    try:
        store = f"redis://noinfo:pw-1@127.0.0.1:{redis_server.port}/0"
        result = await asyncio.to_thread(
            check_config, write(tmp_path, issuer=oidc_op.issuer, store=store)
        )
    finally:
        async with aioredis.from_url(redis_server.url) as admin:
            await admin.execute_command("ACL", "DELUSER", "noinfo")
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "answers but refuses INFO" in result.stderr and "pw-1" not in result.stderr


def test_an_op_down_is_an_error(tmp_path: Path, redis_server: RedisServer) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"
    result = check_config(write(tmp_path, issuer=issuer, store=redis_server.url))
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"error: oidc.issuer {issuer} is unreachable" in result.stderr
    assert "Redis 7." in result.stdout


def test_an_op_that_offers_less_than_the_config_relies_on(
    tmp_path: Path, redis_server: RedisServer, lean_op: OidcProvider
) -> None:
    result = check_config(write(tmp_path, issuer=lean_op.issuer, store=redis_server.url))
    assert_no_traceback(result)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: oidc.issuer {lean_op.issuer}: oidc.token_endpoint_auth_method "
        "client_secret_basic is not among its token_endpoint_auth_methods_supported "
        "(private_key_jwt): every login would fail at the token endpoint"
    ]
    warnings = result.stderr
    assert "no end_session_endpoint: logout ends the bff session only" in warnings
    assert "back-channel logout not supported" in warnings
    assert "code_challenge_methods_supported is not advertised" in warnings


def test_the_auth_method_the_op_offers_passes(
    tmp_path: Path, redis_server: RedisServer, lean_op: OidcProvider
) -> None:
    key = tmp_path / "client.pem"
    key.write_text(
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    path = write(
        tmp_path, issuer=lean_op.issuer, store=redis_server.url, auth_method="private_key_jwt"
    )
    config = json.loads(path.read_text())
    del config["oidc"]["client_secret"]
    config["oidc"]["private_key_file"] = str(key)
    path.write_text(json.dumps(config))
    result = check_config(path)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
    assert "no end_session_endpoint" in result.stderr  # the warnings stay, exit 0


def test_an_op_without_pkce_s256_is_an_error(tmp_path: Path, redis_server: RedisServer) -> None:
    with OidcProvider(discovery_patch={"code_challenge_methods_supported": ["plain"]}) as op:
        result = check_config(write(tmp_path, issuer=op.issuer, store=redis_server.url))
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"error: oidc.issuer {op.issuer}: its discovery document is refused" in result.stderr
    assert "PKCE S256" in result.stderr


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "nowhere", "is not a directory: every page would answer 404"),
        (lambda d: d, "has no index.html"),  # a folder, but not the SPA's
    ],
)
def test_a_missing_spa_is_a_warning_and_offline_skips_it(
    tmp_path: Path,
    redis_server: RedisServer,
    oidc_op: OidcProvider,
    make: Any,
    problem: str,
) -> None:
    static = make(tmp_path / "spa")
    (tmp_path / "spa").mkdir()
    path = write(tmp_path, issuer=oidc_op.issuer, store=redis_server.url, static=static)
    result = check_config(path)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert f"warning: static {static} {problem}" in result.stderr

    offline = check_config(path, "--offline")
    assert offline.returncode == 0 and offline.stderr == ""
    assert "static" not in offline.stdout and "discovery" not in offline.stdout


def test_offline_asks_neither_the_store_nor_the_op(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    path = write(tmp_path, issuer=f"http://{dead}", store=f"redis://{dead}/0")
    result = check_config(path, "--offline")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: configuration is valid\n"
    assert check_config(path).returncode == 1  # online, both are down
