"""POST /bff/backchannel-logout (Back-Channel Logout 1.0), without sockets.

Sessions live in one fakeredis server shared by two session managers, like two instances.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import fakeredis
import pytest
from fakeredis import aioredis as fake_aioredis
from test_logout_support import (
    FakeOp,
    attacker_key,
    build_services,
    call,
    json_body,
    logout_token,
    session_data,
)

from bff.endpoints import backchannel
from bff.errors import StoreUnavailable
from bff.services import Services
from bff.sessions import Session, SessionManager, _index_key
from bff.store.memory import MemoryStore
from bff.store.redis import RedisStore

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def instances(
    fake_redis_server: fakeredis.FakeServer,
) -> AsyncIterator[tuple[Services, Services]]:
    op = FakeOp()
    stores = [RedisStore(fake_aioredis.FakeRedis(server=fake_redis_server)) for _ in range(2)]
    yield build_services(stores[0], op), build_services(stores[1], op)
    for store in stores:
        await store.close()


@pytest.fixture
def services(instances: tuple[Services, Services]) -> Services:
    return instances[0]


async def post(services: Services, body: bytes, headers: dict[str, str] | None = None) -> int:
    response = await call(
        backchannel.handle,
        services,
        "POST",
        "/bff/backchannel-logout",
        headers={**FORM, **(headers or {})},
        body=body,
    )
    if response.status != 200:
        assert response.status == 400, response.body
        assert json_body(response)["error"] == "invalid_request"
    assert response.headers["Cache-Control"] == "no-store"
    return response.status


def form(token: str) -> bytes:
    return urlencode({"logout_token": token}).encode()


async def alive(services: Services, *sessions: Session) -> list[bool]:
    return [await services.sessions.load(s.secret, fresh=True) is not None for s in sessions]


async def test_a_valid_logout_token_with_sid_ends_that_op_sessions_sessions_on_every_instance(
    instances: tuple[Services, Services],
) -> None:
    first, second = instances
    now = time.time()
    here = await first.sessions.create(session_data(now, sid="op-sid-1"))
    there = await second.sessions.create(session_data(now, sid="op-sid-1"))
    other_op_session = await second.sessions.create(session_data(now, sid="op-sid-2"))

    assert await post(first, form(logout_token({"sid": "op-sid-1", "sub": "alice"}))) == 200

    assert await alive(second, here, there, other_op_session) == [False, False, True]
    assert first.metrics.value("bff_logouts_total", cause="backchannel") == 2


async def test_a_logout_token_with_only_sub_ends_all_the_subjects_sessions(
    services: Services,
) -> None:
    now = time.time()
    a = await services.sessions.create(session_data(now, sid="op-sid-1"))
    b = await services.sessions.create(session_data(now, sid="op-sid-2"))
    bob = await services.sessions.create(session_data(now, sub="bob", sid="op-sid-3"))

    assert await post(services, form(logout_token(drop=("sid",)))) == 200

    assert await alive(services, a, b, bob) == [False, False, True]


async def test_a_logout_token_with_sid_and_sub_does_not_end_another_subjects_session(
    services: Services,
) -> None:
    now = time.time()
    bobs = await services.sessions.create(session_data(now, sub="bob", sid="op-sid-1"))
    assert await post(services, form(logout_token({"sid": "op-sid-1", "sub": "alice"}))) == 200
    assert await alive(services, bobs) == [True]


async def test_a_logout_token_for_no_known_session_is_acknowledged(services: Services) -> None:
    assert await post(services, form(logout_token({"sid": "nobody"}))) == 200


@pytest.mark.parametrize(
    ("case", "token"),
    [
        ("bad signature", lambda: logout_token(key=attacker_key())),
        ("wrong aud", lambda: logout_token({"aud": "another-client"})),
        ("extra aud", lambda: logout_token({"aud": ["bff-client", "another-client"]})),
        ("wrong iss", lambda: logout_token({"iss": "https://evil.example"})),
        ("nonce present", lambda: logout_token({"nonce": "n-0S6_WzA2Mj"})),
        ("events missing", lambda: logout_token(drop=("events",))),
        ("wrong event", lambda: logout_token({"events": {"urn:other": {}}})),
        ("neither sid nor sub", lambda: logout_token(drop=("sid", "sub"))),
        ("no iat", lambda: logout_token(drop=("iat",))),
        ("iat in the future", lambda: logout_token({"iat": int(time.time()) + 3600})),
        ("expired", lambda: logout_token({"exp": int(time.time()) - 3600})),
        ("too old", lambda: logout_token({"iat": int(time.time()) - 3600}, drop=("exp",))),
        ("no jti", lambda: logout_token(drop=("jti",))),
        ("no exp", lambda: logout_token(drop=("exp",))),
        ("alg none", lambda: _unsigned()),
    ],
)
async def test_an_invalid_logout_token_is_refused_with_400_and_ends_nothing(
    services: Services, case: str, token: object
) -> None:
    session = await services.sessions.create(session_data(time.time()))
    assert callable(token)
    assert await post(services, form(token())) == 400, case
    assert await alive(services, session) == [True]


def _unsigned() -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iss": "https://op.example", "aud": "bff-client", "iat": int(time.time())}
    return f"{part({'alg': 'none'})}.{part({**claims, 'sub': 'alice', 'jti': 'x'})}."


async def test_a_replayed_logout_token_is_refused_on_any_instance(
    instances: tuple[Services, Services],
) -> None:
    first, second = instances
    token = logout_token()
    assert await post(first, form(token)) == 200
    session = await first.sessions.create(session_data(time.time()))

    assert await post(first, form(token)) == 400
    assert await post(second, form(token)) == 400
    assert await alive(first, session) == [True]


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"", {}),
        (b"logout_token=", {}),
        (b"logout_token=not-a-jwt", {}),
        (b"logout_token=a.b.c", {}),
        (b"logout_token=" + b"A" * 20_000 + b".b.c", {}),
        (b"x" * 200_000, {}),
        (b"\xff\xfe\x00garbage", {}),
        (b"logout_token=a.b.c&logout_token=d.e.f", {}),
        (b"&".join(b"f%d=1" % i for i in range(100)), {}),
        (b'{"logout_token": "a.b.c"}', {"Content-Type": "application/json"}),
        (b"logout_token=a.b.c", {"Content-Type": "text/plain"}),
        (b"logout_token=a.b.c", {"Content-Length": "10000000"}),
    ],
    ids=[
        "empty",
        "empty token",
        "not a jwt",
        "garbage jwt",
        "oversized jwt",
        "huge body",
        "binary",
        "two tokens",
        "many fields",
        "json",
        "text/plain",
        "lying length",
    ],
)
async def test_garbage_bodies_get_400_never_500(
    services: Services, body: bytes, headers: dict[str, str]
) -> None:
    assert await post(services, body, headers) == 400


async def test_a_valid_token_posted_as_json_is_refused(services: Services) -> None:
    session = await services.sessions.create(session_data(time.time()))
    body = json.dumps({"logout_token": logout_token()}).encode()
    assert await post(services, body, {"Content-Type": "application/json"}) == 400
    assert await alive(services, session) == [True]


async def test_the_sub_and_sid_index_entries_idle_out_with_their_session() -> None:
    now = [1_700_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    sessions = SessionManager(
        store, idle_timeout=60, absolute_timeout=3600, cache_ttl=0, clock=lambda: now[0]
    )
    session = await sessions.create(session_data(now[0], absolute=3600))
    for _ in range(3):  # used now and then: the entries slide with the session
        now[0] += 50
        assert await sessions.load(session.secret) is not None
    assert await store.index_members(_index_key("sub", "alice")) == [session.id]
    assert await store.index_members(_index_key("sid", "op-sid-1")) == [session.id]
    now[0] += 61  # idle: the session is gone, and so are its index entries
    assert await sessions.load(session.secret) is None
    assert await store.index_members(_index_key("sub", "alice")) == []
    assert await store.index_members(_index_key("sid", "op-sid-1")) == []


async def test_a_logout_that_failed_on_the_store_is_accepted_when_the_op_retries_it(
    services: Services,
) -> None:
    now = time.time()
    victim = await services.sessions.create(session_data(now, sid="op-sid-9"))
    token = logout_token({"sid": "op-sid-9", "sub": "alice"})
    real_end = services.sessions.end_op_session

    async def store_down(**_: object) -> int:
        raise StoreUnavailable()

    services.sessions.end_op_session = store_down  # type: ignore[method-assign]
    response = await call(
        backchannel.handle, services, "POST", "/bff/backchannel-logout", headers=FORM,
        body=form(token),
    )  # fmt: skip
    assert response.status == 503
    assert await alive(services, victim) == [True]

    services.sessions.end_op_session = real_end  # type: ignore[method-assign]
    assert await post(services, form(token)) == 200  # the OP's retry of the same token
    assert await alive(services, victim) == [False]
    assert await post(services, form(token)) == 400  # and now it is a replay


async def test_a_logout_token_with_deeply_nested_claims_gets_400_never_500(
    services: Services,
) -> None:
    """The unverified ``iss`` that picks the provider is read before any signature check: a
    payload nested deeper than the JSON parser recurses must be a 400, not a RecursionError."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    nested = b"[" * 5000 + b"]" * 5000
    token = f"{b64(json.dumps({'alg': 'RS256'}).encode())}.{b64(nested)}.{b64(b'sig')}"
    assert len(token) < 16_384  # under the cap: it reaches the parser
    assert await post(services, form(token)) == 400
