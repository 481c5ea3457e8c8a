"""Several OPs, PAR and the discovery features (issue 12, points 4-6), fast: config, the
features report, per-issuer indexes, and the PAR request against an in-process OP.

The same behaviours against two real oidc-provider instances: tests/integration/test_providers.py
and tests/integration/test_par.py.
"""

from __future__ import annotations

import base64
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bff import features  # noqa: E402
from bff.config import ConfigError, OidcSettings, Secret, parse_settings  # noqa: E402
from bff.errors import ProviderUnavailable  # noqa: E402
from bff.oidc import OidcClient, ProviderRefused  # noqa: E402
from bff.sessions import SessionData, SessionManager, _index_key  # noqa: E402
from bff.store.memory import MemoryStore  # noqa: E402

KEY = "k" * 40
TWO = f"""\
public_url: https://app.example.com
oidc:
  - name: staff
    issuer: https://staff-idp.example.com
    client_id: bff-staff
    client_secret: s3cret-staff
    hosts: [Staff.Example.com]
    par: required
  - name: customers
    issuer: https://idp.example.com/realms/customers
    client_id: bff-customers
    client_secret: s3cret-customers
    scopes: [openid, profile, orders:read]
keys: [{KEY}]
upstreams:
  - path: /api/orders
    url: http://orders.internal:8080/v1
    scopes: [orders:read]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text)
    return info.value.problems


# -- config ---------------------------------------------------------------------------------------


def test_a_list_of_named_providers_parses_and_the_first_is_the_default() -> None:
    s = parse_settings(TWO)
    assert [p.name for p in s.providers] == ["staff", "customers"]
    assert s.oidc is s.providers[0]
    assert s.oidc.hosts == ("staff.example.com",)  # lower-cased, as Host is compared
    assert s.oidc.par == "required" and s.providers[1].par == "auto"
    # A route's scopes may come from any provider's scopes.
    assert s.upstreams[0].scopes == ("orders:read",)
    # The default keeps today's redirect URI; the others have their own (mix-up defense).
    assert s.redirect_uri_for(s.providers[0]) == "https://app.example.com/bff/callback"
    assert s.redirect_uri_for(s.providers[1]) == "https://app.example.com/bff/callback/customers"


@pytest.mark.parametrize(
    ("spelling", "mode"), [("off", "off"), ("'off'", "off"), ("required", "required")]
)
def test_par_off_may_be_written_bare_although_yaml_reads_it_as_false(
    spelling: str, mode: str
) -> None:
    assert parse_settings(TWO.replace("par: required", f"par: {spelling}")).oidc.par == mode


def test_the_readme_example_of_several_providers_parses() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Several OpenID Providers")
    block = readme[readme.index("```yaml\n", start) + 8 : readme.index("```\n", start + 40)]
    env = {
        "STAFF_CLIENT_SECRET": "x",
        "CUSTOMERS_CLIENT_SECRET": "y",
        "BFF_KEY_CURRENT": "z" * 40,
    }
    s = parse_settings(block, "bff.yaml", env)
    assert [p.name for p in s.providers] == ["staff", "customers"]
    assert s.callback_path(s.providers[1]) == "/bff/callback/customers"


def test_the_single_mapping_form_is_the_provider_named_default() -> None:
    s = parse_settings(
        f"public_url: https://app.example.com\noidc:\n  issuer: https://idp.example.com\n"
        f"  client_id: x\n  client_secret: y\nkeys: [{KEY}]\n"
    )
    assert s.providers == (s.oidc,)
    assert s.oidc.name == "default" and s.oidc.par == "auto" and s.oidc.hosts == ()
    assert s.redirect_uri_for(s.oidc) == s.redirect_uri


def test_names_issuers_and_hosts_must_be_unique_and_names_present() -> None:
    dup = TWO.replace("name: customers", "name: staff").replace(
        "https://idp.example.com/realms/customers", "https://staff-idp.example.com"
    )
    dup = dup.replace(
        "    scopes: [openid, profile, orders:read]\n", "    hosts: [staff.example.com]\n"
    )
    found = "\n".join(problems(dup))
    assert "oidc[1].name: oidc[0] has the same name already" in found
    assert "oidc[1].issuer: oidc[0] has the same issuer already" in found
    assert "staff.example.com is mapped by oidc[0] too" in found
    nameless = TWO.replace("  - name: customers\n    issuer", "  - issuer")
    assert any("oidc[1].name: required key is missing" in p for p in problems(nameless))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("    par: sometimes\n", "oidc[0].par: expected auto, required or off, got 'sometimes'"),
        ("    hosts: [https://staff.example.com]\n", "expected a host name"),
        ("    hosts: [staff.example.com:443]\n", "expected a host name"),
        ("    name: Staff Portal\n", "expected a provider name"),
        ("    isuer: x\n", "unknown key; did you mean 'issuer'?"),
    ],
)
def test_a_bad_provider_key_is_reported_with_its_place(line: str, expected: str) -> None:
    text = TWO.replace("    par: required\n", line)
    if "hosts" in line:
        text = TWO.replace("    hosts: [Staff.Example.com]\n", line)
    if "name: Staff" in line:
        text = TWO.replace("  - name: staff\n", "  - " + line.strip() + "\n")
    assert any(expected in p for p in problems(text)), problems(text)


def test_a_providers_client_secret_is_never_echoed_in_a_problem() -> None:
    text = TWO.replace("client_secret: s3cret-customers", "client_secret: [s3cret-customers]")
    found = "\n".join(problems(text))
    assert "oidc[1].client_secret" in found and "s3cret" not in found


# -- features -------------------------------------------------------------------------------------

DOC: dict[str, Any] = {
    "issuer": "https://op.example",
    "pushed_authorization_request_endpoint": "https://op.example/par",
    "require_pushed_authorization_requests": True,
    "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
    "grant_types_supported": ["authorization_code", features.TOKEN_EXCHANGE],
    "revocation_endpoint": "https://op.example/revoke",
    "end_session_endpoint": "https://op.example/logout",
    "backchannel_logout_supported": True,
    "backchannel_logout_session_supported": True,
    "authorization_response_iss_parameter_supported": True,
}


def test_the_features_report_names_what_the_document_offers_and_what_it_does_not() -> None:
    lines = "\n".join(features.offered(DOC))
    assert "PAR, RFC 9126): yes, required by the OP (https://op.example/par)" in lines
    assert "DPoP (RFC 9449): yes, ES256, EdDSA" in lines
    assert "token exchange (RFC 8693): yes" in lines
    assert "revocation (RFC 7009): yes" in lines
    assert "end_session_endpoint): yes" in lines
    assert "back-channel logout: yes, with sid" in lines
    assert "RFC 9207): yes" in lines
    assert "resource indicators (RFC 8707): not knowable" in lines
    bare = "\n".join(features.offered({"issuer": "https://op.example"}))
    for gone in ("(PAR, RFC 9126): no", "DPoP (RFC 9449): no", "back-channel logout: no"):
        assert gone in bare
    assert "token exchange (RFC 8693): unknown" in bare


@pytest.mark.parametrize(
    ("par", "doc", "refused"),
    [
        ("auto", DOC, None),
        ("required", DOC, None),
        ("off", DOC, "par: off, but https://op.example requires pushed authorization requests"),
        ("required", {"issuer": "x"}, "advertises no pushed_authorization_request_endpoint"),
        ("auto", {"issuer": "x"}, None),
        ("off", {"issuer": "x"}, None),
    ],
)
def test_par_settings_the_op_cannot_honour_are_refused(
    par: str, doc: dict[str, Any], refused: str | None
) -> None:
    settings = OidcSettings(issuer="https://op.example", client_id="c", par=par)  # type: ignore[arg-type]
    found = features.refusals(settings, doc)
    if refused is None:
        assert found == []
    else:
        assert len(found) == 1 and refused in found[0]
    assert features.uses_par(settings, doc) == (
        par != "off" and "pushed_authorization_request_endpoint" in doc
    )


def test_another_feature_can_add_its_own_requirement_and_probe() -> None:
    """The seam the DPoP and token-exchange features extend."""

    def needs_x(settings: OidcSettings, doc: Any) -> str | None:
        return None if doc.get("x_supported") else "x is not supported"

    def probe(doc: Any) -> str:
        return f"x: {'yes' if doc.get('x_supported') else 'no'}"

    features.register_requirement(needs_x)
    features.register_probe(probe)
    try:
        settings = OidcSettings(issuer="https://op.example", client_id="c")
        assert features.refusals(settings, DOC) == ["x is not supported"]
        assert "x: no" in features.offered(DOC)
    finally:
        features._REQUIREMENTS.remove(needs_x)
        features._PROBES.remove(probe)


# -- per-issuer indexes ---------------------------------------------------------------------------

ISSUERS = {"a": "https://a.example", "b": "https://b.example"}


def session_data(sub: str, sid: str | None, idp: str | None) -> SessionData:
    now = time.time()
    return SessionData(
        sub=sub, claims={}, access_token="at", access_expires_at=now + 300, refresh_token=None,
        id_token=None, scopes=("openid",), created_at=now, expires_at=now + 3600, sid=sid, idp=idp,
    )  # fmt: skip


@pytest.fixture
def manager() -> SessionManager:
    return SessionManager(
        MemoryStore(), idle_timeout=600, absolute_timeout=3600, cache_ttl=0, issuers=ISSUERS
    )


async def test_the_same_sub_and_sid_at_two_issuers_are_two_users(manager: SessionManager) -> None:
    at_a = await manager.create(session_data("alice", "sid-1", "a"))
    at_b = await manager.create(session_data("alice", "sid-1", "b"))
    assert await manager.ids_for(sub="alice", idp="a") == [at_a.id]
    assert await manager.ids_for(sub="alice", idp="b") == [at_b.id]
    assert await manager.ids_for(sid="sid-1") == [at_a.id]  # None: the default provider, a
    # B's logout token naming alice / sid-1 ends B's session only.
    assert await manager.end_op_session(sid="sid-1", sub="alice", idp="b") == 1
    assert await manager.load(at_b.secret) is None
    assert await manager.load(at_a.secret) is not None
    assert await manager.end_op_session(sid=None, sub="alice", idp="b") == 0
    assert await manager.load(at_a.secret) is not None


async def test_a_record_from_before_providers_belongs_to_the_default_provider(
    manager: SessionManager,
) -> None:
    """An old record has no idp and was indexed under the issuer-less keys: the default
    provider's back-channel logout still finds it, another provider's does not."""
    old = SessionManager(MemoryStore(), idle_timeout=600, absolute_timeout=3600, cache_ttl=0)
    old.store = manager.store
    legacy = await old.create(session_data("bob", "sid-9", None))
    assert await manager.store.index_members(_index_key("sub", "bob")) == [legacy.id]
    assert await manager.ids_for(sub="bob", idp="b") == []
    assert await manager.ids_for(sub="bob", idp="a") == [legacy.id]
    assert await manager.end_op_session(sid="sid-9", sub="bob", idp="a") == 1
    assert await manager.store.index_members(_index_key("sub", "bob")) == []


async def test_a_session_whose_provider_left_the_config_ends_when_read(
    manager: SessionManager,
) -> None:
    before = SessionManager(
        manager.store, idle_timeout=600, absolute_timeout=3600, cache_ttl=0,
        issuers={**ISSUERS, "removed": "https://removed.example"},
    )  # fmt: skip
    gone = await before.create(session_data("carol", None, "removed"))
    assert await before.load(gone.secret) is not None
    assert await manager.load(gone.secret) is None
    assert await manager.load(gone.secret, fresh=True) is None


async def test_logout_token_jtis_are_remembered_per_issuer(manager: SessionManager) -> None:
    await manager.record_jti("jti-1", 60, "a")
    assert await manager.jti_seen("jti-1", "a")
    assert not await manager.jti_seen("jti-1", "b")


# -- PAR against an in-process OP -----------------------------------------------------------------


class ParOp:
    """Discovery with a PAR endpoint that records what it was sent."""

    def __init__(self, *, par_status: int = 201, require: bool = False) -> None:
        self.par_status = par_status
        self.par_error = "invalid_request"
        self.require = require
        self.pushed: list[tuple[dict[str, list[str]], str | None]] = []
        self.url = ""

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            doc = {
                "issuer": self.url,
                "authorization_endpoint": f"{self.url}/auth",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "revocation_endpoint": f"{self.url}/revoke",
                "pushed_authorization_request_endpoint": f"{self.url}/par",
                "require_pushed_authorization_requests": self.require,
            }
            return web.json_response(doc)

        async def par(request: web.Request) -> web.Response:
            form = parse_qs(await request.text())
            self.pushed.append((form, request.headers.get("Authorization")))
            if self.par_status != 201:
                return web.json_response({"error": self.par_error}, status=self.par_status)
            body = {"request_uri": "urn:ietf:params:oauth:request_uri:abc", "expires_in": 60}
            return web.json_response(body, status=201)

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_post("/par", par)
        return app


@pytest.fixture
async def par_op() -> AsyncIterator[ParOp]:
    op = ParOp()
    runner = web.AppRunner(op.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    op.url = f"http://127.0.0.1:{port}"
    try:
        yield op
    finally:
        await runner.cleanup()


def par_client(op: ParOp, http: aiohttp.ClientSession, par: str) -> OidcClient:
    settings = OidcSettings(
        issuer=op.url,
        client_id="bff",
        client_secret=Secret("s3cret"),
        par=par,  # type: ignore[arg-type]
    )
    return OidcClient(settings, http, "https://app.example.com/bff/callback")


async def test_with_par_the_browser_url_has_only_client_id_and_request_uri(
    par_op: ParOp,
) -> None:
    async with aiohttp.ClientSession() as http:
        client = par_client(par_op, http, "auto")
        url = URL(await client.authorization_url(state="st", nonce="n", code_challenge="ch"))
    assert url.path == "/auth"
    assert dict(url.query) == {
        "client_id": "bff",
        "request_uri": "urn:ietf:params:oauth:request_uri:abc",
    }
    ((form, auth),) = par_op.pushed
    # Everything went server to server, authenticated like a token request (client_secret_basic).
    assert auth == "Basic " + base64.b64encode(b"bff:s3cret").decode()
    assert form["state"] == ["st"] and form["nonce"] == ["n"] and form["code_challenge"] == ["ch"]
    assert form["redirect_uri"] == ["https://app.example.com/bff/callback"]
    assert form["code_challenge_method"] == ["S256"] and form["response_type"] == ["code"]


async def test_par_off_sends_the_parameters_in_the_url(par_op: ParOp) -> None:
    async with aiohttp.ClientSession() as http:
        client = par_client(par_op, http, "off")
        url = URL(await client.authorization_url(state="st", nonce="n", code_challenge="ch"))
    assert url.query["state"] == "st" and "request_uri" not in url.query
    assert par_op.pushed == []


async def test_par_off_is_refused_at_discovery_when_the_op_requires_par(par_op: ParOp) -> None:
    par_op.require = True
    async with aiohttp.ClientSession() as http:
        client = par_client(par_op, http, "off")
        with pytest.raises(ProviderRefused, match="requires pushed authorization requests"):
            await client.metadata()
        assert not client.ready and client.refused is not None
        # Asked again at once: the reason, not a generic "not loaded yet".
        with pytest.raises(ProviderRefused, match="par: off"):
            await client.metadata()


async def test_an_op_refusing_the_pushed_request_gives_503_not_a_500(par_op: ParOp) -> None:
    par_op.par_status = 400
    async with aiohttp.ClientSession() as http:
        client = par_client(par_op, http, "required")
        with pytest.raises(ProviderUnavailable) as info:
            await client.authorization_url(state="st", nonce="n", code_challenge="ch")
    assert info.value.status == 503 and "invalid_request" in str(info.value)


async def test_only_an_oauth_error_code_of_a_refused_push_reaches_the_answer(
    par_op: ParOp,
) -> None:
    par_op.par_status = 400
    par_op.par_error = "<script>alert(1)</script> call +1 555 0100"
    async with aiohttp.ClientSession() as http:
        client = par_client(par_op, http, "required")
        with pytest.raises(ProviderUnavailable) as info:
            await client.authorization_url(state="st", nonce="n", code_challenge="ch")
    assert "script" not in str(info.value) and "555" not in str(info.value)
    assert "(400)" in str(info.value)


async def test_login_resources_are_pushed_with_the_request_not_put_in_the_url(
    par_op: ParOp,
) -> None:
    async with aiohttp.ClientSession() as http:
        client = par_client(par_op, http, "auto")
        client.login_resources = ("https://orders.example/", "https://billing.example/")
        url = URL(await client.authorization_url(state="st", nonce="n", code_challenge="ch"))
    assert set(url.query) == {"client_id", "request_uri"}
    ((form, _),) = par_op.pushed
    assert form["resource"] == ["https://orders.example/", "https://billing.example/"]


def test_each_provider_refreshes_with_its_own_skew() -> None:
    from bff.refresh import TokenRefresher

    store = MemoryStore()
    sessions = SessionManager(store, idle_timeout=600, absolute_timeout=3600, issuers=ISSUERS)
    a = OidcClient(OidcSettings(name="a", issuer=ISSUERS["a"], client_id="c"), None, "r")  # type: ignore[arg-type]
    b_settings = OidcSettings(name="b", issuer=ISSUERS["b"], client_id="c", refresh_skew=5.0)
    b = OidcClient(b_settings, None, "r")  # type: ignore[arg-type]
    refresher = TokenRefresher(sessions, a, skew=60.0, providers={"a": a, "b": b})
    assert refresher.oidc_for(session_data("u", None, "b")) is b
    assert refresher.oidc_for(session_data("u", None, None)) is a
    assert refresher.effective_skew(session_data("u", None, "b")) == 5.0
    assert refresher.effective_skew(session_data("u", None, "a")) == 60.0


@pytest.mark.parametrize(
    "key",
    [
        "dpop_signing_alg_values_supported",
        "id_token_signing_alg_values_supported",
        "grant_types_supported",
    ],
)
@pytest.mark.parametrize("value", [5, True, {"ES256": 1}, "ES256"])
def test_an_odd_algorithm_list_in_discovery_reads_as_none_listed_not_a_crash(
    key: str, value: object
) -> None:
    """A TypeError here would end the discovery task for good (it retries ProviderUnavailable
    only) and make every login at that provider a 500."""
    from bff.oidc import ProviderMetadata

    doc = {"issuer": "i", "authorization_endpoint": "a", "token_endpoint": "t", "jwks_uri": "j"}
    meta = ProviderMetadata.parse({**doc, key: value}, "i")
    assert meta.dpop_algs == () and meta.id_token_algs == ()


async def test_a_session_whose_provider_now_names_another_issuer_ends_when_read(
    manager: SessionManager,
) -> None:
    """Provider ``b`` kept its name but its issuer changed: its sessions' refresh tokens (and
    DPoP proofs, and logout hints) must not go to the new issuer, which never issued them."""
    before = SessionManager(
        manager.store, idle_timeout=600, absolute_timeout=3600, cache_ttl=0,
        issuers={**ISSUERS, "b": "https://old-b.example"},
    )  # fmt: skip
    data = session_data("carol", None, "b")
    data.claims = {"iss": "https://old-b.example", "name": "Carol"}
    moved = await before.create(data)
    assert await before.load(moved.secret) is not None
    assert await manager.load(moved.secret, fresh=True) is None
    # A record whose claims hold the provider's own issuer, or none (older records), is kept.
    same = session_data("dave", None, "b")
    same.claims = {"iss": ISSUERS["b"]}
    kept = await manager.create(same)
    legacy = await manager.create(session_data("erin", None, "b"))
    assert await manager.load(kept.secret, fresh=True) is not None
    assert await manager.load(legacy.secret, fresh=True) is not None
