"""GET /bff/logout and the session lifetimes /bff/user reports (issue 5), without sockets."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from aiohttp import web
from test_logout_support import (
    CLIENT_ID,
    ISSUER,
    PUBLIC_URL,
    FakeOp,
    build_services,
    call,
    cookie_header,
    json_body,
    session_data,
    set_cookies,
    settings,
)

from bff.endpoints import logout, user
from bff.services import Services
from bff.sessions import Session, session_key
from bff.store.memory import MemoryStore


@pytest.fixture
def op() -> FakeOp:
    return FakeOp()


@pytest.fixture
def store() -> MemoryStore:
    # The OIDC client and the handlers read real time; the store must agree with them.
    return MemoryStore(clock=time.time)


@pytest.fixture
def services(store: MemoryStore, op: FakeOp) -> Services:
    return build_services(store, op)


async def new_session(services: Services, **kwargs: object) -> Session:
    return await services.sessions.create(session_data(time.time(), **kwargs))  # type: ignore[arg-type]


def logout_path(session: Session) -> str:
    return f"/bff/logout?sid={quote(session.handle)}"


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def assert_no_token(response_text: str, session: Session) -> None:
    data = session.data
    for token in (data.access_token, data.refresh_token, data.id_token):
        assert token is not None and token not in response_text


def everything_sent(response: web.Response) -> str:
    body = response.body if isinstance(response.body, bytes) else b""
    return "\n".join(f"{k}: {v}" for k, v in response.headers.items()) + "\n" + body.decode()


async def test_logout_with_the_right_sid_ends_the_session_revokes_its_tokens_and_goes_to_the_op(
    services: Services, op: FakeOp, store: MemoryStore
) -> None:
    session = await new_session(services)
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(session),
        headers=cookie_header(services, session),
    )

    assert response.status == 302
    assert response.headers["Cache-Control"] == "no-store"
    location = response.headers["Location"]
    assert location.startswith(f"{ISSUER}/session/end?")
    assert query(location) == {
        "client_id": [CLIENT_ID],
        "post_logout_redirect_uri": [f"{PUBLIC_URL}/signed-out"],
        "logout_hint": ["op-sid-1"],
    }
    cookie = set_cookies(response)[services.cookies.name]
    assert cookie.value == "" and cookie["max-age"] == "0"
    assert await store.get(session_key(session.id)) is None
    assert await services.sessions.load(session.secret, fresh=True) is None
    assert await services.sessions.ids_for(sub="alice", sid="op-sid-1") == []
    assert sorted((r["token"], r["token_type_hint"]) for r in op.revocations) == sorted(
        [
            (session.data.refresh_token, "refresh_token"),
            (session.data.access_token, "access_token"),
        ]
    )
    assert_no_token(everything_sent(response), session)
    assert services.metrics.value("bff_logouts_total", cause="user") == 1


async def test_logout_hint_is_the_sub_when_the_id_token_carried_no_sid(
    services: Services,
) -> None:
    session = await new_session(services, sid=None)
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(session),
        headers=cookie_header(services, session),
    )
    assert query(response.headers["Location"])["logout_hint"] == ["alice"]


@pytest.mark.parametrize(
    "sid",
    [None, "", "wrong", "%C3%A9", "x" * 5000],
    ids=["missing", "empty", "wrong", "non-ascii", "huge"],
)
async def test_logout_with_a_wrong_or_missing_sid_is_refused_and_changes_nothing(
    services: Services, op: FakeOp, sid: str | None
) -> None:
    session = await new_session(services)
    path = "/bff/logout" if sid is None else f"/bff/logout?sid={sid}"
    response = await call(
        logout.handle, services, "GET", path, headers=cookie_header(services, session)
    )

    assert response.status == 400
    assert json_body(response)["error"] == "invalid_request"
    assert not set_cookies(response)
    assert await services.sessions.load(session.secret, fresh=True) is not None
    assert op.revocations == []


async def test_logout_with_another_sessions_sid_is_refused(services: Services) -> None:
    victim = await new_session(services)
    attacker = await new_session(services, sub="mallory", sid="op-sid-2")
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(attacker),
        headers=cookie_header(services, victim),
    )
    assert response.status == 400
    assert await services.sessions.load(victim.secret, fresh=True) is not None
    assert await services.sessions.load(attacker.secret, fresh=True) is not None


async def test_logout_without_a_cookie_lands_on_the_post_logout_path_and_clears_nothing(
    services: Services, op: FakeOp
) -> None:
    # A cross-site link carries no SameSite=Strict cookie: clearing it here would let any site
    # log users out of bff (and leave their server-side session orphaned).
    response = await call(logout.handle, services, "GET", "/bff/logout?sid=whatever")
    assert response.status == 302
    assert response.headers["Location"] == "/signed-out"
    assert services.cookies.name not in set_cookies(response)
    assert op.revocations == []


async def test_logout_with_the_cookie_of_an_ended_session_lands_on_the_post_logout_path(
    services: Services,
) -> None:
    session = await new_session(services)
    await services.sessions.end(session)
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(session),
        headers=cookie_header(services, session),
    )
    assert response.status == 302
    assert response.headers["Location"] == "/signed-out"
    assert set_cookies(response)[services.cookies.name]["max-age"] == "0"


async def test_logout_lands_on_the_post_logout_path_when_the_op_has_no_end_session_endpoint(
    store: MemoryStore,
) -> None:
    op = FakeOp(end_session=False, revocation=False)
    services = build_services(store, op)
    session = await new_session(services)
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(session),
        headers=cookie_header(services, session),
    )
    assert response.status == 302
    assert response.headers["Location"] == "/signed-out"
    assert await services.sessions.load(session.secret, fresh=True) is None
    assert op.revocations == []


async def test_logout_ends_the_session_even_when_the_op_refuses_the_revocation(
    services: Services, op: FakeOp
) -> None:
    op.revocation_status = 503
    session = await new_session(services)
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(session),
        headers=cookie_header(services, session),
    )
    assert response.status == 302
    assert response.headers["Location"].startswith(f"{ISSUER}/session/end?")
    assert await services.sessions.load(session.secret, fresh=True) is None


async def test_logout_ends_the_session_and_lands_locally_when_the_op_metadata_is_unreachable(
    services: Services, op: FakeOp
) -> None:
    op.down = True
    session = await new_session(services)
    response = await call(
        logout.handle,
        services,
        "GET",
        logout_path(session),
        headers=cookie_header(services, session),
    )
    assert response.status == 302
    assert response.headers["Location"] == "/signed-out"
    assert await services.sessions.load(session.secret, fresh=True) is None


async def test_id_token_hint_is_sent_only_when_the_operator_turns_it_on(
    store: MemoryStore, op: FakeOp
) -> None:
    plain = build_services(store, op)
    session = await new_session(plain)
    response = await call(
        logout.handle, plain, "GET", logout_path(session), headers=cookie_header(plain, session)
    )
    assert "id_token_hint" not in query(response.headers["Location"])

    hinted = build_services(store, op, config=settings(logout_id_token_hint=True))
    session = await new_session(hinted)
    response = await call(
        logout.handle, hinted, "GET", logout_path(session), headers=cookie_header(hinted, session)
    )
    assert query(response.headers["Location"])["id_token_hint"] == [session.data.id_token]


# -- /bff/user tells the SPA when the session ends ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


CSRF = {"X-CSRF": "1"}


async def test_user_reports_the_absolute_and_idle_ends_of_the_session(op: FakeOp) -> None:
    clock = Clock()
    services = build_services(MemoryStore(clock=clock), op, clock=clock)
    session = await services.sessions.create(session_data(clock.now))  # absolute: 300 s, idle: 60 s
    headers = {**CSRF, **cookie_header(services, session)}

    body = json_body(await call(user.handle, services, "GET", "/bff/user", headers=headers))
    assert body["expires_at"] == int(clock.now + 300)
    assert body["idle_expires_at"] == int(clock.now + 60)
    assert body["logout_url"] == f"/bff/logout?sid={quote(session.handle)}"

    # Activity slides the idle end, never past the absolute one.
    clock.now += 50
    body = json_body(await call(user.handle, services, "GET", "/bff/user", headers=headers))
    assert body["idle_expires_at"] == int(clock.now + 60)
    for _ in range(4):  # 250 s after login: now + idle would pass the absolute end
        clock.now += 50
        body = json_body(await call(user.handle, services, "GET", "/bff/user", headers=headers))
    assert body["idle_expires_at"] == int(session.data.expires_at)
    assert body["expires_at"] == int(session.data.expires_at)


async def test_a_session_idle_past_its_idle_timeout_gets_401_though_the_cookie_is_held(
    op: FakeOp,
) -> None:
    clock = Clock()
    services = build_services(MemoryStore(clock=clock), op, clock=clock)
    session = await services.sessions.create(session_data(clock.now))
    headers = {**CSRF, **cookie_header(services, session)}
    clock.now += 59
    assert (await call(user.handle, services, "GET", "/bff/user", headers=headers)).status == 200
    clock.now += 61
    response = await call(user.handle, services, "GET", "/bff/user", headers=headers)
    assert response.status == 401


async def test_a_busy_session_past_its_absolute_timeout_gets_401_though_the_cookie_is_held(
    op: FakeOp,
) -> None:
    clock = Clock()
    services = build_services(MemoryStore(clock=clock), op, clock=clock)
    session = await services.sessions.create(session_data(clock.now))
    headers = {**CSRF, **cookie_header(services, session)}
    for _ in range(10):  # a request every 29 s keeps it from idling out
        clock.now += 29
        response = await call(user.handle, services, "GET", "/bff/user", headers=headers)
        assert response.status == 200
    clock.now += 11  # 301 s after login
    response = await call(user.handle, services, "GET", "/bff/user", headers=headers)
    assert response.status == 401
