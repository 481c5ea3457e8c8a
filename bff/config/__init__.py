"""The YAML configuration: loading, validation and the typed `Settings` it produces.

`load_settings(path)` reads one YAML file; `parse_settings(text)` does the same for a string.
Both return a frozen `Settings` or raise `ConfigError` listing *every* problem found, one per
line, each naming the file, the line and the key path::

    bff.yaml:12: upstreams[0].timeout: expected a duration like 30s, 5m, 8h, got 'soon'

The pipeline, one module per step (`loading.py` runs it):

1. `yaml_source.py`: YAML -> plain values with a line for every key path; `${VAR}` and
   `${VAR:-default}` substituted from the environment; alias bombs and deep nesting refused.
2. `schema.py`: env values converted to the types the schema wants (`port: ${PORT}`), then the
   JSON schema checks structure; unknown keys get a "did you mean".
3. `build.py` and `upstreams.py` (on the shared readers of `checks.py`): semantic and
   cross-field checks, then the frozen dataclasses of `settings.py`.

`problems.py` holds the `Context` they share. Values from the environment and secrets (`keys`,
`oidc.client_secret`, the store URL, header values) are never echoed in messages.
"""

from __future__ import annotations

from bff.config.checks import parse_duration
from bff.config.loading import MAX_CONFIG_BYTES, load_settings, parse_settings
from bff.config.problems import ConfigError
from bff.config.schema import SCHEMA
from bff.config.settings import (
    DEFAULT_CSP,
    DEFAULT_ID_TOKEN_ALGS,
    DEFAULT_SCOPES,
    REDACTED,
    AuthMethod,
    CookieSettings,
    LimitSettings,
    Listen,
    LogFormat,
    LogLevel,
    LogSettings,
    MetricsSettings,
    OidcSettings,
    ParMode,
    RateLimit,
    RateLimitSettings,
    RedisSettings,
    RedisTls,
    SameSite,
    Secret,
    SecuritySettings,
    SessionSettings,
    Settings,
    ShutdownSettings,
    TokenMode,
    TracingSettings,
    Upstream,
    dump_redacted,
    is_loopback_host,
)

__all__ = [
    "DEFAULT_CSP",
    "DEFAULT_ID_TOKEN_ALGS",
    "DEFAULT_SCOPES",
    "MAX_CONFIG_BYTES",
    "REDACTED",
    "SCHEMA",
    "AuthMethod",
    "ConfigError",
    "CookieSettings",
    "LimitSettings",
    "Listen",
    "LogFormat",
    "LogLevel",
    "LogSettings",
    "MetricsSettings",
    "OidcSettings",
    "ParMode",
    "RateLimit",
    "RateLimitSettings",
    "RedisSettings",
    "RedisTls",
    "SameSite",
    "Secret",
    "SecuritySettings",
    "SessionSettings",
    "Settings",
    "ShutdownSettings",
    "TokenMode",
    "TracingSettings",
    "Upstream",
    "dump_redacted",
    "is_loopback_host",
    "load_settings",
    "parse_duration",
    "parse_settings",
]
