"""The JSON schema of the YAML file (Draft 2020-12), and its errors worded for people.

The schema checks structure and types; jsonschema's error paths are mapped back to lines, and
unknown keys get a "did you mean" suggestion. Values from `${VAR}` are strings, so they are first
converted where the schema wants an integer, number or boolean (`port: ${PORT}` works).
Top-level keys that start with `x-` are ignored: a place for YAML anchors (`&defaults`).
"""

from __future__ import annotations

import re
from typing import Any, Final

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from bff.config.problems import Context, Key, suggest

_DURATION: Final = {"$ref": "#/$defs/duration"}
_STR: Final = {"type": "string"}
_NONEMPTY: Final = {"type": "string", "minLength": 1}
_STR_LIST: Final = {"type": "array", "items": _NONEMPTY}
_BOOL: Final = {"type": "boolean"}
_ONE_OR_MORE: Final = {
    "x-expected": "a string or a non-empty list of strings",
    "anyOf": [_NONEMPTY, {**_STR_LIST, "minItems": 1}],
}
_STR_MAP: Final = {"type": "object", "additionalProperties": _STR}
_BUCKET: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "per_second": {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000},
        "burst": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    },
}
_LISTEN: Final = {"host": _NONEMPTY, "port": {"type": "integer", "minimum": 0, "maximum": 65535}}


_NAME: Final = {
    "type": "string",
    "pattern": r"^[a-z0-9][a-z0-9_-]{0,31}$",
    "x-expected": "a provider name (lower-case letters, digits, '-', '_'; at most 32)",
}
#: One OpenID Provider. ``oidc:`` is one of these (the single-provider form), or a list of them,
#: each with a ``name`` (issue 12, point 5); the first is the default.
_PROVIDER_PROPS: Final[dict[str, Any]] = {
    "name": _NAME,
    "hosts": _STR_LIST,
    # YAML 1.1 reads a bare `off` as false: that spelling means "off" too.
    "par": {"enum": ["auto", "required", "off", False], "x-expected": "auto, required or off"},
    "issuer": _NONEMPTY,
    "client_id": _NONEMPTY,
    "client_secret": {"type": ["string", "null"], "minLength": 1},
    "private_key_file": {"type": ["string", "null"], "minLength": 1},
    "private_key_kid": {"type": ["string", "null"], "minLength": 1},
    "token_endpoint_auth_method": {
        "enum": ["client_secret_basic", "client_secret_post", "private_key_jwt"]
    },
    "scopes": {**_STR_LIST, "minItems": 1},
    "id_token_algs": {**_STR_LIST, "minItems": 1},
    "extra_auth_params": {
        "type": "object",
        "additionalProperties": {"type": ["string", "integer"]},
    },
    "refresh_skew": _DURATION,
    "clock_skew": _DURATION,
    "http_timeout": _DURATION,
    "jwks_refetch_interval": _DURATION,
    "post_logout_redirect": _NONEMPTY,
    "revocation_endpoint": {"type": ["string", "null"], "minLength": 1},
    "logout_id_token_hint": _BOOL,
    "dpop": _BOOL,
    "resource_parameter": {"enum": ["resource", "audience"]},
    "login_resources": _BOOL,
}
#: A mapping (one provider) or a list of mappings: ``properties`` apply to the one, ``items`` to
#: the other (JSON Schema applies each keyword only to its own type).
_OIDC: Final[dict[str, Any]] = {
    "type": ["object", "array"],
    "additionalProperties": False,
    "properties": _PROVIDER_PROPS,
    "required": ["issuer", "client_id"],
    "minItems": 1,
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": _PROVIDER_PROPS,
        "required": ["name", "issuer", "client_id"],
    },
}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "duration": {
            "x-expected": "a duration like 30s, 5m, 8h",
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
            ],
        },
    },
    **_obj(
        {
            "public_url": _NONEMPTY,
            "listen": _obj(_LISTEN),
            "static": _NONEMPTY,
            "prefix": _NONEMPTY,
            "oidc": _OIDC,
            "session": _obj(
                {
                    "store": _NONEMPTY,
                    "cookie": _obj(
                        {
                            "name": {
                                "type": "string",
                                "pattern": r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$",
                                "x-expected": "a cookie name (letters, digits, !#$%&'*+-.^_`|~)",
                            },
                            "same_site": {"enum": ["strict", "lax"]},
                            "secure": _BOOL,
                        }
                    ),
                    "idle_timeout": _DURATION,
                    "absolute_timeout": _DURATION,
                    "login_timeout": _DURATION,
                    "cache_ttl": _DURATION,
                    "store_timeout": _DURATION,
                    "redis": _obj(
                        {
                            "username": _NONEMPTY,
                            "password": _NONEMPTY,
                            "sentinel_username": _NONEMPTY,
                            "sentinel_password": _NONEMPTY,
                            "tls": _obj(
                                {
                                    "ca_file": _NONEMPTY,
                                    "cert_file": _NONEMPTY,
                                    "key_file": _NONEMPTY,
                                    "check_hostname": _BOOL,
                                }
                            ),
                        }
                    ),
                }
            ),
            "keys": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "minLength": 32},
            },
            "upstreams": {
                "type": "array",
                "items": _obj(
                    {
                        "path": _NONEMPTY,
                        "url": _NONEMPTY,
                        "token": {"enum": ["user", "client", "user_or_none", "none", "exchange"]},
                        "resource": _ONE_OR_MORE,
                        "audience": _ONE_OR_MORE,
                        "exchange_scopes": _STR_LIST,
                        "scopes": _STR_LIST,
                        "client_scopes": _STR_LIST,
                        "methods": {"type": ["array", "null"], "minItems": 1, "items": _NONEMPTY},
                        "timeout": _DURATION,
                        "connect_timeout": _DURATION,
                        "websocket": _BOOL,
                        "set_headers": _STR_MAP,
                        "remove_headers": _STR_LIST,
                    },
                    required=("path", "url"),
                ),
            },
            "security": _obj({"content_security_policy": _STR, "hsts": _BOOL}),
            "rate_limits": _obj(
                {
                    "enabled": _BOOL,
                    "login": _BUCKET,
                    "callback": _BUCKET,
                    "backchannel_logout": _BUCKET,
                }
            ),
            "trusted_proxies": _STR_LIST,
            "log": _obj(
                {
                    "level": {"enum": ["debug", "info", "warning", "error", "critical"]},
                    "format": {"enum": ["json", "text"]},
                    "access": _BOOL,
                }
            ),
            "shutdown": _obj({"drain": _DURATION, "grace": _DURATION}),
            "metrics": _obj(
                {
                    "listen": {**_obj(_LISTEN), "type": ["object", "null"]},
                    "public": _BOOL,
                }
            ),
            "workers": {"type": "integer", "minimum": 1},
            "limits": _obj(
                {
                    "max_request_line": {"type": "integer", "minimum": 256, "maximum": 65536},
                    "max_header_size": {"type": "integer", "minimum": 256, "maximum": 65536},
                    "max_headers": {"type": "integer", "minimum": 8, "maximum": 1000},
                }
            ),
            "tracing": _obj({"enabled": _BOOL, "service_name": _NONEMPTY, "trust_incoming": _BOOL}),
        },
        required=("public_url", "oidc", "keys"),
    ),
    "patternProperties": {"^x-": {}},  # top-level extension keys (YAML anchors) are ignored
}

_VALIDATOR: Final = Draft202012Validator(SCHEMA)

_TYPE_NAMES: Final = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _subschema(path: Key) -> dict[str, Any] | None:
    schema: Any = SCHEMA
    for part in path:
        schema = _deref(schema)
        if isinstance(part, int):
            schema = schema.get("items")
        else:
            props = schema.get("properties", {})
            schema = props[part] if part in props else schema.get("additionalProperties")
        if not isinstance(schema, dict):
            return None
    return _deref(schema)


def _deref(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: dict[str, Any] = SCHEMA["$defs"][ref.removeprefix("#/$defs/")]
        return resolved
    return schema


def _schema_types(schema: dict[str, Any]) -> set[str]:
    types = schema.get("type")
    found = {types} if isinstance(types, str) else set(types or ())
    for branch in schema.get("anyOf", ()):
        found |= _schema_types(_deref(branch))
    return found


def coerce_env_values(ctx: Context, data: dict[str, Any]) -> None:
    """Values from `${VAR}` are strings; convert those where the schema wants something else."""
    for path in ctx.from_env:
        schema = _subschema(path)
        if schema is None:
            continue
        types = _schema_types(schema)
        if not types or "string" in types:
            continue
        parent: Any = data
        for part in path[:-1]:
            parent = parent[part]
        raw = parent[path[-1]]
        if not isinstance(raw, str):
            continue
        text = raw.strip()
        if "integer" in types and re.fullmatch(r"[+-]?\d+", text):
            parent[path[-1]] = int(text)
        elif "number" in types and re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
            parent[path[-1]] = float(text)
        elif "boolean" in types and text.lower() in ("true", "false", "yes", "no", "on", "off"):
            parent[path[-1]] = text.lower() in ("true", "yes", "on")


def _all_property_paths() -> dict[str, list[str]]:
    """Every known key name -> the dotted paths where it is valid (for "did you mean")."""
    found: dict[str, list[str]] = {}

    def walk(schema: dict[str, Any], prefix: str) -> None:
        schema = _deref(schema)
        for name, sub in schema.get("properties", {}).items():
            dotted = f"{prefix}.{name}" if prefix else name
            found.setdefault(name, []).append(dotted)
            walk(sub, dotted)
        items = schema.get("items")
        if isinstance(items, dict) and not schema.get("properties"):  # oidc: one name suffices
            walk(items, f"{prefix}[]")

    walk(SCHEMA, "")
    return found


_PROPERTY_PATHS: Final = _all_property_paths()


def check_schema(ctx: Context, data: dict[str, Any]) -> None:
    """Report every schema violation in `data`; invalid values are marked bad in `ctx`."""
    for error in _VALIDATOR.iter_errors(data):
        _report_schema_error(ctx, error)


def _report_schema_error(ctx: Context, error: ValidationError) -> None:
    path: Key = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator
    value = error.instance
    wanted: Any = error.validator_value
    if kind == "required":  # jsonschema yields this once per missing key, each listing all
        assert isinstance(value, dict)
        for name in wanted:
            missing = (*path, name)
            if name not in value and missing not in ctx.bad:
                ctx.report(missing, "required key is missing", line=ctx.line_of(path), invalid=True)
        return
    if kind == "additionalProperties":
        assert isinstance(value, dict)
        known = set(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        for name in value:
            if name in known or any(re.search(p, name) for p in patterns):
                continue
            hint = suggest(name, known)
            if not hint and name in _PROPERTY_PATHS:
                hint = f"; did you mean {' or '.join(_PROPERTY_PATHS[name])}?"
            if not hint and not path:
                hint = " (top-level keys starting with 'x-' are ignored)"
            ctx.report((*path, name), f"unknown key{hint}")
        return
    shown = ctx.show(path, value)
    if "x-expected" in schema:
        message = f"expected {schema['x-expected']}, got {shown}"
    elif kind == "type":
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        message = f"expected {' or '.join(_TYPE_NAMES.get(n, n) for n in names)}, got {shown}"
    elif kind == "enum":
        options = ", ".join(repr(o) for o in wanted)
        hint = suggest(str(value), [str(o) for o in wanted])
        if path[-2:] == ("cookie", "same_site") and str(value).lower() == "none":
            message = (
                "SameSite=None is never allowed (the cookie would go with cross-site requests)"
            )
        else:
            message = f"expected one of {options}, got {shown}{hint}"
    elif kind == "minLength":
        message = "must not be empty" if wanted == 1 else f"must be at least {wanted} characters"
    elif kind == "minItems":
        message = "must not be empty" if wanted == 1 else f"must have at least {wanted} items"
    elif kind in ("minimum", "maximum"):
        word = "at least" if kind == "minimum" else "at most"
        message = f"must be {word} {wanted}, got {shown}"
    elif kind == "exclusiveMinimum":
        message = f"must be more than {wanted}, got {shown}"
    else:  # pragma: no cover - the schema uses no other keyword
        message = f"invalid value ({kind}), got {shown}"
    ctx.report(path, message, invalid=True)
