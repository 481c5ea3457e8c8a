"""bff.route_tokens and its config (issue 12): resource tokens, token exchange, validation.

The OP is ``tests.unit.fakes.FakeOp`` (refresh-token rotation with reuse detection: a refresh
token presented twice revokes the grant), taught the ``resource`` parameter and RFC 8693; two
"instances" share one fake Redis server. The real OP, Redis and processes are in
``tests/integration/test_resource_and_exchange.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import aiohttp
import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakeredis import aioredis as fake_aioredis

from bff.config import ConfigError, Upstream, parse_settings
from bff.errors import ProviderUnavailable
from bff.oidc import (
    TOKEN_EXCHANGE_GRANT,
    OidcClient,
    ProviderMetadata,
    TokenRequestRefused,
    TokenSet,
)
from bff.refresh import TokenRefresher
from bff.route_tokens import RouteTokens, TokenRefused, login_resources, plan_for, required_grants
from bff.sessions import Session, SessionData, SessionManager
from bff.store.redis import RedisStore
from tests.unit.fakes import FakeOp

KEY = "k" * 32
BASE = f"""\
public_url: https://app.example.com
oidc:
  issuer: https://idp.example.com
  client_id: shop
  client_secret: s3cret
keys: [{KEY}]
"""


def parse(text: str) -> Any:
    return parse_settings(textwrap.dedent(text), "bff.yaml", {})


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


# -------------------------------------------------------------------------------------------------
# Config


def test_resource_and_exchange_routes_parse() -> None:
    settings = parse(
        BASE
        + """\
upstreams:
  - path: /api/orders
    url: http://orders.internal
    resource: https://orders.example.com
  - path: /api/billing
    url: http://billing.internal
    token: user_or_none
    resource: [https://billing.example.com, urn:example:billing]
  - path: /api/reports
    url: http://reports.internal
    token: exchange
    audience: reports-api
    exchange_scopes: [reports:read]
"""
    )
    by_path = {u.path: u for u in settings.upstreams}
    assert by_path["/api/orders"].resource == ("https://orders.example.com",)
    assert by_path["/api/billing"].resource == (
        "https://billing.example.com",
        "urn:example:billing",
    )
    reports = by_path["/api/reports"]
    assert reports.token == "exchange" and reports.audience == ("reports-api",)
    assert reports.exchange_scopes == ("reports:read",)
    assert settings.oidc.resource_parameter == "resource" and settings.oidc.login_resources
    assert login_resources(settings) == (
        "https://billing.example.com",
        "urn:example:billing",
        "https://orders.example.com",
    )
    assert required_grants(settings) == {TOKEN_EXCHANGE_GRANT: "token: exchange on /api/reports"}


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ("    resource: /relative\n", "must be an absolute URI"),
        ("    resource: https://a.example/x#frag\n", "must not contain a fragment"),
        ("    resource: [https://a.example, https://a.example]\n", "duplicate resource"),
        ("    resource: []\n", "expected a string or a non-empty list of strings"),
        ("    resource: 3\n", "expected a string or a non-empty list of strings"),
        ("    token: client\n    resource: https://a.example\n", "not used with token: client"),
        ("    token: none\n    resource: https://a.example\n", "not used with token: none"),
        ("    audience: a\n", "only used with token: exchange"),
        ("    exchange_scopes: [a]\n", "only used with token: exchange"),
        ("    token: exchange\n", "token: exchange needs an audience or a resource"),
        (
            "    token: exchange\n    audience: a\n    exchange_scopes: ['a b']\n",
            "not a valid scope",
        ),
    ],
)
def test_route_token_field_rules(extra: str, expect: str) -> None:
    found = problems(BASE + "upstreams:\n  - path: /a\n    url: http://a\n" + extra)
    assert len(found) == 1, found
    assert found[0].startswith("bff.yaml:"), found
    assert "upstreams[0]." in found[0] and expect in found[0], found


def test_an_audience_parameter_op_takes_one_resource_per_route() -> None:
    text = BASE.replace(
        "  client_secret: s3cret\n", "  client_secret: s3cret\n  resource_parameter: audience\n"
    )
    found = problems(
        text + "upstreams:\n  - path: /a\n    url: http://a\n    resource: [x:a, x:b]\n"
    )
    assert len(found) == 1 and "one audience per route" in found[0], found
    settings = parse(text + "upstreams:\n  - path: /a\n    url: http://a\n    resource: x:a\n")
    assert settings.oidc.resource_parameter == "audience"
    assert login_resources(settings) == ()  # audience-style OPs: nothing asked at login


def test_token_exchange_is_refused_with_dpop_and_resource_routes_are_not() -> None:
    text = BASE.replace("  client_secret: s3cret\n", "  client_secret: s3cret\n  dpop: true\n")
    found = problems(
        text + "upstreams:\n  - path: /a\n    url: http://a\n    token: exchange\n"
        "    audience: x:a\n"
    )
    assert len(found) == 1 and "upstreams[0].token" in found[0], found
    assert "not supported with oidc.dpop" in found[0], found
    settings = parse(text + "upstreams:\n  - path: /a\n    url: http://a\n    resource: x:a\n")
    assert settings.oidc.dpop and settings.upstreams[0].resource == ("x:a",)


def test_resource_parameter_is_one_of_two_names_and_login_resources_can_be_off() -> None:
    bad = BASE.replace(
        "  client_secret: s3cret\n", "  client_secret: s3cret\n  resource_parameter: aud\n"
    )
    assert "expected one of 'resource', 'audience'" in problems(bad)[0]
    off = BASE.replace(
        "  client_secret: s3cret\n", "  client_secret: s3cret\n  login_resources: false\n"
    )
    settings = parse(off + "upstreams:\n  - path: /a\n    url: http://a\n    resource: x:a\n")
    assert login_resources(settings) == ()


def test_routes_without_resource_or_exchange_have_no_plan() -> None:
    assert plan_for(Upstream(path="/a", url="http://a")) is None
    assert plan_for(Upstream(path="/a", url="http://a", token="client")) is None
    a = plan_for(Upstream(path="/a", url="http://a", token="exchange", audience=("x",)))
    b = plan_for(Upstream(path="/b", url="http://b", token="exchange", audience=("y",)))
    assert a is not None and b is not None and a.key != b.key  # a changed config: a new key


# -------------------------------------------------------------------------------------------------
# The OP side: discovery, authorization request, token request parameters


def _metadata(grants: tuple[str, ...] | None) -> ProviderMetadata:
    return ProviderMetadata.parse(
        {
            "issuer": "https://idp.example.com",
            "authorization_endpoint": "https://idp.example.com/auth",
            "token_endpoint": "https://idp.example.com/token",
            "jwks_uri": "https://idp.example.com/jwks",
            **({"grant_types_supported": list(grants)} if grants is not None else {}),
        },
        "https://idp.example.com",
    )


def test_discovery_records_the_advertised_grant_types() -> None:
    assert _metadata(("authorization_code",)).grant_types == ("authorization_code",)
    assert _metadata(None).grant_types is None


async def test_login_asks_for_each_resource_in_its_own_parameter() -> None:
    settings = parse(
        BASE + "upstreams:\n  - path: /a\n    url: http://a\n    resource: [x:a, x:b]\n"
    )
    async with aiohttp.ClientSession() as http:
        client = OidcClient(settings.oidc, http, "https://app.example.com/bff/callback")
        client._metadata = _metadata(None)
        client.login_resources = login_resources(settings)
        url = await client.authorization_url(state="s", nonce="n", code_challenge="c")
    assert parse_qs(urlsplit(url).query)["resource"] == ["x:a", "x:b"]


async def test_an_op_lacking_the_exchange_grant_is_refused_at_discovery() -> None:
    settings = parse(
        BASE + "upstreams:\n  - path: /r\n    url: http://a\n    token: exchange\n    audience: x\n"
    )

    async def discovery(request: web.Request) -> web.Response:
        doc = {
            "issuer": str(request.url.origin()),
            "authorization_endpoint": "a",
            "token_endpoint": "t",
            "jwks_uri": "j",
            "revocation_endpoint": "r",
            "grant_types_supported": ["authorization_code", "refresh_token"],
        }
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        issuer = str(server.make_url("")).rstrip("/")
        oidc_settings = dataclasses.replace(settings.oidc, issuer=issuer)
        client = OidcClient(oidc_settings, http, "https://app.example.com/bff/callback")
        client.required_grants = required_grants(settings)
        with pytest.raises(ProviderUnavailable, match="grant_types_supported lacks urn:ietf"):
            await client.metadata()


# -------------------------------------------------------------------------------------------------
# Tokens: the session's single flight, rotation, exchange caching


class ResourceOp(FakeOp):
    """FakeOp with RFC 8707 ``resources`` on the refresh grant and an RFC 8693 exchange."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.asked: list[tuple[str, ...]] = []
        self.exchanges: list[tuple[str, tuple[str, ...]]] = []
        self.exchange_error: Exception | None = None

    async def refresh(  # type: ignore[override]
        self,
        refresh_token: str,
        *,
        answer_timeout: float | None = None,
        resources: tuple[str, ...] = (),
    ) -> TokenSet:
        self.asked.append(resources)
        tokens = await super().refresh(refresh_token, answer_timeout=answer_timeout)
        if not resources:
            return tokens
        return TokenSet(
            access_token=f"{tokens.access_token}@{' '.join(resources)}",
            token_type="Bearer",
            expires_at=tokens.expires_at,
            refresh_token=tokens.refresh_token,
            id_token=None,
            scope=None,
            lifetime=tokens.lifetime,
        )

    async def token_exchange(
        self,
        subject_token: str,
        *,
        audience: tuple[str, ...] = (),
        resources: tuple[str, ...] = (),
        scopes: tuple[str, ...] = (),
    ) -> TokenSet:
        self.exchanges.append((subject_token, audience))
        await asyncio.sleep(0.01)
        if self.exchange_error is not None:
            raise self.exchange_error
        return TokenSet(
            access_token=f"X-{subject_token}@{' '.join(audience)}",
            token_type="Bearer",
            expires_at=time.time() + 300,
            refresh_token=None,
            id_token=None,
            scope=None,
            lifetime=300,
        )


class Instance:
    def __init__(self, server: fakeredis.FakeServer, op: ResourceOp) -> None:
        self.store = RedisStore(fake_aioredis.FakeRedis(server=server))
        self.sessions = SessionManager(self.store, idle_timeout=600, absolute_timeout=3600)
        oidc = cast(OidcClient, op)
        self.refresher = TokenRefresher(self.sessions, oidc)
        self.tokens = RouteTokens(self.sessions, oidc, self.refresher)

    async def load(self, session: Session) -> Session:
        loaded = await self.sessions.load(session.secret, fresh=True)
        assert loaded is not None
        return loaded


@pytest.fixture
def op() -> ResourceOp:
    return ResourceOp(delay=0.02)


@pytest.fixture
async def pair(
    fake_redis_server: fakeredis.FakeServer, op: ResourceOp
) -> AsyncIterator[tuple[Instance, Instance]]:
    both = (Instance(fake_redis_server, op), Instance(fake_redis_server, op))
    yield both
    for one in both:
        await one.store.close()


def _data(access_in: float) -> SessionData:
    now = time.time()
    return SessionData(
        sub="alice",
        claims={"sub": "alice"},
        access_token="AT-0",
        access_expires_at=now + access_in,
        refresh_token="RT-0",
        id_token=None,
        scopes=("openid",),
        created_at=now,
        expires_at=now + 3600,
    )


ORDERS = Upstream(path="/o", url="http://o", resource=("https://orders.example",))
BILLING = Upstream(path="/b", url="http://b", resource=("https://billing.example",))
REPORTS = Upstream(path="/r", url="http://r", token="exchange", audience=("reports",))


def test_a_session_stored_before_resource_tokens_existed_still_loads() -> None:
    raw = json.loads(_data(60).to_bytes())
    del raw["resource_tokens"]
    assert SessionData.from_bytes(json.dumps(raw).encode()).resource_tokens == {}


async def test_main_and_resource_refreshes_of_one_session_take_turns_on_two_instances(
    pair: tuple[Instance, Instance], op: ResourceOp
) -> None:
    """All due at once, 20 callers each on two instances: one refresh per token, each with the
    refresh token the previous one stored. A race would present one twice: InvalidGrant."""
    a, b = pair
    session = await a.sessions.create(_data(access_in=1))  # the main token is due
    on_b = await b.load(session)

    async def main(inst: Instance, s: Session) -> str:
        return (await inst.refresher.access_token(s))[1]

    async def route(inst: Instance, s: Session, up: Upstream) -> str:
        plan = inst.tokens.plan(up)
        assert plan is not None
        return (await inst.tokens.token(s, plan))[1]

    calls = []
    for inst, s in ((a, session), (b, on_b)):
        for _ in range(20):
            calls += [main(inst, s), route(inst, s, ORDERS), route(inst, s, BILLING)]
    got = await asyncio.gather(*calls)
    assert op.refreshes == 3 and op.current is not None  # never reused: the grant lives
    assert sorted(op.asked) == [(), ("https://billing.example",), ("https://orders.example",)]
    assert {t.split("@")[1] for t in got if "@" in t} == {
        "https://orders.example",
        "https://billing.example",
    }
    final = await a.load(session)
    assert final.data.refresh_token == op.current  # the last rotation is the one stored
    assert final.data.access_token.startswith("AT-") and "@" not in final.data.access_token
    # Fresh now: no further refresh on either instance.
    for inst in pair:
        assert "@https://orders.example" in await route(inst, final, ORDERS)
    assert op.refreshes == 3


async def test_a_rejected_resource_token_is_replaced_once_per_interval(
    pair: tuple[Instance, Instance], op: ResourceOp
) -> None:
    a, _ = pair
    session = await a.sessions.create(_data(access_in=600))
    plan = a.tokens.plan(ORDERS)
    assert plan is not None
    session, first, _ = await a.tokens.token(session, plan)
    new = await a.tokens.renew(session, plan, first)
    assert new is not None and new != first and op.refreshes == 2
    assert await a.tokens.renew(session, plan, new) is None  # at once again: no new grant
    assert op.refreshes == 2


async def test_an_exchange_is_made_once_for_concurrent_callers_on_two_instances(
    pair: tuple[Instance, Instance], op: ResourceOp
) -> None:
    a, b = pair
    session = await a.sessions.create(_data(access_in=600))
    on_b = await b.load(session)
    plan_a, plan_b = a.tokens.plan(REPORTS), b.tokens.plan(REPORTS)
    assert plan_a is not None and plan_b is not None
    got = await asyncio.gather(
        *(a.tokens.token(session, plan_a) for _ in range(10)),
        *(b.tokens.token(on_b, plan_b) for _ in range(10)),
    )
    assert {token for _, token, _ in got} == {"X-AT-0@reports"}
    assert op.exchanges == [("AT-0", ("reports",))]
    assert op.refreshes == 0


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TokenRequestRefused("invalid_target"), 403),
        (TokenRequestRefused("unauthorized_client"), 403),
        (TokenRequestRefused("temporarily_unavailable"), 503),
        (ProviderUnavailable("down"), 503),
    ],
)
async def test_a_failed_exchange_is_403_or_503_never_the_users_token(
    pair: tuple[Instance, Instance], op: ResourceOp, error: Exception, status: int
) -> None:
    a, _ = pair
    op.exchange_error = error
    session = await a.sessions.create(_data(access_in=600))
    plan = a.tokens.plan(REPORTS)
    assert plan is not None
    with pytest.raises((TokenRefused, ProviderUnavailable)) as info:
        await a.tokens.token(session, plan)
    assert cast(Any, info.value).status == status


def test_the_readme_per_route_example_parses_and_plans_each_route() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("**Per-route tokens**")
    block = readme[readme.index("```yaml\n", start) + 8 : readme.index("```\n", start + 30)]
    env = {"OIDC_CLIENT_SECRET": "s", "BFF_KEY_CURRENT": KEY}
    settings = parse_settings(block, "bff.yaml", env, base_dir="/srv/app")
    plans = {u.path: plan_for(u) for u in settings.upstreams}
    orders, reports = plans["/api/orders"], plans["/api/reports"]
    assert orders is not None and orders.kind == "resource"
    assert reports is not None and reports.kind == "exchange"
    assert reports.audience == ("reports-api",) and plans["/api/profile"] is None
    assert login_resources(settings) == ("https://orders.example.com",)


async def test_a_forced_main_refresh_is_not_answered_by_a_resource_refresh(
    pair: tuple[Instance, Instance], op: ResourceOp
) -> None:
    """An upstream refused the main token; meanwhile a resource refresh wrote a new version of
    the record. The forced refresh must still replace the main token, not take that for one."""
    a, _ = pair
    session = await a.sessions.create(_data(access_in=600))
    plan = a.tokens.plan(ORDERS)
    assert plan is not None
    await a.tokens.token(session, plan)  # version 2: a new resource token, same main token
    refreshed = await a.refresher.refresh(session, force=True)  # with the version-1 copy
    assert refreshed.data.access_token != "AT-0" and op.refreshes == 2
    assert ORDERS.resource[0] in refreshed.data.resource_tokens  # kept by the main refresh


@pytest.mark.parametrize("name", ["resource", "audience"])
async def test_the_token_requests_carry_one_parameter_per_value(name: str) -> None:
    forms: list[list[tuple[str, str]]] = []

    async def discovery(request: web.Request) -> web.Response:
        origin = str(request.url.origin())
        return web.json_response(
            {
                "issuer": origin,
                "authorization_endpoint": origin + "/auth",
                "token_endpoint": origin + "/token",
                "jwks_uri": origin + "/jwks",
                "revocation_endpoint": origin + "/revoke",
            }
        )

    async def token(request: web.Request) -> web.Response:
        forms.append(list((await request.post()).items()))  # type: ignore[arg-type]
        return web.json_response({"access_token": "T", "token_type": "Bearer", "expires_in": 60})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_post("/token", token)
    settings = parse(BASE)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        issuer = str(server.make_url("")).rstrip("/")
        oidc = dataclasses.replace(settings.oidc, issuer=issuer, resource_parameter=name)
        client = OidcClient(oidc, http, "https://app.example.com/bff/callback")
        await client.refresh("RT", resources=("x:a", "x:b"))
        await client.token_exchange("AT", audience=("aud",), resources=("x:r",), scopes=("s",))
    refresh, exchange = forms
    assert [v for k, v in refresh if k == name] == ["x:a", "x:b"]
    assert ("grant_type", "refresh_token") in refresh
    assert dict(exchange) == {
        "grant_type": TOKEN_EXCHANGE_GRANT,
        "subject_token": "AT",
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "scope": "s",
        "audience": "aud",
        "resource": "x:r",
    }


async def test_each_provider_asks_for_login_resources_by_its_own_settings(
    aiohttp_client: Any,
) -> None:
    """With several providers, ``login_resources: false`` or ``resource_parameter: audience`` on
    one of them keeps the ``resource`` parameters out of that provider's authorization request
    (an OP that refuses them would fail every login there); the default's do not decide."""
    text = f"""\
public_url: https://app.example.com
oidc:
  - name: main
    issuer: http://127.0.0.1:9/main
    client_id: shop
    client_secret: s3cret
  - name: partners
    issuer: http://127.0.0.1:9/partners
    client_id: shop
    client_secret: s3cret
    login_resources: false
  - name: auth0
    issuer: http://127.0.0.1:9/auth0
    client_id: shop
    client_secret: s3cret
    resource_parameter: audience
keys: [{KEY}]
upstreams:
  - path: /a
    url: http://a
    resource: x:a
"""
    from bff.app import create_app
    from bff.services import SERVICES
    from bff.store.memory import MemoryStore

    settings = parse(text)
    client = await aiohttp_client(create_app(settings, store=MemoryStore()))
    providers = client.app[SERVICES].providers
    assert providers["main"].login_resources == ("x:a",)
    assert providers["partners"].login_resources == ()
    assert providers["auth0"].login_resources == ()
    for name in ("partners", "auth0"):
        providers[name]._metadata = _metadata(None)
        url = await providers[name].authorization_url(state="s", nonce="n", code_challenge="c")
        assert "resource" not in parse_qs(urlsplit(url).query), name


def test_one_audience_per_route_holds_when_any_of_several_providers_names_audience() -> None:
    text = f"""\
public_url: https://app.example.com
oidc:
  - name: main
    issuer: https://idp.example.com
    client_id: shop
    client_secret: s3cret
  - name: auth0
    issuer: https://auth0.example.com
    client_id: shop
    client_secret: s3cret
    resource_parameter: audience
keys: [{KEY}]
upstreams:
  - path: /a
    url: http://a
    resource: [x:a, x:b]
"""
    found = problems(text)
    assert len(found) == 1 and "one audience per route" in found[0], found


async def test_a_dpop_sessions_token_is_never_exchanged_for_an_unbound_one(
    pair: tuple[Instance, Instance], op: ResourceOp
) -> None:
    """Config refuses ``token: exchange`` with ``oidc.dpop``, but a session logged in while DPoP
    was on outlives a config that turned it off: its bound token must not be traded, without a
    proof, for an unbound one (invariant 22). 403, and the OP is not asked."""
    from bff import dpop as dpop_mod

    a, _ = pair
    data = _data(access_in=600)
    data.dpop_jwk = dpop_mod.generate("ES256").record()
    session = await a.sessions.create(data)
    plan = a.tokens.plan(REPORTS)
    assert plan is not None
    with pytest.raises(TokenRefused):
        await a.tokens.token(session, plan)
    assert op.exchanges == []
