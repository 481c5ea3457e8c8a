"""docs/operations.md names only config keys and log events that exist.

Every dotted name in backquotes (``session.store_timeout``, ``oidc.no_revocation_endpoint``) must
be a path through the ``Settings`` dataclasses or an ``event`` bff logs; the keys of the
lifecycle change that the doc describes ahead of its merge are the only exceptions. Its
``session:`` example loads as a config.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from bff.config import load_settings
from bff.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "operations.md"
# `session.idle_timeout`, or with a value: `security.hsts: false`
_DOTTED = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)(?:: [^`]*)?`")


def is_config_key(path: str) -> bool:
    cls: type = Settings
    parts = path.split(".")
    for i, name in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if name not in hints or name not in {f.name for f in dataclasses.fields(cls)}:
            return False
        target = hints[name]
        args = typing.get_args(target) if isinstance(target, types.UnionType) else (target,)
        nested = [a for a in args if dataclasses.is_dataclass(a)]
        if not nested:  # a leaf: a mapping (extra_auth_params) takes any key below it
            origin = typing.get_origin(target)
            return i == len(parts) - 1 or (origin is not None and "Mapping" in str(origin))
        cls = nested[0]
    return True


def logged_events() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "bff").rglob("*.py"):
        found |= set(re.findall(r'"event": "([a-z_.]+)"', path.read_text()))
    return found


def dotted_names() -> list[str]:
    return sorted(set(_DOTTED.findall(DOC.read_text())))


def test_the_doc_names_dotted_keys_at_all() -> None:
    names = dotted_names()
    assert "session.idle_timeout" in names and "oidc.logout_id_token_hint" in names


@pytest.mark.parametrize("name", dotted_names())
def test_every_dotted_name_is_a_config_key_or_a_log_event(name: str) -> None:
    assert is_config_key(name) or name in logged_events(), name


def test_the_checker_refuses_what_does_not_exist() -> None:
    assert is_config_key("session.redis.tls.ca_file")
    assert is_config_key("oidc.extra_auth_params.audience")
    assert not is_config_key("session.redis.tls.ca_dir")
    assert not is_config_key("oidc.audience")
    assert not is_config_key("listen.port.number")
    assert "store.unavailable" in logged_events()


def test_the_session_block_of_the_doc_is_a_valid_config(tmp_path: Path) -> None:
    """The `session:` example (Sentinel over TLS, ACL user, sentinel auth) loads as written,
    with its TLS files where it says (here under tmp_path) and its variables set."""
    block = re.search(r"```yaml\n(session:\n.*?)```", DOC.read_text(), re.DOTALL)
    assert block is not None
    for name in ("redis-ca.pem", "redis-client.pem", "redis-client.key"):
        (tmp_path / name).write_text("")
    session = block.group(1).replace("/etc/bff/", f"{tmp_path}/")
    config = tmp_path / "bff.yaml"
    config.write_text(
        "public_url: https://app.example.com\n"
        f"static: {tmp_path}\n"
        "oidc: {issuer: https://idp.example.com, client_id: c, client_secret: s}\n"
        f"keys: ['{'k' * 43}']\n" + session
    )
    env = {"REDIS_PASSWORD": "redis-pw", "SENTINEL_PASSWORD": "sentinel-pw"}
    settings = load_settings(config, env=env)
    assert settings.session.store.startswith("rediss+sentinel://")
    assert settings.session.redis.username == "bff"
    assert settings.session.store_timeout == 0.5
