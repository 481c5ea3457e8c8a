"""OidcClient against the hostile OP: ID token validation, client authentication, OP failures."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bff.config import OidcSettings, Secret  # noqa: E402
from bff.errors import ProviderUnavailable  # noqa: E402
from bff.oidc import (  # noqa: E402
    BACKCHANNEL_EVENT,
    InvalidGrant,
    InvalidToken,
    OidcClient,
    TokenRequestRefused,
    authorization_server_metadata_url,
    new_pkce_pair,
)
from tests.support.hostile_op import HostileOp  # noqa: E402

REDIRECT = "http://127.0.0.1:8080/bff/callback"
NONCE = "n-0S6_WzA2Mj"


class Clock:
    """A settable clock for the client, starting at real time (the OP uses real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def settings_for(op: HostileOp, **overrides: Any) -> OidcSettings:
    values: dict[str, Any] = {
        "issuer": op.issuer,
        "client_id": op.client_id,
        "client_secret": Secret(op.client_secret),
        "token_endpoint_auth_method": op.auth_method,
        "http_timeout": 2.0,
        "jwks_refetch_interval": 10.0,
        **overrides,
    }
    return OidcSettings(**values)


@pytest.fixture
async def op() -> AsyncIterator[HostileOp]:
    async with HostileOp() as hostile:
        yield hostile


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(op: HostileOp, http: aiohttp.ClientSession, clock: Clock) -> OidcClient:
    return OidcClient(settings_for(op), http, REDIRECT, clock=clock)


async def authorize_code(
    op: HostileOp, client: OidcClient, http: aiohttp.ClientSession, nonce: str = NONCE
) -> tuple[str, str]:
    """Run the authorization request at the OP; returns (code, verifier)."""
    verifier, challenge = new_pkce_pair()
    url = await client.authorization_url(state="st", nonce=nonce, code_challenge=challenge)
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    code = dict(URL(location).query)["code"]
    return code, verifier


# -------------------------------------------------------------------------------------------------
# ID token validation (OpenID Connect Core 3.1.3.7)


async def test_a_valid_id_token_is_accepted_and_its_claims_returned(
    op: HostileOp, client: OidcClient
) -> None:
    claims = await client.validate_id_token(op.id_token(NONCE), nonce=NONCE)
    assert claims["sub"] == "alice"
    assert claims["iss"] == op.issuer
    assert claims["name"] == "Test User alice"


@pytest.mark.parametrize(
    ("defect", "reason"),
    [
        ("bad_signature", "signature is invalid"),
        ("tampered", "signature is invalid"),
        ("alg_none", "algorithm 'none' is not allowed"),
        ("hs256_public_key", "algorithm 'HS256' is not allowed"),
        ("wrong_iss", "another issuer"),
        ("wrong_aud", "not meant for this client"),
        ("extra_aud", "audiences this client does not trust"),
        ("wrong_azp", "azp is another client"),
        ("expired", "expired"),
        ("iat_future", "issued in the future"),
        ("wrong_nonce", "nonce does not match"),
        ("missing_nonce", "nonce does not match"),
        ("unknown_kid", "key the OP does not publish"),
    ],
)
async def test_an_id_token_defect_is_rejected_for_its_own_reason(
    op: HostileOp, client: OidcClient, defect: str, reason: str
) -> None:
    token = op.id_token(NONCE, defect)
    with pytest.raises(InvalidToken, match=reason):
        await client.validate_id_token(token, nonce=NONCE)


async def test_hs256_keyed_with_the_public_key_is_rejected_even_when_configured_as_allowed(
    op: HostileOp, http: aiohttp.ClientSession, clock: Clock
) -> None:
    """Key confusion: an operator who lists HS256 must still not get an HMAC over a public key."""
    op.advertised_algs = ["RS256", "HS256"]
    settings = settings_for(op, id_token_algs=("RS256", "HS256"))
    client = OidcClient(settings, http, REDIRECT, clock=clock)
    with pytest.raises(InvalidToken, match="algorithm 'HS256' is not allowed"):
        await client.validate_id_token(op.id_token(NONCE, "hs256_public_key"), nonce=NONCE)
    # The JWKS holds only the RSA key; no HMAC secret can be made of it.
    assert (await client.validate_id_token(op.id_token(NONCE), nonce=NONCE))["sub"] == "alice"


async def test_a_token_within_the_clock_skew_is_accepted_and_beyond_it_is_not(
    op: HostileOp, client: OidcClient, clock: Clock
) -> None:
    token = op.id_token(NONCE)
    exp = json.loads(_segment(token, 1))["exp"]
    clock.now = exp + 30  # the default skew is 60 s
    assert (await client.validate_id_token(token, nonce=NONCE))["sub"] == "alice"
    clock.now = exp + 61
    with pytest.raises(InvalidToken, match="expired"):
        await client.validate_id_token(token, nonce=NONCE)


def _segment(token: str, index: int) -> bytes:
    import base64

    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -------------------------------------------------------------------------------------------------
# JWKS: a key rotation never fails a login or a refresh (issue 9, point 7); forged kids on the
# unsolicited back-channel cannot turn us into a JWKS amplifier


def logout_token(op: HostileOp, key: RSAKey | None = None, **header: Any) -> str:
    """A valid back-channel logout token (unsolicited: anyone can POST one)."""
    now = int(time.time())
    claims = {
        "iss": op.issuer,
        "aud": op.client_id,
        "iat": now,
        "exp": now + 120,
        "jti": secrets.token_hex(8),
        "sid": "op-session",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    return op.sign(claims, key, **header)


def without_kid(op: HostileOp, claims: dict[str, Any]) -> str:
    return jwt.encode({"alg": "RS256"}, claims, op.signing_key)


@pytest.mark.parametrize("rotation", ["new kid", "same kid, new key material", "no kid"])
async def test_a_rotated_key_is_fetched_at_once_for_a_token_from_the_token_endpoint(
    op: HostileOp, client: OidcClient, rotation: str
) -> None:
    await client.validate_id_token(op.id_token(NONCE), nonce=NONCE)
    assert op.jwks_fetches == 1
    # Right after that fetch (well inside jwks_refetch_interval) the OP rotates.
    if rotation == "same kid, new key material":
        op.replace_key_material()
    else:
        op.rotate_signing_key()
    token = without_kid(op, op.claims(NONCE)) if rotation == "no kid" else op.id_token(NONCE)
    assert (await client.validate_id_token(token, nonce=NONCE))["sub"] == "alice"
    assert op.jwks_fetches == 2  # exactly one refetch
    # the new key is cached now: no more fetches
    await client.validate_id_token(token, nonce=NONCE)
    assert op.jwks_fetches == 2


async def test_a_refreshed_id_token_is_refused_only_after_a_fresh_key_set_refuses_it(
    op: HostileOp, client: OidcClient
) -> None:
    await client.validate_id_token(op.id_token(NONCE), nonce=NONCE)
    for n, defect in enumerate(["bad_signature", "unknown_kid"], start=2):
        with pytest.raises(InvalidToken, match=r"signature is invalid|does not publish"):
            await client.validate_id_token(
                op.id_token(None, defect), nonce=None, expected_sub="alice"
            )
        assert op.jwks_fetches == n  # judged against a key set fetched after it failed


async def test_concurrent_tokens_signed_by_a_new_key_share_one_jwks_fetch(
    op: HostileOp, client: OidcClient
) -> None:
    await client.validate_id_token(op.id_token(NONCE), nonce=NONCE)
    op.rotate_signing_key()
    op.jwks_delay = 0.2  # the fetch is still under way when the others fail
    tokens = [op.id_token(NONCE) for _ in range(20)]
    results = await asyncio.gather(*(client.validate_id_token(t, nonce=NONCE) for t in tokens))
    assert {r["sub"] for r in results} == {"alice"}
    assert op.jwks_fetches == 2


async def test_forged_kids_on_logout_tokens_refetch_at_most_once_per_interval(
    op: HostileOp, client: OidcClient, clock: Clock
) -> None:
    await client.validate_logout_token(logout_token(op))
    assert op.jwks_fetches == 1
    # A flood of logout tokens with random kids, right after a fetch: no fetch at all.
    for _ in range(50):
        with pytest.raises(InvalidToken, match="does not publish"):
            await client.validate_logout_token(logout_token(op, op.rogue_key, kid=_kid()))
    assert op.jwks_fetches == 1
    # Once the interval has passed, one of them gets one refetch, the rest none.
    clock.now += 10.5
    for _ in range(50):
        with pytest.raises(InvalidToken, match="does not publish"):
            await client.validate_logout_token(logout_token(op, op.rogue_key, kid=_kid()))
    assert op.jwks_fetches == 2
    # A genuine logout token signed by a rotated key within the interval is refused (the OP
    # retries it, Back-Channel Logout 1.0 2.8) ...
    op.rotate_signing_key()
    with pytest.raises(InvalidToken, match="does not publish"):
        await client.validate_logout_token(logout_token(op))
    assert op.jwks_fetches == 2
    # ... and accepted once the interval has passed.
    clock.now += 10.5
    await client.validate_logout_token(logout_token(op))
    assert op.jwks_fetches == 3


async def test_a_flood_of_forged_logout_tokens_does_not_stop_a_login_after_a_rotation(
    op: HostileOp, client: OidcClient
) -> None:
    await client.validate_id_token(op.id_token(NONCE), nonce=NONCE)
    op.rotate_signing_key()
    op.jwks_delay = 0.1

    async def forged() -> None:
        with pytest.raises(InvalidToken):
            await client.validate_logout_token(logout_token(op, op.rogue_key, kid=_kid()))

    flood = [asyncio.create_task(forged()) for _ in range(100)]
    await asyncio.sleep(0)  # the flood has used up the unsolicited budget
    claims = await client.validate_id_token(op.id_token(NONCE), nonce=NONCE)
    assert claims["sub"] == "alice"
    await asyncio.gather(*flood)
    # the first fetch, at most one for the flood, one for the login
    assert op.jwks_fetches <= 3
    # the flood, still within the interval, cannot make the next login wait for anything
    more = [asyncio.create_task(forged()) for _ in range(100)]
    op.rotate_signing_key()
    assert (await client.validate_id_token(op.id_token(NONCE), nonce=NONCE))["sub"] == "alice"
    await asyncio.gather(*more)
    assert op.jwks_fetches <= 4


def _kid() -> str:
    return f"forged-{secrets.token_hex(6)}"


# -------------------------------------------------------------------------------------------------
# The revocation endpoint: discovery, else RFC 8414 metadata, config first (issue 9, point 10)


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        ("https://op.example", "https://op.example/.well-known/oauth-authorization-server"),
        ("https://op.example/", "https://op.example/.well-known/oauth-authorization-server"),
        (
            "https://op.example/realms/app",
            "https://op.example/.well-known/oauth-authorization-server/realms/app",
        ),
        (
            "https://op.example:8443/t/",
            "https://op.example:8443/.well-known/oauth-authorization-server/t",
        ),
    ],
)
def test_rfc8414_metadata_url_inserts_the_well_known_segment_before_the_path(
    issuer: str, expected: str
) -> None:
    assert authorization_server_metadata_url(issuer) == expected


@pytest.mark.parametrize("path", ["", "/tenant/a"])
async def test_a_revocation_endpoint_only_in_rfc8414_metadata_is_found_and_used(
    http: aiohttp.ClientSession, clock: Clock, path: str
) -> None:
    async with HostileOp(path=path) as op:
        op.revocation_in = "rfc8414"
        client = OidcClient(settings_for(op), http, REDIRECT, clock=clock)
        assert (await client.metadata()).revocation_endpoint == f"{op.issuer}/revoke"
        assert await client.revoke("RT-1", "refresh_token") is True
        assert op.revoked == [("RT-1", "refresh_token")]
        assert op.rfc8414_fetches == 1


async def test_rfc8414_metadata_about_another_issuer_is_ignored(
    op: HostileOp, client: OidcClient
) -> None:
    op.revocation_in = "rfc8414"
    op.rfc8414_issuer = "https://evil.example"
    assert (await client.metadata()).revocation_endpoint is None
    assert await client.revoke("RT-1", "refresh_token") is False
    assert op.revoked == []


async def test_an_rfc8414_document_without_an_answer_fails_discovery_until_it_answers(
    op: HostileOp, client: OidcClient, clock: Clock
) -> None:
    op.revocation_in = "rfc8414"
    op.rfc8414_drop = True
    with pytest.raises(ProviderUnavailable):
        await client.metadata()
    assert not client.ready
    op.rfc8414_drop = False
    clock.now += 1.5  # discovery retries at most once a second
    assert (await client.metadata()).revocation_endpoint == f"{op.issuer}/revoke"


async def test_an_rfc8414_document_answering_an_error_means_none_and_bff_gets_ready(
    op: HostileOp, client: OidcClient
) -> None:
    op.revocation_in = "rfc8414"
    op.rfc8414_status = 502  # some OPs' proxies answer 5xx for paths they do not know
    assert (await client.metadata()).revocation_endpoint is None
    assert client.ready


async def test_the_configured_revocation_endpoint_wins(
    op: HostileOp, http: aiohttp.ClientSession, clock: Clock
) -> None:
    op.revocation_in = "discovery"
    configured = f"{op.issuer}/configured/revoke"
    client = OidcClient(
        settings_for(op, revocation_endpoint=configured), http, REDIRECT, clock=clock
    )
    assert (await client.metadata()).revocation_endpoint == configured
    assert op.rfc8414_fetches == 0


async def test_discovery_names_the_revocation_endpoint_without_asking_rfc8414(
    op: HostileOp, client: OidcClient
) -> None:
    op.revocation_in = "discovery"
    assert (await client.metadata()).revocation_endpoint == f"{op.issuer}/revoke"
    assert op.rfc8414_fetches == 0


async def test_no_revocation_endpoint_anywhere_is_said_once(
    op: HostileOp, client: OidcClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="bff.oidc")
    assert (await client.metadata()).revocation_endpoint is None
    assert await client.revoke("AT-1", "access_token") is False
    await client.metadata()
    warned = [r for r in caplog.records if r.getMessage() == "oidc.no_revocation_endpoint"]
    assert len(warned) == 1
    assert op.rfc8414_fetches == 1


# -------------------------------------------------------------------------------------------------
# Discovery


async def test_discovery_naming_another_issuer_is_refused(
    op: HostileOp, client: OidcClient
) -> None:
    op.discovery_issuer = "https://evil.example"
    with pytest.raises(ProviderUnavailable, match="issuer"):
        await client.metadata()
    assert not client.ready


async def test_discovery_is_cached_after_the_first_success(
    op: HostileOp, client: OidcClient
) -> None:
    first = await client.metadata()
    second = await client.metadata()
    assert first is second
    assert op.discovery_fetches == 1
    assert first.token_endpoint == op.token_endpoint
    assert first.iss_parameter_supported


async def test_an_unreachable_issuer_is_provider_unavailable(
    http: aiohttp.ClientSession, clock: Clock
) -> None:
    async with HostileOp() as dead:
        pass  # started and closed: its port now refuses connections
    client = OidcClient(settings_for(dead), http, REDIRECT, clock=clock)
    with pytest.raises(ProviderUnavailable):
        await client.metadata()


async def test_the_authorization_url_carries_pkce_s256_state_and_nonce(
    op: HostileOp, client: OidcClient
) -> None:
    url = URL(
        await client.authorization_url(state="the-state", nonce="the-nonce", code_challenge="cc")
    )
    q = url.query
    assert str(url.with_query(None)) == f"{op.issuer}/authorize"
    assert q["code_challenge"] == "cc"
    assert q["code_challenge_method"] == "S256"
    assert (q["state"], q["nonce"]) == ("the-state", "the-nonce")
    assert q["redirect_uri"] == REDIRECT
    assert q["response_type"] == "code"
    assert "code_verifier" not in q


async def test_the_response_iss_parameter_must_be_the_issuer(
    op: HostileOp, client: OidcClient
) -> None:
    await client.check_response_issuer(op.issuer)
    with pytest.raises(InvalidToken, match="another issuer"):
        await client.check_response_issuer("https://evil.example")
    # The OP advertises RFC 9207 support, so a missing iss is a downgrade.
    with pytest.raises(InvalidToken, match="lacks the iss"):
        await client.check_response_issuer(None)


# -------------------------------------------------------------------------------------------------
# Token endpoint: client authentication and failures


async def exchange(op: HostileOp, client: OidcClient, http: aiohttp.ClientSession) -> None:
    code, verifier = await authorize_code(op, client, http)
    tokens = await client.exchange_code(code, verifier)
    assert tokens.access_token == op.issued[-1].access_token
    assert tokens.refresh_token == op.issued[-1].refresh_token
    assert tokens.id_token == op.issued[-1].id_token
    assert op.token_requests[-1].status == 200


async def test_client_secret_basic_form_encodes_then_base64s_the_credentials(
    http: aiohttp.ClientSession, clock: Clock
) -> None:
    # Characters that RFC 6749 2.3.1 encoding changes: a naive "id:secret" would fail here.
    async with HostileOp(client_id="bff:client one", client_secret="s3cr+t/=:%") as op:
        client = OidcClient(settings_for(op), http, REDIRECT, clock=clock)
        await exchange(op, client, http)
        request = op.token_requests[-1]
        assert request.headers["Authorization"].startswith("Basic ")
        assert "client_secret" not in request.form


async def test_client_secret_post_sends_the_credentials_in_the_body(
    http: aiohttp.ClientSession, clock: Clock
) -> None:
    async with HostileOp(auth_method="client_secret_post") as op:
        client = OidcClient(settings_for(op), http, REDIRECT, clock=clock)
        await exchange(op, client, http)
        request = op.token_requests[-1]
        assert "Authorization" not in request.headers
        assert request.form["client_secret"] == op.client_secret


async def test_private_key_jwt_sends_an_assertion_the_op_verifies(
    http: aiohttp.ClientSession, clock: Clock, tmp_path: Path
) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "client-key-1"})
    key_file = tmp_path / "client.pem"
    key_file.write_bytes(key.as_pem(private=True))
    public = RSAKey.import_key(key.as_dict(private=False))
    async with HostileOp(auth_method="private_key_jwt", client_public_key=public) as op:
        settings = settings_for(op, client_secret=None, private_key_file=key_file)
        client = OidcClient(settings, http, REDIRECT, clock=clock)
        await exchange(op, client, http)
        await exchange(op, client, http)  # a fresh jti each time: no replay refusal
        request = op.token_requests[-1]
        assert "client_secret" not in request.form
        assert "Authorization" not in request.headers

        # The OP really checks it: an assertion signed by another key is refused.
        op.client_public_key = RSAKey.generate_key(2048)
        code, verifier = await authorize_code(op, client, http)
        with pytest.raises(TokenRequestRefused, match="invalid_client"):
            await client.exchange_code(code, verifier)


async def test_a_wrong_client_secret_is_token_request_refused(
    op: HostileOp, http: aiohttp.ClientSession, clock: Clock
) -> None:
    client = OidcClient(
        settings_for(op, client_secret=Secret("wrong")), http, REDIRECT, clock=clock
    )
    code, verifier = await authorize_code(op, client, http)
    with pytest.raises(TokenRequestRefused, match="invalid_client"):
        await client.exchange_code(code, verifier)


async def test_a_replayed_code_is_invalid_grant(
    op: HostileOp, client: OidcClient, http: aiohttp.ClientSession
) -> None:
    code, verifier = await authorize_code(op, client, http)
    await client.exchange_code(code, verifier)
    with pytest.raises(InvalidGrant):
        await client.exchange_code(code, verifier)


async def test_a_wrong_code_verifier_is_invalid_grant(
    op: HostileOp, client: OidcClient, http: aiohttp.ClientSession
) -> None:
    code, _ = await authorize_code(op, client, http)
    other_verifier, _ = new_pkce_pair()
    with pytest.raises(InvalidGrant):
        await client.exchange_code(code, other_verifier)


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_token_endpoint_5xx_is_provider_unavailable(
    op: HostileOp, client: OidcClient, http: aiohttp.ClientSession, status: int
) -> None:
    code, verifier = await authorize_code(op, client, http)
    op.token_status = status
    with pytest.raises(ProviderUnavailable, match=str(status)):
        await client.exchange_code(code, verifier)


async def test_a_slow_token_endpoint_is_provider_unavailable_after_the_timeout(
    op: HostileOp, http: aiohttp.ClientSession, clock: Clock
) -> None:
    client = OidcClient(settings_for(op, http_timeout=0.3), http, REDIRECT, clock=clock)
    code, verifier = await authorize_code(op, client, http)
    op.token_delay = 3600  # never answers in this test: only bff's own timeout can end the call
    with pytest.raises(ProviderUnavailable):
        async with asyncio.timeout(60):  # a guard against a hang, not a measurement
            await client.exchange_code(code, verifier)


async def test_an_unreachable_token_endpoint_is_provider_unavailable(
    op: HostileOp, client: OidcClient, http: aiohttp.ClientSession
) -> None:
    code, verifier = await authorize_code(op, client, http)
    await op.close()
    with pytest.raises(ProviderUnavailable):
        await client.exchange_code(code, verifier)


@pytest.mark.parametrize(
    ("error", "expected"),
    [("invalid_grant", InvalidGrant), ("invalid_client", TokenRequestRefused)],
)
async def test_token_endpoint_oauth_errors_map_to_their_exceptions(
    op: HostileOp,
    client: OidcClient,
    http: aiohttp.ClientSession,
    error: str,
    expected: type[Exception],
) -> None:
    code, verifier = await authorize_code(op, client, http)
    op.token_error = error
    with pytest.raises(expected):
        await client.exchange_code(code, verifier)


async def test_a_token_answer_nested_too_deeply_is_provider_unavailable_never_a_crash(
    op: HostileOp, client: OidcClient, http: aiohttp.ClientSession
) -> None:
    """json.loads raises RecursionError, not ValueError, on deep nesting: an OP (broken, or in
    the middle) must not turn a login or a refresh into a 500."""
    code, verifier = await authorize_code(op, client, http)
    op.token_raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ProviderUnavailable, match="other than JSON"):
        await client.exchange_code(code, verifier)
