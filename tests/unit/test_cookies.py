"""bff.cookies: the Set-Cookie attributes of invariant 2, and what reads back as no cookie."""

from __future__ import annotations

from http.cookies import Morsel
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from bff.cookies import CookiePolicy, browser_pairs
from bff.keys import Keyring, SessionSecret, new_secret

KEYS = ["cookie-key-" + "k" * 40]


def _policy(**options: object) -> CookiePolicy:
    return CookiePolicy(Keyring(KEYS), **options)  # type: ignore[arg-type]


def _request(cookie_header: str | None) -> web.Request:
    headers = {"Cookie": cookie_header} if cookie_header is not None else {}
    return make_mocked_request("GET", "/bff/user", headers=headers)


def _issued(policy: CookiePolicy, secret: SessionSecret, *, login: bool = False) -> Morsel[str]:
    response = web.Response()
    if login:
        policy.set_browser(response, secret)
        return response.cookies[policy.tx_name]
    policy.set_session(response, secret)
    return response.cookies[policy.name]


def _attributes(morsel: Morsel[str]) -> dict[str, str]:
    """The attributes as a browser reads them from the Set-Cookie header line."""
    header = morsel.OutputString()
    out = {}
    for part in header.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        out[name.lower()] = value
    return out


def test_the_session_cookie_has_the_attributes_of_invariant_2() -> None:
    policy = _policy(max_age=3600)
    morsel = _issued(policy, new_secret())
    attrs = _attributes(morsel)
    assert morsel.key == "__Host-bff"
    assert "httponly" in attrs
    assert "secure" in attrs
    assert attrs["samesite"] == "Strict"
    assert attrs["path"] == "/"
    assert "domain" not in attrs
    assert attrs["max-age"] == "3600"


def test_same_site_lax_is_configurable() -> None:
    attrs = _attributes(_issued(_policy(same_site="lax"), new_secret()))
    assert attrs["samesite"] == "Lax"


def test_secure_is_dropped_only_when_configured_for_loopback_dev() -> None:
    attrs = _attributes(_issued(_policy(secure=False, name="bff"), new_secret()))
    assert "secure" not in attrs
    assert "httponly" in attrs


def test_the_login_binding_cookie_is_lax_short_lived_and_http_only() -> None:
    policy = _policy(login_max_age=600)
    morsel = _issued(policy, new_secret(), login=True)
    attrs = _attributes(morsel)
    assert morsel.key == "__Host-bff-tx"
    # Lax, even when the session cookie is Strict: the OP's redirect back is cross-site.
    assert attrs["samesite"] == "Lax"
    assert attrs["max-age"] == "600"
    assert {"httponly", "secure"} <= attrs.keys()
    assert attrs["path"] == "/"
    assert "domain" not in attrs


def test_clearing_expires_the_cookie_with_the_same_scope() -> None:
    policy = _policy()
    response = web.Response()
    policy.clear_session(response)
    policy.clear_browser(response)
    for name in (policy.name, policy.tx_name):
        morsel = response.cookies[name]
        attrs = _attributes(morsel)
        assert morsel.value == ""
        assert attrs["max-age"] == "0"
        assert attrs["path"] == "/"
        assert "secure" in attrs


def test_the_cookie_value_is_the_signed_secret_and_reads_back() -> None:
    policy = _policy()
    secret = new_secret()
    morsel = _issued(policy, secret)
    assert morsel.value != secret and morsel.value.startswith(secret)
    assert policy.session_secret(_request(f"{policy.name}={morsel.value}")) == secret
    login = _issued(policy, secret, login=True)
    assert policy.browser_secret(_request(f"{policy.tx_name}={login.value}")) == secret


def test_the_session_and_login_cookies_are_not_interchangeable_by_name() -> None:
    policy = _policy()
    morsel = _issued(policy, new_secret())
    assert policy.browser_secret(_request(f"{policy.name}={morsel.value}")) is None


def _tampered(value: str) -> list[str]:
    # "B" for a final "A" would differ only in base64 padding bits, which decode to the same
    # signature; "E" changes a data bit.
    last = "A" if value[-1] != "A" else "E"
    first = "A" if value[0] != "A" else "B"
    return [value[:-1] + last, first + value[1:], value[:-1], value + "x", value.split(".")[0]]


def test_a_tampered_cookie_reads_as_none() -> None:
    policy = _policy()
    value = _issued(policy, new_secret()).value
    for forged in _tampered(value):
        assert policy.session_secret(_request(f"{policy.name}={forged}")) is None, forged


def test_a_cookie_signed_with_a_foreign_key_reads_as_none() -> None:
    foreign = CookiePolicy(Keyring(["someone-else-" + "x" * 40]))
    value = _issued(foreign, new_secret()).value
    assert _policy().session_secret(_request(f"__Host-bff={value}")) is None


def test_a_cookie_signed_with_a_retired_but_configured_key_still_reads() -> None:
    old = CookiePolicy(Keyring(KEYS))
    secret = new_secret()
    value = _issued(old, secret).value
    rotated = CookiePolicy(Keyring(["new-key-" + "n" * 40, *KEYS]))
    assert rotated.session_secret(_request(f"__Host-bff={value}")) == secret


def test_an_oversized_cookie_reads_as_none_even_when_validly_signed() -> None:
    policy = _policy()
    big = SessionSecret("x" * 600)
    value = Keyring(KEYS).sign(big)
    assert Keyring(KEYS).unsign(value) == big  # the signature alone would pass
    assert policy.session_secret(_request(f"{policy.name}={value}")) is None


@pytest.mark.parametrize("header", [None, "", "__Host-bff=", "other=1", "__Host-bff=%00%ff"])
def test_an_absent_or_empty_cookie_reads_as_none(header: str | None) -> None:
    assert _policy().session_secret(_request(header)) is None


def test_a_cookie_header_seen_before_is_not_parsed_or_verified_again() -> None:
    keyring = Keyring(KEYS)
    policy = CookiePolicy(keyring)
    secret = new_secret()
    header = f"{policy.name}={_issued(policy, secret).value}; theme=dark"
    assert policy.session_secret(_request(header)) == secret
    calls = 0
    real_unsign = keyring.unsign

    def counting_unsign(value: str) -> str | None:
        nonlocal calls
        calls += 1
        return real_unsign(value)

    keyring.unsign = counting_unsign  # type: ignore[method-assign]
    for _ in range(5):
        assert policy.session_secret(_request(header)) == secret
    assert calls == 0


def test_a_tampered_cookie_header_is_never_remembered() -> None:
    keyring = Keyring(KEYS)
    policy = CookiePolicy(keyring)
    value = _issued(policy, new_secret()).value
    tampered = f"{policy.name}={value[:-2]}xx"
    for _ in range(3):
        assert policy.session_secret(_request(tampered)) is None
    # and a foreign key's cookie stays foreign however often it is presented
    foreign = CookiePolicy(Keyring(["another-key-" + "z" * 40]))
    header = f"{policy.name}={_issued(foreign, new_secret()).value}"
    for _ in range(3):
        assert policy.session_secret(_request(header)) is None


def test_a_login_cookie_is_no_session_cookie_and_back() -> None:
    policy = _policy()
    secret = new_secret()
    login_value = _issued(policy, secret, login=True).value
    session_value = _issued(policy, secret).value
    assert login_value != session_value
    # The login-binding cookie any visitor gets from /bff/login cannot pose as a session cookie.
    assert policy.session_secret(_request(f"{policy.name}={login_value}")) is None
    assert policy.browser_secret(_request(f"{policy.tx_name}={session_value}")) is None
    assert policy.session_secret(_request(f"{policy.name}={session_value}")) == secret
    assert policy.browser_secret(_request(f"{policy.tx_name}={login_value}")) == secret


# -- one cookie of each name, or none (issue 9, point 6) ------------------------------------------


def _lines_request(*lines: str) -> web.Request:
    return make_mocked_request(
        "GET", "/bff/user", headers=CIMultiDict(("Cookie", line) for line in lines)
    )


def test_two_session_cookies_in_one_line_are_no_session_whichever_is_valid() -> None:
    policy = _policy()
    good = _issued(policy, new_secret()).value
    other = _issued(policy, new_secret()).value
    for header in (
        f"{policy.name}={good}; {policy.name}={other}",
        f"{policy.name}={good}; {policy.name}=planted",
        f"{policy.name}=planted; theme=dark; {policy.name}={good}",
        f"{policy.name}=; {policy.name}={good}",
        f'{policy.name}={good}; {policy.name}="{good}"',
    ):
        assert policy.session_secret(_request(header)) is None, header
    assert policy.session_secret(_request(f"{policy.name}={good}")) is not None


def test_the_same_name_across_two_cookie_lines_is_no_session() -> None:
    policy = _policy()
    good = _issued(policy, new_secret()).value
    assert policy.session_secret(_lines_request(f"{policy.name}={good}", "a=1")) is not None
    assert policy.session_secret(_lines_request("a=1", f"{policy.name}={good}")) is not None
    for lines in (
        (f"{policy.name}={good}", f"{policy.name}=planted"),
        (f"{policy.name}=planted", f"{policy.name}={good}"),
        (f"{policy.name}={good}", f"{policy.name}={good}"),
    ):
        assert policy.session_secret(_lines_request(*lines)) is None, lines


def test_two_login_cookies_are_no_login_cookie() -> None:
    policy = _policy()
    secret = new_secret()
    login = _issued(policy, secret, login=True).value
    planted = _issued(policy, new_secret(), login=True).value
    assert policy.browser_secret(_request(f"{policy.tx_name}={login}")) == secret
    header = f"{policy.tx_name}={planted}; {policy.tx_name}={login}"
    assert policy.browser_secret(_request(header)) is None


def test_the_session_and_login_cookies_together_are_one_of_each() -> None:
    # The login cookie's name contains the session cookie's: the text holds the name twice.
    policy = _policy()
    session, login = new_secret(), new_secret()
    header = (
        f"{policy.tx_name}={_issued(policy, login, login=True).value}; "
        f"{policy.name}={_issued(policy, session).value}"
    )
    assert policy.session_secret(_request(header)) == session
    assert policy.browser_secret(_request(header)) == login


def test_a_cookie_whose_name_only_resembles_the_session_cookies_does_not_count() -> None:
    policy = _policy()
    secret = new_secret()
    value = _issued(policy, secret).value
    header = f"x{policy.name}=1; {policy.name.upper()}=2; {policy.name}={value}"
    assert policy.session_secret(_request(header)) == secret


def test_the_cookie_lines_are_parsed_once_per_request_for_both_cookies() -> None:
    policy = _policy()
    session, login = new_secret(), new_secret()
    request = _lines_request(
        f"{policy.tx_name}={_issued(policy, login, login=True).value}",
        f"{policy.name}={_issued(policy, session).value}",
    )
    with mock.patch("bff.cookies.browser_pairs", wraps=browser_pairs) as split:
        assert policy.session_secret(request) == session
        assert policy.browser_secret(request) == login
    assert split.call_count == 2  # one call per Cookie line, for both reads together


def test_quotes_cannot_hide_a_second_session_cookie() -> None:
    """Browsers split the Cookie header on ``;`` with no quoted strings (the review's header
    strings, issue 9 finding 2): a planted quote must not make the real cookie vanish."""
    policy = _policy()
    secret = new_secret()
    real = _issued(policy, secret).value
    planted = _issued(policy, new_secret()).value
    name = policy.name
    for header in (
        f'{name}={planted}; a="x\\"; {name}={real}; y="',
        f'{name}={planted}; a="x; {name}={real}"',
        f'a="x\\"; {name}={real}; y="; {name}={planted}',
        f'{name}={planted}; a="x;{name}={real}"',
        f"{name}={planted}; {name} ={real}",
        f"{name}={planted}; {name}",
    ):
        assert policy.session_secret(_request(header)) is None, header
        assert policy.session_secret(_lines_request("a=1", header)) is None, header
    tx = policy.tx_name
    login = _issued(policy, secret, login=True).value
    header = f'{tx}={login}; a="x; {tx}={login}"'
    assert policy.browser_secret(_request(header)) is None
    # One real cookie next to quoted values is still found.
    assert policy.session_secret(_request(f'a="x; y"; {name}={real}; b="z"')) == secret


def test_browser_pairs_splits_as_a_browser_writes() -> None:
    assert browser_pairs('a="x; b=y"; c ; d=e=f') == [
        ("a", '"x'),
        ("b", 'y"'),
        ("c", ""),
        ("d", "e=f"),
    ]


def test_a_cookie_line_that_verified_is_answered_again_without_the_parser() -> None:
    """The hot path's memo: one Cookie line always yields the same secret, so the second read
    needs neither aiohttp's cookie parser nor the signature check; other lines still do."""
    policy = _policy(secure=False, name="bff")
    secret = new_secret()
    line = f"a=1; bff={_issued(policy, secret).value}; b=2"
    assert policy.session_secret(_request(line)) == secret
    with mock.patch("bff.cookies._only_value", side_effect=AssertionError("parsed again")):
        assert policy.session_secret(_request(line)) == secret
        with pytest.raises(AssertionError):
            policy.session_secret(_request(line + "; c=3"))  # another line: parsed
    # The same cookie twice in one line is no cookie, however often it comes.
    twice = f"bff={_issued(policy, secret).value}; bff={_issued(policy, secret).value}"
    assert policy.session_secret(_request(twice)) is None
    assert policy.session_secret(_request(twice)) is None
    # Two Cookie lines are never taken from the memo.
    request = make_mocked_request(
        "GET", "/", headers=CIMultiDict([("Cookie", line), ("Cookie", "x=1")])
    )
    assert policy.session_secret(request) == secret
