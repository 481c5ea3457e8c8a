"""bff.log: invariant 9. A known token pushed through every part of a log record never shows."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from yarl import URL

from bff.log import MASK, setup_logging

TOKEN = "tok_Q2xhc3NpZmllZE9wYXF1ZVRva2Vu"  # opaque, like oidc-provider's access tokens
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJhbGljZSJ9.U2lnbmF0dXJlQnl0ZXNIZXJl"
CODE = "code_MDEyMzQ1Njc4OWFiY2RlZg"
STATE = "state_ZmVkY2JhOTg3NjU0MzIxMA"
SECRETS = (TOKEN, JWT, CODE, STATE)

Emit = Callable[[logging.Logger], None]


class Output(io.StringIO):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt


@pytest.fixture(params=["json", "text"])
def output(request: pytest.FixtureRequest) -> Iterator[Output]:
    """The root logger exactly as ``bff run`` configures it, writing into a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    setup_logging("debug", request.param)
    buffer = Output(request.param)
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root.handlers[:], root.level = saved[0], saved[1]


def _raise(message: str) -> None:
    raise RuntimeError(message)


def _exception(message: str) -> Emit:
    def emit(log: logging.Logger) -> None:
        try:
            _raise(message)
        except RuntimeError:
            log.exception("refresh.failed")

    return emit


CASES: dict[str, Emit] = {
    "jwt in the message args": lambda log: log.info("id token %s", JWT),
    "jwt in the message text": lambda log: log.info(f"validated {JWT}"),
    "bearer header in the message": lambda log: log.info(f"sent Authorization: Bearer {TOKEN}"),
    "basic auth in the message": lambda log: log.info(f"Authorization: Basic {TOKEN}"),
    "token-named extra field": lambda log: log.info("x", extra={"access_token": TOKEN}),
    "refresh token extra field": lambda log: log.info("x", extra={"refresh_token": TOKEN}),
    "headers extra field": lambda log: log.info(
        "x", extra={"headers": {"Authorization": f"Bearer {TOKEN}", "Cookie": f"a={CODE}"}}
    ),
    "code and state in a url extra": lambda log: log.info(
        "x", extra={"url": f"/bff/callback?code={CODE}&state={STATE}&iss=x"}
    ),
    "code and state in the message": lambda log: log.info(
        "GET %s", f"/bff/callback?state={STATE}&code={CODE}"
    ),
    "yarl url in the message": lambda log: log.info(
        "GET %s", URL(f"https://app.example/bff/callback?code={CODE}&state={STATE}")
    ),
    "yarl url in an extra field": lambda log: log.info(
        "x", extra={"url": URL(f"https://app.example/bff/callback?code={CODE}&state={STATE}")}
    ),
    "token form body in the message": lambda log: log.info(
        "posted %s", f"grant_type=refresh_token&refresh_token={TOKEN}&client_secret={CODE}"
    ),
    "json token response in the message": lambda log: log.info(
        "answer %s", json.dumps({"access_token": TOKEN, "id_token": JWT, "token_type": "Bearer"})
    ),
    "dict arg in the message": lambda log: log.info("answer %s", {"refresh_token": TOKEN}),
    "mapping args": lambda log: log.info("answer %(body)s", {"body": {"access_token": TOKEN}}),
    "cookie header in the message": lambda log: log.info(f"Cookie: __Host-bff={TOKEN}; x=1"),
    "set-cookie header in the message": lambda log: log.info(
        f"Set-Cookie: __Host-bff={TOKEN}; HttpOnly; Secure"
    ),
    "exception text with a jwt": _exception(f"bad id token {JWT}"),
    "exception text with a named token": _exception(f"refresh_token={TOKEN} was refused"),
    "exception text with a bearer header": _exception(f"Authorization: Bearer {TOKEN}"),
}


@pytest.mark.parametrize("emit", CASES.values(), ids=CASES.keys())
def test_a_token_never_reaches_the_formatted_output(output: Output, emit: Emit) -> None:
    emit(logging.getLogger("bff.test"))
    text = output.getvalue()
    assert text, "nothing was logged: the test proves nothing"
    for secret in SECRETS:
        assert secret not in text
    if output.fmt == "json":  # the text format prints only the message, not extra fields
        assert MASK in text
        json.loads(text)


def test_ordinary_values_are_left_alone(output: Output) -> None:
    log = logging.getLogger("bff.test")
    log.info("session.created %s", "abc123", extra={"session": "abc123", "status": 200})
    log.info("the state parameter is missing", extra={"grant": "refresh_token", "n": 3})
    log.info("GET /api/orders?page=2 -> %d", 200)
    text = output.getvalue()
    assert MASK not in text
    assert text.count("abc123") == 2  # the text format keeps the fields too (issue 10, point 5)
    assert "the state parameter is missing" in text
    assert "/api/orders?page=2 -> 200" in text


def test_cr_and_lf_are_stripped_from_message_and_fields(output: Output) -> None:
    forged = 'ok\r\n{"level": "info", "msg": "forged"}\nlevel=info forged'
    logging.getLogger("bff.test").warning("bad input %s", forged, extra={"path": forged})
    text = output.getvalue()
    assert text.endswith("\n")
    assert "\r" not in text
    assert text.count("\n") == 1, "one record must be one line"


def test_a_logged_exception_cannot_forge_lines(output: Output) -> None:
    _exception("boom\nsecond line")(logging.getLogger("bff.test"))
    text = output.getvalue()
    # The text format puts the (flattened) traceback on a line of its own.
    assert text.count("\n") == (1 if output.fmt == "json" else 2)
    assert "RuntimeError: boom second line" in text


COOKIE_VALUE = "Zm9vYmFyYmF6cXV4.c2lnbmF0dXJl"  # a signed cookie: neither a JWT nor token-named
API_KEY = "k3y-for-the-orders-api"


@pytest.fixture(params=["json", "text"])
def named_output(request: pytest.FixtureRequest) -> Iterator[Output]:
    """As ``bff run`` configures it from the settings: cookie and header names to mask."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    setup_logging(
        "debug",
        request.param,
        cookie_names=("bff-session", "bff-session-tx"),
        header_names=("x-api-key",),
    )
    buffer = Output(request.param)
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root.handlers[:], root.level = saved[0], saved[1]


NAMED: dict[str, Emit] = {
    "a parser error quoting a raw cookie line": lambda log: log.info(
        "Got more than 8190 bytes when reading: %r.",
        b"Cookie: a=1; bff-session=" + COOKIE_VALUE.encode() + b"; z=2",
    ),
    "the login cookie in free text": lambda log: log.info(f"saw bff-session-tx={COOKIE_VALUE}"),
    "a repr'd header tuple": lambda log: log.info(
        "headers %s", ((b"Host", b"a"), (b"X-Api-Key", API_KEY.encode()))
    ),
    "a header line": lambda log: log.info(f"sent X-API-Key: {API_KEY}"),
    "an extra field named like the header": lambda log: log.info("x", extra={"x-api-key": API_KEY}),
    "a cookie dict": lambda log: log.info("cookies %s", {"bff-session": COOKIE_VALUE}),
    "an exception text": _exception(f"bad cookie bff-session={COOKIE_VALUE}"),
}


@pytest.mark.parametrize("emit", NAMED.values(), ids=NAMED.keys())
def test_configured_cookie_and_header_names_are_masked(named_output: Output, emit: Emit) -> None:
    emit(logging.getLogger("aiohttp.server"))
    text = named_output.getvalue()
    assert text
    if named_output.fmt == "json":  # the text format prints only the message, not extra fields
        assert MASK in text
    assert COOKIE_VALUE not in text and API_KEY not in text


def test_names_mask_only_their_own_values(named_output: Output) -> None:
    logging.getLogger("bff.test").info("other-bff-session=visible; plain=visible2 x-api-keys=v3")
    text = named_output.getvalue()
    assert "visible" in text and "visible2" in text and "v3" in text


def test_configure_learns_the_names_from_the_settings() -> None:
    """``bff run``'s wiring: the cookie name (and its login cookie) and ``set_headers`` names."""
    from bff.config import parse_settings
    from bff.log import configure

    settings = parse_settings(
        "public_url: https://app.example.com\n"
        "oidc: {issuer: https://idp.example.com, client_id: c, client_secret: s}\n"
        f"keys: [{'k' * 32}]\n"
        "session: {cookie: {name: __Host-shop}}\n"
        "log: {level: debug, format: json}\n"
        "upstreams:\n"
        "  - {path: /api, url: http://api.internal, set_headers: {X-Orders-Key: v}}\n",
        "bff.yaml",
        {},
    )
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure(settings)
        buffer = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        assert root.level == logging.DEBUG
        logging.getLogger("aiohttp.server").debug(
            "raw %s", f"__Host-shop={COOKIE_VALUE}; __Host-shop-tx={COOKIE_VALUE}x"
        )
        logging.getLogger("bff.test").info(f"X-Orders-Key: {API_KEY}")
        text = buffer.getvalue()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert text.count(MASK) == 3, text
    assert COOKIE_VALUE not in text and API_KEY not in text
    json.loads(text.splitlines()[0])


def test_a_library_warning_is_a_log_record_not_raw_text(output: Output) -> None:
    """Issue 10, point 5: warnings (redis' Retry, deprecations) go through logging."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # pytest records warnings per test, which undid what setup_logging installed.
            logging.captureWarnings(False)
            logging.captureWarnings(True)
            warnings.warn(f"retry with {JWT} in a library", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    lines = output.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert JWT not in lines[0]  # redacted like any other record
    if output.fmt == "json":
        record = json.loads(lines[0])
        assert record["logger"] == "py.warnings"
        assert "UserWarning" in record["msg"] and "in a library" in record["msg"]
    else:
        assert " WARNING py.warnings " in lines[0]


def test_the_text_format_keeps_the_fields(output: Output) -> None:
    logging.getLogger("bff.access").info(
        "access", extra={"event": "access", "route": "/api", "status": 200, "session": "-"}
    )
    line = output.getvalue().strip()
    if output.fmt == "text":
        assert line.endswith(" access route=/api status=200 session=-"), line
    else:
        assert json.loads(line)["route"] == "/api"


def test_trusted_access_records_skip_redaction_but_never_show_the_marker(output: Output) -> None:
    logging.getLogger("bff.access").info(
        "access", extra={"event": "access", "trusted": True, "request_id": "abc.def"}
    )
    line = output.getvalue()
    assert "trusted" not in line
    assert "abc.def" in line
