"""Fixtures for integration tests: a real redis-server and the real test OpenID Provider.

Both are started once per test session on free loopback ports. A test may ``stop()`` or
``restart()`` them to inject faults, but must leave them running: ``restart()`` keeps the port,
and for the OP loses every registered client and token (see ``OidcProvider``).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# `pytest` (unlike `python -m pytest`) does not put the project root on sys.path, and neither
# does pyproject's pytest config; `tests.support` and `bff` are imported from it.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.procs import OidcProvider, RedisServer, browser_session  # noqa: E402

# Short enough that a test can wait for an access token to expire and see a refresh.
OP_ACCESS_TTL = 5


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


def _require(executable: str) -> None:
    if shutil.which(executable) is None:
        pytest.skip(f"{executable} not found on PATH")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    _require("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def oidc_op() -> Iterator[OidcProvider]:
    _require("node")
    # PAR off: these tests read the authorization request's parameters in the browser's URL,
    # which PAR (bff's default whenever the OP offers it) replaces by a request_uri. PAR has its
    # own OPs (``par_op``, test_par.py).
    with OidcProvider(access_ttl=OP_ACCESS_TTL, par="off") as op:
        yield op


@pytest.fixture
def ensure_running(redis_server: RedisServer, oidc_op: OidcProvider) -> Iterator[None]:
    """Restart whatever a fault-injecting test left stopped (same ports)."""
    yield
    redis_server.start()
    oidc_op.start()


@pytest.fixture
async def browser_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A fresh aiohttp session that keeps cookies like a browser on 127.0.0.1 (one user agent:
    its cookies are that user's OP session; see ``browser_session``)."""
    async with browser_session() as http:
        yield http
