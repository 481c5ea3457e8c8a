"""bff.dpop (RFC 9449): proofs, keys, nonces; and the hooks in config, sessions, oidc and headers.

The whole flow against the real OP and a validating upstream is in
``tests/integration/test_dpop.py``; these pin the details fast.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from joserfc import jws, jwt
from joserfc.jwk import ECKey, OKPKey
from multidict import CIMultiDict, CIMultiDictProxy

from bff import dpop
from bff.config import parse_settings
from bff.keys import new_secret, store_id
from bff.oidc import ProviderMetadata, TokenSet
from bff.proxy.headers import REQUEST_DROP, upstream_headers
from bff.sessions import Session, SessionData, SessionManager
from bff.store.memory import MemoryStore

TOKEN = "AT-0123456789-access-token-value"


def _decode(proof: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, the signature checked against the header's own jwk."""
    header = jws.extract_compact(proof.encode()).headers()
    cls = {"EC": ECKey, "OKP": OKPKey}[header["jwk"]["kty"]]
    key = cls.import_key(header["jwk"])
    return header, dict(jwt.decode(proof, key, algorithms=[header["alg"]]).claims)


def _session(jwk: dict[str, Any] | None) -> Session:
    secret = new_secret()
    data = SessionData(
        sub="alice",
        claims={},
        access_token=TOKEN,
        access_expires_at=None,
        refresh_token=None,
        id_token=None,
        scopes=("openid",),
        created_at=0.0,
        expires_at=1e12,
        dpop_jwk=jwk,
    )
    return Session(secret, store_id(secret), data, b"")


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "ES384"])
def test_a_proof_is_a_signed_dpop_jwt_with_the_public_key_only(alg: str) -> None:
    key = dpop.generate(alg)
    proof = dpop.proof(key, "POST", "https://api.example/v1/orders?x=1#frag", clock=lambda: 1000.0)
    header, claims = _decode(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == alg
    assert "d" not in header["jwk"]
    assert claims["htm"] == "POST"
    assert claims["htu"] == "https://api.example/v1/orders"  # RFC 9449 4.2: no query/fragment
    assert claims["iat"] == 1000
    assert "ath" not in claims and "nonce" not in claims


def test_a_proof_carries_ath_and_nonce_and_a_new_jti_every_time() -> None:
    key = dpop.generate("ES256")
    first = _decode(dpop.proof(key, "GET", "http://u/x", access_token=TOKEN, nonce="n-1"))[1]
    second = _decode(dpop.proof(key, "GET", "http://u/x", access_token=TOKEN))[1]
    digest = base64.urlsafe_b64encode(hashlib.sha256(TOKEN.encode()).digest()).rstrip(b"=")
    assert first["ath"] == second["ath"] == digest.decode()
    assert first["nonce"] == "n-1" and "nonce" not in second
    assert first["jti"] != second["jti"]


def test_the_alg_is_the_first_preferred_one_the_op_lists() -> None:
    assert dpop.choose_alg(["RS256", "EdDSA", "ES256"]) == "ES256"
    assert dpop.choose_alg(["RS256", "EdDSA"]) == "EdDSA"
    assert dpop.choose_alg(["HS256", "none"]) is None
    assert dpop.choose_alg([]) is None
    with pytest.raises(ValueError, match="cannot sign"):
        dpop.generate("HS256")


def test_a_key_goes_through_the_record_and_its_repr_shows_no_secret() -> None:
    key = dpop.generate("ES256")
    record = key.record()
    assert record["alg"] == "ES256" and "d" in record
    back = dpop.DpopKey.from_record(json.loads(json.dumps(record)))
    assert back.thumbprint() == key.thumbprint() and back.alg == "ES256"
    assert record["d"] not in repr(key) and key.thumbprint() in repr(key)
    proof = dpop.proof(back, "GET", "http://u/")
    assert _decode(proof)[0]["jwk"] == dict(key.public)


def test_the_sessions_key_is_built_once_and_rebuilt_only_for_another_key() -> None:
    record = dpop.generate("ES256").record()
    session = _session(record)
    first = dpop.session_key(session)
    assert first is not None and dpop.session_key(session) is first
    # The same session read again from the store (a new Session object): still the same object.
    again = dataclasses.replace(session, data=dataclasses.replace(session.data))
    assert dpop.session_key(again) is first
    other = dataclasses.replace(
        session, data=dataclasses.replace(session.data, dpop_jwk=dpop.generate("ES256").record())
    )
    rebuilt = dpop.session_key(other)
    assert rebuilt is not None and rebuilt.thumbprint() != first.thumbprint()
    assert dpop.session_key(_session(None)) is None


def test_a_record_without_a_dpop_key_still_loads_and_one_with_it_keeps_it_out_of_repr() -> None:
    session = _session(None)
    values = json.loads(session.data.to_bytes())
    del values["dpop_jwk"]  # a record written before DPoP existed
    assert SessionData.from_bytes(json.dumps(values).encode()).dpop_jwk is None
    record = dpop.generate("ES256").record()
    data = dataclasses.replace(session.data, dpop_jwk=record)
    assert SessionData.from_bytes(data.to_bytes()).dpop_jwk == record
    assert record["d"] not in repr(data)


def test_nonces_are_remembered_per_origin_and_bounded() -> None:
    nonces = dpop.Nonces()
    assert nonces.note("http://a", CIMultiDictProxy(CIMultiDict({"DPoP-Nonce": "n1"})))
    assert not nonces.note("http://a", {"DPoP-Nonce": "n1"})  # nothing new
    assert not nonces.note("http://a", {})
    assert not nonces.note("http://a", {"DPoP-Nonce": "x" * 2000})  # absurd: not kept
    assert nonces.get("http://a") == "n1" and nonces.get("http://b") is None
    for i in range(5000):
        nonces.note(f"http://h{i}", {"DPoP-Nonce": "n"})
    assert len(nonces._latest) <= 4096


def test_a_nonce_challenge_is_a_401_naming_use_dpop_nonce_with_a_nonce() -> None:
    challenge = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n"}
    assert dpop.is_nonce_challenge(401, challenge)
    assert not dpop.is_nonce_challenge(400, challenge)
    assert not dpop.is_nonce_challenge(401, {"WWW-Authenticate": challenge["WWW-Authenticate"]})
    assert not dpop.is_nonce_challenge(
        401, {"WWW-Authenticate": 'DPoP error="invalid_token"', "DPoP-Nonce": "n"}
    )


def test_the_token_response_must_say_dpop_when_dpop_was_asked_for() -> None:
    body = {"access_token": "a", "token_type": "DPoP", "expires_in": 60}
    assert TokenSet.parse(body, 0.0, dpop=True).token_type == "DPoP"
    with pytest.raises(ValueError, match="unsupported token_type"):
        TokenSet.parse(body, 0.0)  # not asked for: refused as before
    bearer = {**body, "token_type": "Bearer"}
    with pytest.raises(ValueError, match=r"DPoP-bound token was asked for.*'Bearer'"):
        TokenSet.parse(bearer, 0.0, dpop=True)
    assert TokenSet.parse({**body, "token_type": "dpop"}, 0.0, dpop=True).token_type == "DPoP"


def test_discovery_reads_the_ops_dpop_algorithms() -> None:
    doc = {
        "issuer": "https://op",
        "authorization_endpoint": "https://op/auth",
        "token_endpoint": "https://op/token",
        "jwks_uri": "https://op/jwks",
        "dpop_signing_alg_values_supported": ["ES256", 7, "EdDSA"],
    }
    assert ProviderMetadata.parse(doc, "https://op").dpop_algs == ("ES256", "EdDSA")
    del doc["dpop_signing_alg_values_supported"]
    assert ProviderMetadata.parse(doc, "https://op").dpop_algs == ()


def test_the_browsers_dpop_header_is_dropped_in_every_spelling() -> None:
    assert "dpop" in REQUEST_DROP
    request = make_mocked_request(
        "GET", "/api/x", headers=CIMultiDict([("DPoP", "forged"), ("dpop", "x"), ("A", "1")])
    )
    out = upstream_headers(request, REQUEST_DROP, (), (), None)
    assert [k for k, _ in out if k.lower() == "dpop"] == []
    assert ("A", "1") in out


def test_the_config_switch() -> None:
    base = """\
        public_url: https://app.example.com
        oidc:
          issuer: https://idp.example.com
          client_id: shop
          client_secret: s3cret
          {extra}
        keys: [k-0123456789abcdef0123456789abcdef]
        """
    off = parse_settings(textwrap.dedent(base.format(extra="")), "bff.yaml", {})
    on = parse_settings(textwrap.dedent(base.format(extra="dpop: true")), "bff.yaml", {})
    assert off.oidc.dpop is False and on.oidc.dpop is True


def test_the_readme_dpop_example_parses() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("### DPoP (sender-constrained tokens)")
    block = readme[readme.index("```yaml\n", start) + 8 : readme.index("```\n", start + 40)]
    text = "public_url: https://app.example.com\nkeys: [k-0123456789abcdef0123456789abcdef]\n"
    settings = parse_settings(text + block, "bff.yaml", {"OIDC_CLIENT_SECRET": "s"})
    assert settings.oidc.dpop is True
    assert settings.upstreams[0].token == "user"


async def test_an_ended_sessions_key_object_leaves_the_process() -> None:
    manager = SessionManager(MemoryStore(), idle_timeout=600, absolute_timeout=3600)
    data = dataclasses.replace(_session(None).data, dpop_jwk=dpop.generate("ES256").record())
    data.expires_at = time.time() + 3600
    session = await manager.create(data)
    assert dpop.session_key(session) is not None
    assert session.id in dpop._keys
    await manager.end(session)
    assert session.id not in dpop._keys
