"""The entry points: `load_settings(path)` and `parse_settings(text)` run the whole pipeline."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from bff.config.build import build_settings
from bff.config.problems import Abort, ConfigError, Context
from bff.config.schema import check_schema, coerce_env_values
from bff.config.settings import Settings
from bff.config.yaml_source import read_yaml

MAX_CONFIG_BYTES: Final = 1024 * 1024
"""A config file larger than this is refused (also bounds reads from a FIFO or device)."""


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, validate and return the YAML config at `path`; relative paths in it (static,
    oidc.private_key_file) are resolved against the file's directory.

    `env` is where `${VAR}` references are looked up (default: `os.environ`).
    Raises ConfigError, and nothing else, for any problem with the file or its content.
    """
    source = str(path)
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory, not a config file"]) from None
    except PermissionError:
        raise ConfigError([f"{source}: permission denied"]) from None
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES} bytes; not a config file"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: not valid UTF-8 (byte {e.start})"]) from None
    return parse_settings(text, source, env, base_dir=p.absolute().parent)


def parse_settings(
    text: str,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    *,
    base_dir: str | Path | None = None,
) -> Settings:
    """Validate YAML `text` and return the Settings; `source` names it in messages.

    Relative paths resolve against `base_dir`: by default the directory of `source` when it
    names a file, else the current directory. Raises ConfigError, and nothing else.
    """
    if base_dir is None:
        base = Path.cwd() if source.startswith("<") else Path(source).absolute().parent
    else:
        base = Path(base_dir).absolute()
    ctx = Context(source, os.environ if env is None else env)
    settings = None
    try:
        data = read_yaml(ctx, text)
        coerce_env_values(ctx, data)
        check_schema(ctx, data)
        settings = build_settings(ctx, data, base)
    except Abort:
        pass
    except RecursionError:
        ctx.report((), "nested too deeply", line=0)
    if ctx.problems or settings is None:
        raise ConfigError(ctx.messages())
    return settings
