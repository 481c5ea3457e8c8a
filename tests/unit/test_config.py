"""bff.config: loading, validation messages (with lines), env substitution, semantics."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from bff.config import (
    DEFAULT_CSP,
    REDACTED,
    ConfigError,
    CookieSettings,
    LimitSettings,
    Listen,
    LogSettings,
    MetricsSettings,
    OidcSettings,
    RateLimit,
    RateLimitSettings,
    RedisSettings,
    RedisTls,
    Secret,
    SecuritySettings,
    SessionSettings,
    Settings,
    ShutdownSettings,
    TracingSettings,
    Upstream,
    dump_redacted,
    is_loopback_host,
    load_settings,
    parse_duration,
    parse_settings,
)
from bff.redirects import is_local_path

KEY_A = "a" * 32
KEY_B = "b" * 40

# The example from docs/design.md, "Configuration (ops)", verbatim.
DESIGN_EXAMPLE = """\
public_url: https://app.example.com       # the origin the browser sees; redirect_uri derives from it
listen: {host: 0.0.0.0, port: 8080}       # `bff run --host/--port` override it
static: ./static                           # the SPA folder
oidc:
  issuer: https://idp.example.com/realms/main   # discovery at /.well-known/openid-configuration
  client_id: shop-bff
  client_secret: ${OIDC_CLIENT_SECRET}     # or private_key_jwt with a key file
  scopes: [openid, profile, email, offline_access, orders:read]
session:
  store: redis://127.0.0.1:6379/0          # or memory:// (one process only)
  cookie: {name: __Host-bff, same_site: strict, secure: true}   # false only for a loopback public_url (dev)
  idle_timeout: 8h
  absolute_timeout: 24h
keys: [${BFF_KEY_CURRENT}, ${BFF_KEY_PREVIOUS}]   # first signs and encrypts; the rest still read
upstreams:
  - path: /api/orders                      # prefix on the bff origin
    url: http://orders.internal:8080/v1    # where the call goes
    token: user                            # user | client (client credentials) | user_or_none | none
    scopes: [orders:read]                  # the session must hold these, else 403
    methods: [GET, POST]                   # anything else: 405
    timeout: 30s
    websocket: false
"""  # noqa: E501
DESIGN_ENV = {
    "OIDC_CLIENT_SECRET": "the-client-secret",
    "BFF_KEY_CURRENT": KEY_A,
    "BFF_KEY_PREVIOUS": KEY_B,
}

MINIMAL = f"""\
public_url: https://app.example.com
oidc:
  issuer: https://idp.example.com
  client_id: shop
  client_secret: s3cret
keys: [{KEY_A}]
"""


def parse(text: str, env: dict[str, str] | None = None, **kw: object) -> Settings:
    return parse_settings(textwrap.dedent(text), "bff.yaml", {} if env is None else env, **kw)  # type: ignore[arg-type]


def problems(text: str, env: dict[str, str] | None = None, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env, **kw)
    assert info.value.problems, "a ConfigError always lists at least one problem"
    return info.value.problems


def one_problem(text: str, env: dict[str, str] | None = None) -> str:
    found = problems(text, env)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------------------------------
# Valid configurations
# ---------------------------------------------------------------------------------------------


def test_design_doc_example_parses() -> None:
    s = parse_settings(DESIGN_EXAMPLE, "bff.yaml", DESIGN_ENV, base_dir="/srv/app")
    assert s.public_url == "https://app.example.com"
    assert s.listen == Listen(host="0.0.0.0", port=8080)
    assert s.static == Path("/srv/app/static")
    assert s.prefix == "/bff"
    assert s.dev is False
    assert s.oidc.issuer == "https://idp.example.com/realms/main"
    assert s.oidc.client_id == "shop-bff"
    assert s.oidc.client_secret is not None
    assert s.oidc.client_secret.get() == "the-client-secret"
    assert s.oidc.token_endpoint_auth_method == "client_secret_basic"
    assert s.oidc.scopes == ("openid", "profile", "email", "offline_access", "orders:read")
    assert s.session.store == "redis://127.0.0.1:6379/0"
    assert s.session.cookie == CookieSettings(name="__Host-bff", same_site="strict", secure=True)
    assert s.session.idle_timeout == 8 * 3600
    assert s.session.absolute_timeout == 24 * 3600
    assert [k.get() for k in s.keys] == [KEY_A, KEY_B]
    (up,) = s.upstreams
    assert up == Upstream(
        path="/api/orders",
        url="http://orders.internal:8080/v1",
        token="user",
        scopes=("orders:read",),
        methods=("GET", "POST"),
        timeout=30.0,
        websocket=False,
    )
    assert s.redirect_uri == "https://app.example.com/bff/callback"


def test_design_doc_example_from_a_file(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "bff.yaml"
    cfg.parent.mkdir()
    cfg.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    s = load_settings(cfg, DESIGN_ENV)
    assert s.static == cfg.parent / "static"
    assert s.static.is_absolute()


def test_defaults() -> None:
    s = parse(MINIMAL, base_dir="/etc/bff")
    assert s.listen == Listen(host="127.0.0.1", port=8080)
    assert s.static == Path("/etc/bff/static")
    assert s.prefix == "/bff"
    assert s.upstreams == ()
    assert s.security == SecuritySettings(content_security_policy=DEFAULT_CSP, hsts=True)
    assert "frame-ancestors 'none'" in s.security.content_security_policy
    assert s.log == LogSettings(level="info", format="json", access=True)
    assert s.shutdown == ShutdownSettings(drain=5.0, grace=25.0)
    assert s.dev is False
    o = s.oidc
    assert o.token_endpoint_auth_method == "client_secret_basic"
    assert o.private_key_file is None and o.private_key_kid is None
    assert o.scopes == ("openid", "profile", "email", "offline_access")
    assert o.id_token_algs == ("RS256", "PS256", "ES256", "EdDSA")
    assert dict(o.extra_auth_params) == {}
    assert (o.refresh_skew, o.clock_skew, o.http_timeout, o.jwks_refetch_interval) == (
        60.0,
        60.0,
        10.0,
        10.0,
    )
    assert o.post_logout_redirect == "/"
    assert o.logout_id_token_hint is False
    assert o.revocation_endpoint is None  # then discovery, then RFC 8414 metadata
    sess = s.session
    assert sess.store == "memory://"
    assert sess.cookie == CookieSettings(name="__Host-bff", same_site="strict", secure=True)
    assert (sess.idle_timeout, sess.absolute_timeout) == (8 * 3600, 24 * 3600)
    assert (sess.login_timeout, sess.cache_ttl) == (600.0, 1.0)
    assert sess.store_timeout == 0.5
    assert sess.redis == RedisSettings()
    assert sess.redis.tls == RedisTls(ca_file=None, cert_file=None, key_file=None)
    assert s.rate_limits == RateLimitSettings(
        enabled=True,
        login=RateLimit(per_second=5.0, burst=100),
        callback=RateLimit(per_second=5.0, burst=100),
        backchannel_logout=RateLimit(per_second=50.0, burst=1000),
    )
    assert s.metrics == MetricsSettings(listen=Listen(host="127.0.0.1", port=9464), public=False)
    assert s.tracing == TracingSettings(enabled=False, service_name="bff", trust_incoming=True)
    assert s.workers is None  # one per core, decided by `bff run`
    assert s.trusted_proxies == ()
    assert s.limits == LimitSettings(max_request_line=8190, max_header_size=8190, max_headers=100)


def test_dataclass_defaults_match_loader_defaults() -> None:
    s = parse(MINIMAL)
    assert s.metrics == MetricsSettings()
    assert s.limits == LimitSettings()
    assert s.tracing == TracingSettings()
    assert s.session == SessionSettings()
    assert s.log == LogSettings()
    assert s.shutdown == ShutdownSettings()
    assert s.security == SecuritySettings()
    assert s.rate_limits == RateLimitSettings()
    bare = OidcSettings(issuer="https://idp.example.com", client_id="shop")
    assert dataclasses.replace(s.oidc, client_secret=None) == bare


def test_upstream_defaults_and_normalisation() -> None:
    s = parse(
        MINIMAL
        + """\
upstreams:
  - path: /api
    url: https://api.internal/
  - path: /api/orders
    url: http://orders.internal:8080/v1
    token: client
    client_scopes: [orders.read]
    methods: [get, Post]
    remove_headers: [X-Debug, Accept-Language]
    set_headers: {X-Tenant: shop}
    timeout: 2m
    connect_timeout: 500ms
    websocket: true
"""
    )
    orders, api = s.upstreams  # longest path first
    assert api == Upstream(path="/api", url="https://api.internal")
    assert api.token == "user" and api.methods is None and api.timeout == 30.0
    assert api.connect_timeout == 5.0 and api.websocket is False
    assert api.scopes == () and api.client_scopes == () and dict(api.set_headers) == {}
    assert orders.methods == ("GET", "POST")
    assert orders.remove_headers == ("x-debug", "accept-language")
    assert dict(orders.set_headers) == {"X-Tenant": "shop"}
    assert (orders.timeout, orders.connect_timeout) == (120.0, 0.5)
    assert orders.token == "client" and orders.client_scopes == ("orders.read",)
    assert orders.websocket is True


def test_upstreams_sorted_longest_path_first() -> None:
    s = parse(
        MINIMAL
        + """\
upstreams:
  - {path: /a, url: http://a}
  - {path: /a/b/c, url: http://c}
  - {path: /zz, url: http://z}
  - {path: /a/b, url: http://b}
"""
    )
    assert [u.path for u in s.upstreams] == ["/a/b/c", "/a/b", "/zz", "/a"]
    # The invariant holds however Settings is built.
    again = dataclasses.replace(s, upstreams=tuple(reversed(s.upstreams)))
    assert [u.path for u in again.upstreams] == ["/a/b/c", "/a/b", "/zz", "/a"]


def test_settings_are_frozen() -> None:
    s = parse(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.public_url = "https://evil.example"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.session.cookie.secure = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.oidc.extra_auth_params["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("https://app.example.com/", "https://app.example.com"),
        ("https://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com:443/", "https://app.example.com"),
        ("https://app.example.com:8443", "https://app.example.com:8443"),
        ("http://localhost:3000/", "http://localhost:3000"),
        ("http://[::1]:3000", "http://[::1]:3000"),
    ],
)
def test_public_url_is_stored_as_an_origin(given: str, stored: str) -> None:
    text = MINIMAL.replace("https://app.example.com", given)
    assert parse(text).public_url == stored


@pytest.mark.parametrize(
    ("url", "dev"),
    [
        ("http://localhost:8080", True),
        ("http://127.0.0.1:8080", True),
        ("http://127.1.2.3", True),
        ("http://[::1]:8080", True),
        ("https://localhost:8443", False),
        ("https://app.example.com", False),
        ("https://10.0.0.1", False),
    ],
)
def test_dev_is_derived_from_public_url(url: str, dev: bool) -> None:
    assert parse(MINIMAL.replace("https://app.example.com", url)).dev is dev


@pytest.mark.parametrize("url", ["http://app.example.com", "http://10.0.0.1:8080", "http://[::2]"])
def test_public_url_off_loopback_must_be_https(url: str) -> None:
    # The cookie is Secure off loopback, and a browser never keeps a Secure cookie from http.
    msg = one_problem(MINIMAL.replace("https://app.example.com", url))
    assert msg == (
        "bff.yaml:1: public_url: must be https:// (http:// only on a loopback host, "
        "for development)"
    )


def test_a_route_scope_must_be_among_the_scopes_asked_for() -> None:
    text = MINIMAL + (
        "upstreams:\n"
        "  - {path: /api/a, url: http://a, scopes: [openid]}\n"
        "  - {path: /api/b, url: http://b, scopes: [orders:read, openid, orders:write]}\n"
    )
    msg = one_problem(text)
    assert msg == (
        "bff.yaml:9: upstreams[1].scopes: orders:read, orders:write not in oidc.scopes: bff "
        "asks the OP only for oidc.scopes, so every call to this route would answer 403; "
        "add them to oidc.scopes"
    )
    fixed = text.replace("keys:", "  scopes: [openid, orders:read, orders:write]\nkeys:")
    routes = {u.path: u.scopes for u in parse(fixed).upstreams}
    assert routes["/api/b"] == ("orders:read", "openid", "orders:write")


def test_the_readme_config_example_parses() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("2. Write `bff.yaml`")
    block = readme[readme.index("```yaml\n", start) + 8 : readme.index("```\n", start + 30)]
    s = parse_settings(block, "bff.yaml", DESIGN_ENV, base_dir="/srv/app")
    route = s.upstreams[0]
    assert route.scopes and set(route.scopes) <= set(s.oidc.scopes)  # not 403 on every call


@pytest.mark.parametrize(
    "bad",
    [
        "https://app.example.com/app",
        "https://app.example.com/?x=1",
        "https://app.example.com/#frag",
        "ftp://app.example.com",
        "app.example.com",
        "https://user:pw@app.example.com",
        "https://",
        "https://app.example.com:99999",
    ],
)
def test_public_url_must_be_an_origin(bad: str) -> None:
    msg = one_problem(MINIMAL.replace("https://app.example.com", bad))
    assert msg.startswith("bff.yaml:1: public_url: ")


def test_dev_config_with_plain_http_cookie() -> None:
    s = parse(
        MINIMAL.replace("https://app.example.com", "http://localhost:8080")
        + "session:\n  cookie: {name: bff-session, secure: false, same_site: lax}\n"
    )
    assert s.dev is True
    assert s.session.cookie == CookieSettings(name="bff-session", same_site="lax", secure=False)


def test_private_key_jwt(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "client.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    cfg = tmp_path / "bff.yaml"
    text = MINIMAL.replace(
        "  client_secret: s3cret\n",
        "  private_key_file: keys/client.pem\n  private_key_kid: k1\n",
    )
    cfg.write_text(text)
    s = load_settings(cfg, {})
    assert s.oidc.token_endpoint_auth_method == "private_key_jwt"
    assert s.oidc.private_key_file == tmp_path / "keys" / "client.pem"
    assert s.oidc.private_key_kid == "k1"
    assert s.oidc.client_secret is None


def test_extra_auth_params_and_misc_oidc() -> None:
    s = parse(
        MINIMAL.replace(
            "keys:",
            "  token_endpoint_auth_method: client_secret_post\n"
            "  extra_auth_params: {prompt: login, max_age: 3600}\n"
            "  id_token_algs: [ES384, PS256]\n"
            "  scopes: [openid, orders:read]\n"
            "  refresh_skew: 30s\n"
            "  clock_skew: 0\n"
            "  post_logout_redirect: /goodbye?from=logout\n"
            "  logout_id_token_hint: true\n"
            "keys:",
        )
    )
    o = s.oidc
    assert o.token_endpoint_auth_method == "client_secret_post"
    assert dict(o.extra_auth_params) == {"prompt": "login", "max_age": "3600"}
    assert o.id_token_algs == ("ES384", "PS256")
    assert o.scopes == ("openid", "orders:read")
    assert (o.refresh_skew, o.clock_skew) == (30.0, 0.0)
    assert o.post_logout_redirect == "/goodbye?from=logout"
    assert o.logout_id_token_hint is True


def test_x_keys_anchors_and_merge() -> None:
    s = parse(
        MINIMAL
        + """\
x-upstream-defaults: &defaults
  timeout: 10s
  token: user_or_none
  methods: [GET]
upstreams:
  - <<: *defaults
    path: /api/a
    url: http://a
  - <<: *defaults
    path: /api/b
    url: http://b
    token: none
"""
    )
    a, b = sorted(s.upstreams, key=lambda u: u.path)
    assert (a.timeout, a.token, a.methods) == (10.0, "user_or_none", ("GET",))
    assert (b.timeout, b.token) == (10.0, "none")


def test_parse_settings_base_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_settings(MINIMAL, env={}).static == tmp_path / "static"
    assert parse_settings(MINIMAL, "/opt/x/bff.yaml", {}).static == Path("/opt/x/static")
    text = MINIMAL + "static: /var/www\n"
    assert parse_settings(text, "/opt/x/bff.yaml", {}).static == Path("/var/www")


# ---------------------------------------------------------------------------------------------
# ${VAR} substitution
# ---------------------------------------------------------------------------------------------


def test_env_substitution_and_type_conversion() -> None:
    text = """\
public_url: ${PUBLIC_URL}
listen: {host: "${HOST:-0.0.0.0}", port: ${PORT}}
oidc:
  issuer: https://${IDP_HOST}/realms/main
  client_id: ${CLIENT_ID:-shop}
  client_secret: ${SECRET}
session:
  store: redis://:${REDIS_PW}@redis:6379/0
  cookie: {secure: ${SECURE:-true}}
  idle_timeout: ${IDLE}
  cache_ttl: ${CACHE_TTL:-}
keys: [${K1}, "${K2}"]
"""
    env = {
        "PUBLIC_URL": "https://app.example.com",
        "PORT": "9000",
        "IDP_HOST": "idp.example.com",
        "SECRET": "xyz",
        "REDIS_PW": "pw",
        "IDLE": "2h",
        "CACHE_TTL": "",
        "K1": KEY_A,
        "K2": KEY_B,
    }
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    # ${CACHE_TTL:-} with CACHE_TTL empty gives "", which is not a duration
    (msg,) = info.value.problems
    assert msg.startswith("bff.yaml:11: session.cache_ttl: expected a duration")
    s = parse(text, {**env, "CACHE_TTL": "0"})
    assert s.public_url == "https://app.example.com"
    assert s.listen == Listen(host="0.0.0.0", port=9000)
    assert s.oidc.issuer == "https://idp.example.com/realms/main"
    assert s.oidc.client_id == "shop"
    assert s.oidc.client_secret == Secret("xyz")
    assert s.session.store == "redis://:pw@redis:6379/0"
    assert s.session.cookie.secure is True
    assert s.session.idle_timeout == 7200.0
    assert s.session.cache_ttl == 0.0
    assert [k.get() for k in s.keys] == [KEY_A, KEY_B]


@pytest.mark.parametrize(("raw", "value"), [("false", False), ("no", False), ("True", True)])
def test_env_booleans(raw: str, value: bool) -> None:
    text = MINIMAL.replace("https://app.example.com", "http://localhost") + (
        "session:\n  cookie: {name: dev, secure: ${SECURE}}\n"
    )
    assert parse(text, {"SECURE": raw}).session.cookie.secure is value


def test_env_string_stays_a_string_even_if_it_looks_like_a_number() -> None:
    text = MINIMAL.replace("client_secret: s3cret", "client_secret: ${SECRET}")
    s = parse(text, {"SECRET": "0x1F"})
    assert s.oidc.client_secret == Secret("0x1F")
    text = MINIMAL.replace("client_id: shop", "client_id: ${ID}")
    assert parse(text, {"ID": "12345"}).oidc.client_id == "12345"


def test_env_values_are_not_reparsed_as_yaml_or_references() -> None:
    text = MINIMAL.replace("client_id: shop", "client_id: ${ID}")
    assert parse(text, {"ID": "a: b\n- c ${OTHER}"}).oidc.client_id == "a: b\n- c ${OTHER}"


def test_escaped_dollar_brace_is_literal() -> None:
    text = MINIMAL.replace("client_id: shop", 'client_id: "x$${NOT_A_VAR}"')
    assert parse(text).oidc.client_id == "x${NOT_A_VAR}"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFF_TEST_CLIENT_ID", "from-environ")
    text = MINIMAL.replace("client_id: shop", "client_id: ${BFF_TEST_CLIENT_ID}")
    assert parse_settings(text).oidc.client_id == "from-environ"
    assert os.environ["BFF_TEST_CLIENT_ID"] == "from-environ"


def test_missing_env_var_names_key_and_line() -> None:
    text = MINIMAL.replace("client_secret: s3cret", "client_secret: ${OIDC_CLIENT_SECRET}")
    msg = one_problem(text)
    assert msg.startswith("bff.yaml:5: oidc.client_secret: environment variable OIDC_CLIENT_SECRET")
    assert "not set" in msg


def test_missing_env_vars_all_reported() -> None:
    found = problems(DESIGN_EXAMPLE, {})
    assert len(found) == 3, found
    assert found[0].startswith("bff.yaml:7: oidc.client_secret: ")
    assert found[1].startswith("bff.yaml:14: keys[0]: ") and "BFF_KEY_CURRENT" in found[1]
    assert found[2].startswith("bff.yaml:14: keys[1]: ") and "BFF_KEY_PREVIOUS" in found[2]


def test_values_from_env_are_never_printed() -> None:
    leak = "hunter2-do-not-print"
    text = """\
public_url: ${URL}
listen: {port: ${PORT}}
oidc:
  issuer: ${ISSUER}
  client_id: shop
  client_secret: ${SECRET}
  post_logout_redirect: ${REDIRECT}
  id_token_algs: [RS256, "${ALG}", "HS${ALG}"]
  scopes: [openid, "${ALG} x"]
session:
  idle_timeout: ${IDLE}
  absolute_timeout: ${ABS}
  cache_ttl: ${ABS}
keys: [${KEY}]
prefix: ${PREFIX}
upstreams:
  - path: ${UP}
    url: http://a
    methods: ["${ALG} x"]
    remove_headers: ["${ALG} x"]
    timeout: ${PORT}
"""
    env = {
        "URL": f"https://{leak}.example.com/path",
        "PORT": leak,
        "ISSUER": f"http://{leak}.example.com",
        "SECRET": "",
        "REDIRECT": f"//{leak}",
        "IDLE": leak,
        "ABS": "10000",
        "KEY": leak,
        "ALG": leak,
        "PREFIX": f"/{leak}/",
        "UP": f"/{leak}/../x",
    }
    found = problems(text, env)
    assert len(found) == 16, found
    for msg in found:
        assert leak not in msg
    joined = "\n".join(found)
    assert "${PORT}" in joined and "(not shown)" in joined


def test_literal_secrets_are_never_printed() -> None:
    text = MINIMAL.replace(KEY_A, "short-but-secret-key") + "session: {store: 'ftp://u:pw@x'}\n"
    for msg in problems(text):
        assert "short-but-secret-key" not in msg
        assert "pw@" not in msg


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("${}", "invalid variable reference"),
        ("${1ABC}", "invalid variable reference"),
        ("${A B}", "invalid variable reference"),
        ('"${UNCLOSED"', "unterminated"),
        ('"${A:-${B}}"', "nested"),
    ],
)
def test_malformed_references(value: str, expect: str) -> None:
    msg = one_problem(MINIMAL.replace("client_id: shop", f"client_id: {value}"), {"A": "x"})
    assert msg.startswith("bff.yaml:4: oidc.client_id: ")
    assert expect in msg


# ---------------------------------------------------------------------------------------------
# Reading files and broken input: always ConfigError
# ---------------------------------------------------------------------------------------------


def test_nonexistent_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.yaml")
    assert info.value.problems == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bff.yaml"
    cfg.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    (msg,) = info.value.problems
    assert msg.startswith(f"{cfg}:7: not valid UTF-8")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "bff.yaml"
    cfg.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_settings(cfg, {}).oidc.client_id == "shop"


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    cfg = tmp_path / "bff.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, {})
    (msg,) = info.value.problems
    assert msg.startswith(f"{cfg}:1: ") and "empty" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bff.yaml"
    cfg.write_text(MINIMAL)
    cfg.chmod(0)
    try:
        if os.access(cfg, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ConfigError, match="permission denied"):
            load_settings(cfg)
    finally:
        cfg.chmod(0o600)


@pytest.mark.parametrize(
    ("text", "line", "expect"),
    [
        ("- a\n- b\n", 1, "got a list"),
        ("just a string\n", 1, "got a single value"),
        ("public_url: [unclosed\n", 2, "invalid YAML"),
        ("a: 1\nb: c: d\n", 2, "invalid YAML"),
        ("a: 1\n\tb: 2\n", 2, "invalid YAML"),
        ("a: 1\n---\nb: 2\n", 2, "invalid YAML"),
        ("a: *undefined\n", 1, "invalid YAML"),
        ("a: 1\nb: '\x00'\n", 2, "invalid YAML"),
        ('a: "unterminated\n', 2, "invalid YAML"),
    ],
)
def test_broken_yaml_is_a_config_error_with_a_line(text: str, line: int, expect: str) -> None:
    msg = one_problem(text)
    assert msg.startswith(f"bff.yaml:{line}: "), msg
    assert expect in msg


def test_yaml_error_does_not_echo_the_line() -> None:
    text = MINIMAL + "oidc_extra: [ secret-looking-value\n"
    msg = one_problem(text)
    assert "secret-looking-value" not in msg


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object/apply:os.system ['true']\n",
        "a: !!binary aGk=\n",
        "a: !custom x\n",
        "a: !!set {x, y}\n",
    ],
)
def test_unsafe_or_unknown_tags_refused(text: str) -> None:
    found = problems(MINIMAL + text)
    assert any("unsupported YAML tag" in m and m.startswith("bff.yaml:7: a:") for m in found)


def test_alias_bomb_and_alias_loop() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert any("too many nodes" in m for m in problems(bomb))
    assert any("nested too deeply" in m for m in problems("a: &x [*x]\n"))


def test_duplicate_keys() -> None:
    msg = one_problem(MINIMAL + "prefix: /a\nprefix: /b\n")
    assert msg == "bff.yaml:8: prefix: duplicate key (first given on line 7)"


def test_non_string_keys() -> None:
    found = problems(MINIMAL + "? [a, b]\n: 1\n")
    assert any("mapping keys must be plain strings" in m for m in found)


def test_truncated_configs_only_ever_raise_config_error() -> None:
    text = DESIGN_EXAMPLE + "x-junk: {a: [1, 2, {b: c}], 'q': \"\\u00e9\"}\n"
    for end in range(len(text)):
        try:
            parse_settings(text[:end], "bff.yaml", DESIGN_ENV)
        except ConfigError as e:
            assert e.problems
            assert all(p.startswith("bff.yaml") for p in e.problems)


@pytest.mark.parametrize(
    "text",
    [
        "oidc: null\n",
        "oidc: [1]\n",
        "upstreams: {a: b}\n",
        "upstreams: [1, [2], null]\n",
        "keys: null\n",
        "session: 7\n",
        "session: {cookie: [x]}\n",
        "listen: {port: .inf}\n",
        "listen: {port: 1.5}\n",
        "oidc: {scopes: {a: 1}}\n",
        "oidc: {extra_auth_params: [a]}\n",
        "static: {a: b}\n",
        "upstreams: [{path: [/a], url: {x: 1}}]\n",
        "public_url: 12\n",
        "security: {hsts: yes please}\n",
        "~: ~\n",
        "1: 2\n",
    ],
)
def test_wrong_shapes_only_raise_config_error(text: str) -> None:
    problems(text)
    problems(MINIMAL + text.replace("oidc:", "oidc_:"))


# ---------------------------------------------------------------------------------------------
# Messages: lines, paths, several at once
# ---------------------------------------------------------------------------------------------


def test_spec_example_message() -> None:
    text = MINIMAL + "upstreams:\n  - path: /api\n    url: http://api\n    timeout: soon\n"
    assert one_problem(text) == (
        "bff.yaml:10: upstreams[0].timeout: expected a duration like 30s, 5m, 8h, got 'soon'"
    )


def test_several_problems_at_once_each_with_its_line() -> None:
    text = """\
public_url: https://app.example.com/x
listen:
  port: eighty
oidc:
  issuer: http://idp.example.com
  client_id: shop
  client_secret: s3cret
  id_token_algs: [RS256, HS256]
  post_logout_redirect: //evil.example
session:
  cookie: {secure: false}
  idle_timeout: 48h
keys: [short]
upstreams:
  - path: /api/../admin
    url: http://api
  - path: /orders
    url: http://orders
    timeout: soon
  - path: /orders
    url: http://orders2
"""
    found = problems(text)
    by_line = {int(m.split(":")[1]): m for m in found}
    assert sorted(by_line) == [1, 3, 5, 8, 9, 11, 12, 13, 15, 19, 20], found
    assert "public_url" in by_line[1]
    assert "listen.port: expected an integer, got 'eighty'" in by_line[3]
    assert "oidc.issuer" in by_line[5]
    assert "oidc.id_token_algs[1]" in by_line[8]
    assert "oidc.post_logout_redirect" in by_line[9]
    assert "session.cookie" in by_line[11]
    assert "idle_timeout (2d) must not exceed absolute_timeout (1d)" in by_line[12]
    assert "keys[0]: must be at least 32 characters" in by_line[13]
    assert "upstreams[0].path" in by_line[15]
    assert "upstreams[2].timeout" not in by_line[19] and "upstreams[1].timeout" in by_line[19]
    assert "upstreams[2].path: duplicate path (same as upstreams[1].path)" in by_line[20]
    assert found == sorted(found, key=lambda m: int(m.split(":")[1]))


def test_config_error_str_has_one_problem_per_line() -> None:
    text = MINIMAL + "listen: {port: x, host: 7}\n"
    with pytest.raises(ConfigError) as info:
        parse(text)
    err = info.value
    assert len(err.problems) == 2
    assert str(err).splitlines() == err.problems
    assert isinstance(err, Exception)


def test_missing_required_keys_name_the_parent_line() -> None:
    text = f"""\
# a comment first
public_url: https://app.example.com
keys: [{KEY_A}]
upstreams:
  - url: http://x
oidc:
  client_secret: x
"""
    found = problems(text)
    assert "bff.yaml:6: oidc.issuer: required key is missing" in found
    assert "bff.yaml:6: oidc.client_id: required key is missing" in found
    assert "bff.yaml:5: upstreams[0].path: required key is missing" in found
    assert len(found) == 3, found


def test_missing_top_level_keys() -> None:
    found = problems("\n\nlisten: {port: 1}\n")
    assert found == [
        "bff.yaml:3: public_url: required key is missing",
        "bff.yaml:3: oidc: required key is missing",
        "bff.yaml:3: keys: required key is missing",
    ]


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ("upstream: []\n", "bff.yaml:7: upstream: unknown key; did you mean 'upstreams'?"),
        ("secrity: {}\n", "bff.yaml:7: secrity: unknown key; did you mean 'security'?"),
        ("client_id: x\n", "bff.yaml:7: client_id: unknown key; did you mean oidc.client_id?"),
        (
            "session: {idle_timout: 1h}\n",
            "bff.yaml:7: session.idle_timout: unknown key; did you mean 'idle_timeout'?",
        ),
        (
            "session:\n  cookie:\n    samesite: lax\n",
            "bff.yaml:9: session.cookie.samesite: unknown key; did you mean 'same_site'?",
        ),
        (
            "upstreams:\n  - path: /a\n    url: http://a\n    websockets: true\n",
            "bff.yaml:10: upstreams[0].websockets: unknown key; did you mean 'websocket'?",
        ),
        (
            "zzz: 1\n",
            "bff.yaml:7: zzz: unknown key (top-level keys starting with 'x-' are ignored)",
        ),
    ],
)
def test_unknown_keys_are_errors_with_suggestions(extra: str, expect: str) -> None:
    assert one_problem(MINIMAL + extra) == expect


def test_unknown_key_inside_oidc() -> None:
    text = MINIMAL.replace("client_id: shop", "client_id: shop\n  clinet_secret: x")
    assert one_problem(text) == (
        "bff.yaml:5: oidc.clinet_secret: unknown key; did you mean 'client_secret'?"
    )


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ("listen: {port: '8080'}\n", "listen.port: expected an integer, got '8080'"),
        ("listen: {port: 70000}\n", "listen.port: must be at most 65535, got 70000"),
        ("listen: [1]\n", "listen: expected a mapping, got a list"),
        ("static: 5\n", "static: expected a string, got 5"),
        ("security: {hsts: 'maybe'}\n", "security.hsts: expected true or false, got 'maybe'"),
        (
            "session: {cookie: {secure: 1}}\n",
            "session.cookie.secure: expected true or false, got 1",
        ),
        ("upstreams: {}\n", "upstreams: expected a list, got a mapping"),
        ("log: {level: verbose}\n", "log.level: expected one of 'debug', 'info', 'warning',"),
        ("log: {format: jsn}\n", "did you mean 'json'?"),
        (
            "session: {cookie: {name: 'bad name'}}\n",
            "session.cookie.name: expected a cookie name",
        ),
        ("keys: []\n", None),
    ],
)
def test_wrong_types(extra: str, expect: str | None) -> None:
    if extra.startswith("keys:"):
        msg = one_problem(MINIMAL.replace(f"keys: [{KEY_A}]\n", "") + extra)
        assert msg == "bff.yaml:6: keys: must not be empty"
        return
    msg = one_problem(MINIMAL + extra)
    assert msg.startswith("bff.yaml:7: ")
    assert expect is not None and expect in msg, msg


def test_wrong_type_scopes_string_instead_of_list() -> None:
    text = MINIMAL.replace("keys:", "  scopes: openid profile\nkeys:")
    assert one_problem(text) == "bff.yaml:6: oidc.scopes: expected a list, got 'openid profile'"


def test_null_is_refused_where_a_value_is_needed() -> None:
    msg = one_problem(MINIMAL + "upstreams:\n")
    assert msg == "bff.yaml:7: upstreams: expected a list, got null"


def test_client_secret_may_be_null_with_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    text = MINIMAL.replace("client_secret: s3cret", f"client_secret: ~\n  private_key_file: {key}")
    s = parse(text)
    assert s.oidc.client_secret is None
    assert s.oidc.token_endpoint_auth_method == "private_key_jwt"


# ---------------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("8h", 28800.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("30", 30.0),
        (" 10s ", 10.0),
        (90, 90.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration(raw: str | float, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(
    "raw", ["soon", "-5s", "5 minutes", "10x", "1h30m", "", "s", True, -1, float("inf"), "1e3"]
)
def test_parse_duration_refuses(raw: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize(
    "value", ["soon", "-5s", "5 minutes", "10x", "true", "-1", "[1]", "''", "1h30m"]
)
def test_bad_durations_in_config(value: str) -> None:
    msg = one_problem(MINIMAL + f"session: {{login_timeout: {value}}}\n")
    assert msg.startswith("bff.yaml:7: session.login_timeout: expected a duration like 30s")


def test_non_finite_duration() -> None:
    msg = one_problem(MINIMAL + "session: {login_timeout: .inf}\n")
    assert msg.startswith("bff.yaml:7: session.login_timeout: ")


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("login_timeout", "0s", "must be longer than 0s"),
        ("idle_timeout", "0", "must be longer than 0s"),
        ("cache_ttl", "6s", "must be between 0s and 5s"),
        ("idle_timeout", "25h", "must not exceed absolute_timeout"),
    ],
)
def test_duration_ranges(key: str, value: str, expect: str) -> None:
    msg = one_problem(MINIMAL + f"session: {{{key}: {value}}}\n")
    assert msg.startswith(f"bff.yaml:7: session.{key}: ")
    assert expect in msg


def test_limits_are_read() -> None:
    s = parse(
        MINIMAL + "limits: {max_request_line: 1024, max_header_size: 4096, max_headers: 20}\n"
    )
    assert s.limits == LimitSettings(max_request_line=1024, max_header_size=4096, max_headers=20)
    env = {"LINE": "2048"}
    assert (
        parse(MINIMAL + "limits: {max_request_line: ${LINE}}\n", env).limits.max_request_line
        == 2048
    )


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("{max_request_line: 100}", "limits.max_request_line: "),
        ("{max_header_size: 100000}", "limits.max_header_size: "),
        ("{max_headers: 2}", "limits.max_headers: "),
        ("{max_headers: many}", "limits.max_headers: "),
        ("{max_header: 10}", "limits.max_header: unknown key; did you mean"),
    ],
)
def test_limits_out_of_range_are_refused(value: str, expect: str) -> None:
    assert one_problem(MINIMAL + f"limits: {value}\n").startswith(f"bff.yaml:7: {expect}")


def test_cache_ttl_bounds_accepted() -> None:
    assert parse(MINIMAL + "session: {cache_ttl: 0}\n").session.cache_ttl == 0.0
    assert parse(MINIMAL + "session: {cache_ttl: 5s}\n").session.cache_ttl == 5.0
    s = parse(MINIMAL + "session: {idle_timeout: 1h, absolute_timeout: 1h}\n")
    assert s.session.idle_timeout == s.session.absolute_timeout == 3600.0


# ---------------------------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer", ["http://idp.example.com", "http://10.1.2.3/realms/x", "http://localhost.evil.com"]
)
def test_http_issuer_refused_unless_loopback(issuer: str) -> None:
    msg = one_problem(MINIMAL.replace("https://idp.example.com", issuer))
    assert msg.startswith("bff.yaml:3: oidc.issuer: must be https://")


@pytest.mark.parametrize(
    "issuer", ["http://localhost:9000", "http://127.0.0.1:9000/oidc", "http://[::1]:9000"]
)
def test_http_issuer_on_loopback_allowed(issuer: str) -> None:
    assert parse(MINIMAL.replace("https://idp.example.com", issuer)).oidc.issuer == issuer


def test_issuer_kept_verbatim() -> None:
    text = MINIMAL.replace("https://idp.example.com", "https://IdP.example.com/realms/main/")
    assert parse(text).oidc.issuer == "https://IdP.example.com/realms/main/"


@pytest.mark.parametrize("bad", ["idp.example.com", "https://idp.example.com?x=1", "ftp://idp"])
def test_issuer_must_be_a_url(bad: str) -> None:
    assert one_problem(MINIMAL.replace("https://idp.example.com", bad)).startswith(
        "bff.yaml:3: oidc.issuer: "
    )


def test_cookie_secure_false_refused_outside_dev() -> None:
    msg = one_problem(MINIMAL + "session:\n  cookie: {name: bff-session, secure: false}\n")
    assert msg.startswith("bff.yaml:8: session.cookie.secure: false is only allowed")
    assert "loopback" in msg


def test_cookie_secure_false_refused_for_https_localhost() -> None:
    text = MINIMAL.replace("https://app.example.com", "https://localhost:8443")
    msg = one_problem(text + "session:\n  cookie: {name: bff-session, secure: false}\n")
    assert "session.cookie.secure" in msg


@pytest.mark.parametrize("name", [None, "__Host-bff", "__Secure-bff"])
def test_host_prefixed_cookie_requires_secure(name: str | None) -> None:
    text = MINIMAL.replace("https://app.example.com", "http://localhost:8080")
    cookie = "{secure: false}" if name is None else f"{{name: {name}, secure: false}}"
    msg = one_problem(text + f"session:\n  cookie: {cookie}\n")
    assert msg.startswith("bff.yaml:8: session.cookie.")
    assert "bff-session" in msg and "Secure" in msg


@pytest.mark.parametrize("value", ["none", "None", "NONE"])
def test_same_site_none_refused(value: str) -> None:
    msg = one_problem(MINIMAL + f"session:\n  cookie: {{same_site: {value}}}\n")
    assert msg.startswith("bff.yaml:8: session.cookie.same_site: ")


def test_same_site_other_values_refused_with_suggestion() -> None:
    msg = one_problem(MINIMAL + "session:\n  cookie: {same_site: strikt}\n")
    assert "did you mean 'strict'?" in msg


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "hs256", "none", "None"])
def test_hmac_and_none_id_token_algs_refused(alg: str) -> None:
    text = MINIMAL.replace("keys:", f"  id_token_algs: [RS256, {alg}]\nkeys:")
    msg = one_problem(text)
    assert msg.startswith("bff.yaml:6: oidc.id_token_algs[1]: ")


def test_unknown_id_token_alg_with_suggestion() -> None:
    msg = one_problem(MINIMAL.replace("keys:", "  id_token_algs: [ES265]\nkeys:"))
    assert "did you mean 'ES256'?" in msg


def test_id_token_algs_must_not_be_empty() -> None:
    msg = one_problem(MINIMAL.replace("keys:", "  id_token_algs: []\nkeys:"))
    assert msg == "bff.yaml:6: oidc.id_token_algs: must not be empty"


def test_scopes_must_contain_openid() -> None:
    msg = one_problem(MINIMAL.replace("keys:", "  scopes: [profile, email]\nkeys:"))
    assert msg == "bff.yaml:6: oidc.scopes: must contain 'openid'"


def test_scopes_duplicates_and_bad_characters() -> None:
    found = problems(MINIMAL.replace("keys:", '  scopes: [openid, openid, "a b"]\nkeys:'))
    assert len(found) == 2, found
    assert any("oidc.scopes[1]: duplicate scope" in m for m in found)
    assert any("oidc.scopes[2]: not a valid scope" in m for m in found)


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example",
        "'/\\evil.example'",
        '"/\\\\evil.example"',
        "https://evil.example",
        "'javascript:alert(1)'",
        "evil",
        "'/\\t/evil'",
        '"/\\t/evil"',
        '"/x\\ny"',
        '"/x\\u0000"',
        "' /'",
        "'///evil'",
        "'\\\\evil'",
    ],
)
def test_bad_post_logout_redirect_refused(value: str) -> None:
    msg = one_problem(MINIMAL.replace("keys:", f"  post_logout_redirect: {value}\nkeys:"))
    assert msg.startswith("bff.yaml:6: oidc.post_logout_redirect: must be a same-origin path")


def test_revocation_endpoint_is_taken_verbatim() -> None:
    text = MINIMAL.replace(
        "keys:", "  revocation_endpoint: https://idp.example.com/oauth2/revoke\nkeys:"
    )
    assert parse(text).oidc.revocation_endpoint == "https://idp.example.com/oauth2/revoke"


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("http://idp.example.com/revoke", "must be https://"),
        ("https://idp.example.com/revoke?x=1", "must not have a query"),
        ("idp.example.com/revoke", "expected a URL"),
        ("''", "oidc.revocation_endpoint"),
    ],
)
def test_bad_revocation_endpoint_refused(value: str, expect: str) -> None:
    msg = one_problem(MINIMAL.replace("keys:", f"  revocation_endpoint: {value}\nkeys:"))
    assert msg.startswith("bff.yaml:6: oidc.revocation_endpoint: ")
    assert expect in msg


@pytest.mark.parametrize("value", ["/", "/bye", "/bye?x=1#y", "/a/b/"])
def test_good_post_logout_redirect(value: str) -> None:
    text = MINIMAL.replace("keys:", f"  post_logout_redirect: '{value}'\nkeys:")
    assert parse(text).oidc.post_logout_redirect == value


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("/", True),
        ("/a?b=//c", True),
        ("//evil", False),
        ("/\\evil", False),
        ("https://evil", False),
        ("javascript:alert(1)", False),
        ("/\t/evil", False),
        ("/\x7f", False),
        ("/\u0085", False),
        ("", False),
    ],
)
def test_is_safe_relative_path(value: str, ok: bool) -> None:
    assert is_local_path(value) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost.example.com", False),
        ("10.0.0.1", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback_host(host: str | None, ok: bool) -> None:
    assert is_loopback_host(host) is ok


def test_client_authentication_is_required() -> None:
    msg = one_problem(MINIMAL.replace("  client_secret: s3cret\n", ""))
    assert msg.startswith("bff.yaml:2: oidc: no client authentication")


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ("  token_endpoint_auth_method: private_key_jwt\n", "private_key_jwt needs"),
        ("  token_endpoint_auth_method: client_secret_jwt\n", "expected one of"),
    ],
)
def test_auth_method_without_its_credential(config: str, expect: str) -> None:
    msg = one_problem(MINIMAL.replace("keys:", config + "keys:"))
    assert msg.startswith("bff.yaml:6: oidc.token_endpoint_auth_method: ")
    assert expect in msg


def test_secret_method_without_secret(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    text = MINIMAL.replace(
        "client_secret: s3cret",
        f"private_key_file: {key}\n  token_endpoint_auth_method: client_secret_post",
    )
    msg = one_problem(text)
    assert msg == (
        "bff.yaml:6: oidc.token_endpoint_auth_method: client_secret_post needs oidc.client_secret"
    )


def test_private_key_file_must_exist_and_be_a_file(tmp_path: Path) -> None:
    text = MINIMAL.replace("client_secret: s3cret", "private_key_file: missing.pem")
    found = problems(text, base_dir=tmp_path)
    assert found == [f"bff.yaml:5: oidc.private_key_file: no such file: {tmp_path / 'missing.pem'}"]
    text = MINIMAL.replace("client_secret: s3cret", "private_key_file: .")
    (msg,) = problems(text, base_dir=tmp_path)
    assert "not a regular file" in msg


def test_extra_auth_params_cannot_override_protocol_params() -> None:
    text = MINIMAL.replace("keys:", "  extra_auth_params: {state: x, prompt: login}\nkeys:")
    msg = one_problem(text)
    assert msg.startswith("bff.yaml:6: oidc.extra_auth_params.state: ")


@pytest.mark.parametrize(
    "store",
    [
        "memory://",
        "redis://localhost",
        "redis://:pw@r:6379/2",
        "rediss://r:6380/0",
        "unix:///run/r.sock",
        "redis+sentinel://s1:26379,s2,s3:26380/mymaster",
        "redis+sentinel://bff:pw@s1/mymaster/2",
        "rediss+sentinel://[::1]:26379/m",
        "redis+cluster://n1:7000,n2:7001",
        "rediss+cluster://u:p@n1/0",
    ],
)
def test_good_stores(store: str) -> None:
    assert parse(MINIMAL + f"session: {{store: '{store}'}}\n").session.store == store


@pytest.mark.parametrize(
    "store",
    [
        "memory",
        "redis://",
        "postgres://db",
        "unix://",
        "memory://x",
        "redis+sentinel://s1,s2",  # no master name
        "redis+sentinel://s1/m/x",  # db not a number
        "redis+sentinel://s1:x/m",  # bad port
        "redis+cluster://n1,,n2",  # an empty node
        "redis+cluster://n1/3",  # a cluster has db 0 only
        "redis+cluster://n1?timeout=1",
    ],
)
def test_bad_stores(store: str) -> None:
    msg = one_problem(MINIMAL + f"session: {{store: '{store}'}}\n")
    assert msg.startswith("bff.yaml:7: session.store: ")


def test_keys_rules() -> None:
    found = problems(MINIMAL.replace(f"[{KEY_A}]", f"[{KEY_A}, {KEY_B}, {KEY_A}, short]"))
    assert sorted(found) == [
        "bff.yaml:6: keys[2]: duplicate key (same as keys[0])",
        "bff.yaml:6: keys[3]: must be at least 32 characters",
    ]
    for msg in found:
        assert KEY_A not in msg and "short" not in msg


def test_keys_missing() -> None:
    msg = one_problem(MINIMAL.replace(f"keys: [{KEY_A}]\n", ""))
    assert msg == "bff.yaml:1: keys: required key is missing"


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("/bff", True),
        ("/auth/bff", True),
        ("bff", False),
        ("/bff/", False),
        ("/", False),
        ("/a/../b", False),
    ],
)
def test_prefix_rules(prefix: str, ok: bool) -> None:
    text = MINIMAL + f"prefix: '{prefix}'\n"
    if ok:
        assert parse(text).prefix == prefix
    else:
        assert one_problem(text).startswith("bff.yaml:7: prefix: ")


@pytest.mark.parametrize(
    ("path", "expect"),
    [
        ("api", "must start with '/'"),
        ("/api/", "must not end with '/'"),
        ("/", "must not be '/' alone"),
        ("/api/../admin", "'..'"),
        ("/api/./x", "'.'"),
        ("/..", "'..'"),
        ("/a//b", "'//'"),
        ("/a%2e%2e", "no %"),
        ("/a\\b", "no %"),
        ("/a b", "no %"),
        ("/a?x", "no %"),
        ("/bff", "overlaps the bff endpoint prefix"),
        ("/bff/api", "overlaps the bff endpoint prefix"),
    ],
)
def test_bad_upstream_paths(path: str, expect: str) -> None:
    text = MINIMAL + f"upstreams:\n  - path: '{path}'\n    url: http://api\n"
    msg = one_problem(text)
    assert msg.startswith("bff.yaml:8: upstreams[0].path: ")
    assert expect in msg


def test_upstream_path_near_the_prefix_is_fine() -> None:
    text = (
        MINIMAL
        + "upstreams:\n  - {path: /bffx, url: 'http://a'}\n  - {path: /b, url: 'http://b'}\n"
    )
    assert [u.path for u in parse(text).upstreams] == ["/bffx", "/b"]


def test_upstream_containing_the_prefix_is_refused() -> None:
    text = MINIMAL + "prefix: /api/bff\nupstreams:\n  - {path: /api, url: 'http://a'}\n"
    assert "overlaps" in one_problem(text)


def test_duplicate_upstream_paths() -> None:
    text = (
        MINIMAL + "upstreams:\n  - {path: /a, url: 'http://a'}\n  - {path: /a, url: 'http://b'}\n"
    )
    assert one_problem(text) == (
        "bff.yaml:9: upstreams[1].path: duplicate path (same as upstreams[0].path)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "api.internal",
        "http://",
        "http://u:p@x",
        "http://x/#f",
        "http://x?q=1",
        "http://x:0x",
    ],
)
def test_bad_upstream_urls(url: str) -> None:
    msg = one_problem(MINIMAL + f"upstreams:\n  - path: /a\n    url: '{url}'\n")
    assert msg.startswith("bff.yaml:9: upstreams[0].url: ")


@pytest.mark.parametrize(
    "url", ["ws://chat.internal/ws", "wss://chat.internal", "https://x:8443/v1/"]
)
def test_good_upstream_urls(url: str) -> None:
    s = parse(MINIMAL + f"upstreams:\n  - path: /a\n    url: '{url}'\n    websocket: true\n")
    assert s.upstreams[0].url == url.rstrip("/")


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ("    methods: []\n", "upstreams[0].methods: must not be empty"),
        ("    methods: [GET, get]\n", "upstreams[0].methods[1]: duplicate method"),
        ("    methods: ['GE T']\n", "not an HTTP method"),
        ("    set_headers: {Authorization: x}\n", "Authorization is managed by bff"),
        ("    set_headers: {Cookie: x}\n", "Cookie is managed by bff"),
        ("    set_headers: {'Bad Name': x}\n", "not a valid header name"),
        ('    set_headers: {X-A: "a\\r\\nX-Evil: 1"}\n', "line breaks"),
        ("    set_headers: {X-A: 1}\n", "expected a string"),
        ("    remove_headers: ['bad header']\n", "not a valid header name"),
        ("    client_scopes: [a]\n", "only used with token: client"),
        ("    token: bearer\n", "expected one of 'user', 'client', 'user_or_none', 'none'"),
        ("    timeout: 0s\n", "must be longer than 0s"),
    ],
)
def test_upstream_field_rules(extra: str, expect: str) -> None:
    msg = one_problem(MINIMAL + "upstreams:\n  - path: /a\n    url: http://a\n" + extra)
    assert msg.startswith("bff.yaml:10: upstreams[0].")
    assert expect in msg


def test_csp_must_be_one_header_line() -> None:
    msg = one_problem(MINIMAL + 'security: {content_security_policy: "a\\nb"}\n')
    assert msg.startswith("bff.yaml:7: security.content_security_policy: ")


# ---------------------------------------------------------------------------------------------
# Secret and dump_redacted
# ---------------------------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    s = Secret("hunter2")
    assert s.get() == "hunter2"
    assert repr(s) == "Secret('**********')"
    assert str(s) == REDACTED == "**********"
    assert f"{s}" == REDACTED and f"{s:>12}" == f"{REDACTED:>12}"
    assert "%s" % s == REDACTED  # noqa: UP031
    assert "hunter2" not in repr([s, {"k": s}])
    assert s == Secret("hunter2") and s != Secret("other") and s != "hunter2"
    assert hash(s) == hash(Secret("hunter2"))
    with pytest.raises(AttributeError):
        s._value = "x"
    with pytest.raises(TypeError):
        "x" + s  # type: ignore[operator]
    with pytest.raises(TypeError):
        json.dumps(s)
    with pytest.raises(TypeError):
        Secret(5)  # type: ignore[arg-type]


def test_settings_repr_hides_secrets() -> None:
    s = parse_settings(DESIGN_EXAMPLE, "bff.yaml", DESIGN_ENV)
    text = repr(s)
    assert "the-client-secret" not in text and KEY_A not in text and KEY_B not in text


def test_dump_redacted() -> None:
    text = DESIGN_EXAMPLE.replace(
        "redis://127.0.0.1:6379/0", "redis://user:redispw@127.0.0.1:6379/0"
    ).replace(
        "    websocket: false\n", "    websocket: false\n    set_headers: {X-Api-Key: apikey123}\n"
    )
    s = parse_settings(text, "bff.yaml", DESIGN_ENV, base_dir="/srv")
    out = dump_redacted(s)
    dumped = json.dumps(out)  # JSON-ready
    for secret in ("the-client-secret", KEY_A, KEY_B, "redispw", "apikey123"):
        assert secret not in dumped
    assert out["oidc"]["client_secret"] == REDACTED
    assert out["keys"] == [REDACTED, REDACTED]
    assert out["session"]["store"] == f"redis://user:{REDACTED}@127.0.0.1:6379/0"
    assert out["upstreams"][0]["set_headers"] == {"X-Api-Key": REDACTED}
    assert out["upstreams"][0]["methods"] == ["GET", "POST"]
    assert out["static"] == "/srv/static"
    assert out["dev"] is False
    assert out["session"]["idle_timeout"] == 28800.0
    assert out["oidc"]["private_key_file"] is None


def test_problem_lines_are_sorted_and_unique() -> None:
    text = MINIMAL + "listen: {port: x, host: 7}\nlog: {level: x}\n"
    found = problems(text)
    assert len(found) == len(set(found)) == 3
    assert [int(re.match(r"bff\.yaml:(\d+):", m).group(1)) for m in found] == [7, 7, 8]  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# rate_limits (issue 9, point 9)


def test_rate_limits_override_only_what_is_given() -> None:
    s = parse(
        MINIMAL
        + "rate_limits:\n"
        + "  login: {per_second: 0.5, burst: 20}\n"
        + "  backchannel_logout: {burst: 5}\n"
    )
    assert s.rate_limits == RateLimitSettings(
        login=RateLimit(per_second=0.5, burst=20),
        backchannel_logout=RateLimit(per_second=50.0, burst=5),
    )
    assert parse(MINIMAL + "rate_limits: {enabled: false}\n").rate_limits.enabled is False


def test_rate_limits_from_the_environment() -> None:
    env = {"RATE": "2.5", "BURST": "40", "ON": "false"}
    s = parse(
        MINIMAL
        + "rate_limits: {enabled: ${ON}, callback: {per_second: ${RATE}, burst: ${BURST}}}\n",
        env,
    )
    assert s.rate_limits.callback == RateLimit(per_second=2.5, burst=40)
    assert s.rate_limits.enabled is False


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("{login: {per_second: 0}}", "rate_limits.login.per_second: must be more than 0, got 0"),
        ("{login: {per_second: -1}}", "rate_limits.login.per_second: must be more than 0"),
        ("{login: {per_second: fast}}", "rate_limits.login.per_second: expected a number"),
        ("{callback: {burst: 0}}", "rate_limits.callback.burst: must be at least 1, got 0"),
        ("{callback: {burst: 1.5}}", "rate_limits.callback.burst: expected an integer"),
        ("{callback: {burst: true}}", "rate_limits.callback.burst: expected an integer"),
        ("{enabled: yes please}", "rate_limits.enabled: expected true or false"),
        ("{login: {rate: 5}}", "rate_limits.login.rate: unknown key"),
        ("{backchannel: {}}", "rate_limits.backchannel: unknown key; did you mean"),
        ("[]", "rate_limits: expected a mapping"),
    ],
)
def test_bad_rate_limits(value: str, expect: str) -> None:
    msg = one_problem(MINIMAL + f"rate_limits: {value}\n")
    assert msg.startswith("bff.yaml:7: "), msg
    assert expect in msg, msg


def test_metrics_listener_and_workers() -> None:
    s = parse(
        MINIMAL + "metrics: {listen: {host: 0.0.0.0, port: 9100}, public: true}\nworkers: 3\n"
    )
    assert s.metrics == MetricsSettings(listen=Listen(host="0.0.0.0", port=9100), public=True)
    assert s.workers == 3
    assert parse(MINIMAL + "metrics: {listen: {port: 9101}}\n").metrics.listen == Listen(
        host="127.0.0.1", port=9101
    )
    assert parse(MINIMAL + "metrics: {listen: null, public: true}\n").metrics.listen is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("workers: 0\n", "workers: must be at least 1, got 0"),
        ("workers: two\n", "workers: expected an integer"),
        ("metrics: {listen: {port: 70000}}\n", "metrics.listen.port: must be at most 65535"),
        ("metrics: {public: yes please}\n", "metrics.public: expected true or false"),
        ("metrics: {path: /m}\n", "metrics.path: unknown key"),
        (
            "listen: {port: 9000}\nmetrics: {listen: {port: 9000}}\n",
            "metrics.listen: must not be the public listener's address (127.0.0.1:9000); to "
            "serve /metrics there, set metrics.public: true",
        ),
        (
            "listen: {host: 0.0.0.0, port: 9464}\n",
            "bff.yaml:7: listen.port: 9464 is where /metrics is served by default",
        ),
    ],
)
def test_metrics_and_workers_problems(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(MINIMAL + text)
    assert needle in str(err.value), str(err.value)


def test_shutdown_and_access_log() -> None:
    s = parse(MINIMAL + "shutdown: {drain: 15s, grace: 1m}\nlog: {access: false, format: text}\n")
    assert s.shutdown == ShutdownSettings(drain=15.0, grace=60.0)
    assert s.log == LogSettings(level="info", format="text", access=False)
    assert parse(MINIMAL + "shutdown: {drain: 0s}\n").shutdown == ShutdownSettings(drain=0.0)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("shutdown: {drain: soon}\n", "shutdown.drain"),
        ("shutdown: {grace: -5s}\n", "shutdown.grace"),
        ("shutdown: {timeout: 5s}\n", "shutdown.timeout: unknown key"),
        ("log: {access: maybe}\n", "log.access: expected true or false"),
    ],
)
def test_shutdown_and_access_log_problems(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(MINIMAL + text)
    assert needle in str(err.value), str(err.value)


# -- trusted_proxies -------------------------------------------------------------------------------


def test_trusted_proxies_are_normalised_networks() -> None:
    s = parse(MINIMAL + "trusted_proxies: [10.0.0.0/8, 192.0.2.7, '2001:DB8::/32', '::1']\n")
    assert s.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "::1/128")
    assert dump_redacted(s)["trusted_proxies"] == list(s.trusted_proxies)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "[10.0.0.1/8]",
            "trusted_proxies[0]: '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?",
        ),
        ("[proxy.internal]", "trusted_proxies[0]: expected an IP network like 10.0.0.0/8"),
        ("[10.0.0.0/33]", "trusted_proxies[0]: expected an IP network like 10.0.0.0/8"),
        (
            "[10.0.0.0/8, 10.0.0.0/8]",
            "trusted_proxies[1]: duplicate network (same as trusted_proxies[0])",
        ),
        ("10.0.0.0/8", "trusted_proxies: expected a list, got '10.0.0.0/8'"),
    ],
)
def test_a_bad_trusted_proxy_is_named_with_its_line(value: str, message: str) -> None:
    found = one_problem(MINIMAL + f"trusted_proxies: {value}\n")
    assert found.startswith("bff.yaml:7: " + message), found


# ---------------------------------------------------------------------------------------------
# session.store_timeout and session.redis
# ---------------------------------------------------------------------------------------------


def test_store_timeout_and_redis_block(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("-----BEGIN X-----\n")
    text = MINIMAL + textwrap.dedent("""\
        session:
          store: rediss+sentinel://s1:26379,s2:26379/mymaster
          store_timeout: 250ms
          redis:
            username: bff
            password: ${REDIS_PW}
            sentinel_username: watcher
            sentinel_password: sentinel-pw
            tls: {ca_file: ca.pem, cert_file: client.pem, key_file: client.key}
        """)
    s = parse(text, {"REDIS_PW": "redis-pw"}, base_dir=tmp_path)
    r = s.session.redis
    assert s.session.store_timeout == 0.25
    assert r.username == "bff" and r.password == Secret("redis-pw")
    assert r.sentinel_username == "watcher" and r.sentinel_password == Secret("sentinel-pw")
    assert r.tls == RedisTls(
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "client.pem",
        key_file=tmp_path / "client.key",
        check_hostname=True,
    )
    assert "redis-pw" not in repr(s) and "sentinel-pw" not in repr(s)
    out = json.dumps(dump_redacted(s))
    assert "redis-pw" not in out and "sentinel-pw" not in out
    assert dump_redacted(s)["session"]["redis"]["password"] == REDACTED


def test_store_urls_with_node_lists_are_redacted() -> None:
    text = MINIMAL + "session: {store: 'redis+sentinel://bff:topsecret@s1,s2/m'}\n"
    out = dump_redacted(parse(text))
    assert out["session"]["store"] == f"redis+sentinel://bff:{REDACTED}@s1,s2/m"


@pytest.mark.parametrize(
    ("session", "expect"),
    [
        ("{store_timeout: 0s}", "session.store_timeout: must be longer than 0s"),
        ("{store_timeout: 1m}", "session.store_timeout: must be at most 30s"),
        (
            "{store: 'redis://r', redis: {tls: {ca_file: /etc/hosts}}}",
            "session.redis.tls: needs a TLS store URL",
        ),
        (
            "{store: 'rediss://r', redis: {tls: {cert_file: /etc/hosts}}}",
            "session.redis.tls: cert_file and key_file go together",
        ),
        (
            "{store: 'rediss://r', redis: {tls: {ca_file: /nonexistent/ca.pem}}}",
            "session.redis.tls.ca_file: no such file",
        ),
        (
            "{store: 'redis://:urlpw@r', redis: {password: other}}",
            "session.redis.password: the store URL has a password too",
        ),
        (
            "{store: 'redis://u@r', redis: {username: v, password: p}}",
            "session.redis.username: the store URL has a user too",
        ),
        (
            "{store: 'redis+cluster://r', redis: {sentinel_password: x}}",
            "session.redis.sentinel_password: is only used with redis+sentinel://",
        ),
        ("{redis: {password: pw}}", "session.redis: is only used with a Redis store"),
        ("{store: 'redis://r', redis: {username: u}}", "session.redis.username: needs a password"),
        (
            "{store: 'redis+sentinel://s/m', redis: {sentinel_username: w}}",
            "session.redis.sentinel_username: needs session.redis.sentinel_password",
        ),
        ("{store: 'rediss://r', redis: {tls: {check_hostname: 1}}}", "check_hostname"),
        ("{store: 'redis://r', redis: {pasword: x}}", "did you mean 'password'"),
    ],
)
def test_redis_block_mistakes(session: str, expect: str) -> None:
    msg = one_problem(MINIMAL + f"session: {session}\n")
    assert expect in msg, msg


def test_redis_passwords_are_never_printed() -> None:
    text = MINIMAL + (
        "session: {store: 'redis://:urlsecret@r', "
        "redis: {password: cfgsecret, sentinel_password: [sentsecret]}}\n"
    )
    for msg in problems(text):
        assert "urlsecret" not in msg and "cfgsecret" not in msg and "sentsecret" not in msg


def test_tracing_block() -> None:
    s = parse(MINIMAL + "tracing: {enabled: true, service_name: shop-bff, trust_incoming: false}\n")
    assert s.tracing == TracingSettings(enabled=True, service_name="shop-bff", trust_incoming=False)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tracing: {enabled: maybe}\n", "tracing.enabled: expected true or false"),
        ("tracing: {service_name: ''}\n", "tracing.service_name"),
        ("tracing: {endpoint: http://x}\n", "tracing.endpoint: unknown key"),
    ],
)
def test_tracing_problems(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(MINIMAL + text)
    assert needle in str(err.value), str(err.value)


def test_tracing_enabled_without_the_otel_extra_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from bff import tracing

    monkeypatch.setattr(tracing, "available", lambda: False)
    with pytest.raises(ConfigError) as err:
        parse(MINIMAL + "tracing: {enabled: true}\n")
    assert "tracing.enabled: tracing needs the OpenTelemetry packages" in str(err.value)
    assert "pip install 'bff[otel]'" in str(err.value)
    assert parse(MINIMAL + "tracing: {enabled: false}\n").tracing.enabled is False
