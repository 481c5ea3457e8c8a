"""What every stage shares: where each value came from, and the problems found so far.

Stages report into one `Context` and keep going, so that `ConfigError` lists *every* problem,
sorted by line, each naming the file, the line and the key path::

    bff.yaml:12: upstreams[0].timeout: expected a duration like 30s, 5m, 8h, got 'soon'
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TypeAlias

from bff.config.settings import REDACTED

Key: TypeAlias = tuple[str | int, ...]
"""A path into the YAML document, e.g. ("upstreams", 0, "timeout")."""


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists every reason, one message each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems: list[str] = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


class Abort(Exception):
    """Stop here: what is reported so far is all that can be said."""


class Context:
    """Line numbers, environment provenance and validity of every value, plus the problems."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.lines: dict[Key, int] = {}  # path -> 1-based line (the key's line for mapping values)
        self.from_env: dict[Key, tuple[str, ...]] = {}  # path -> vars its value came from
        self.bad: set[Key] = set()  # paths whose values are already reported invalid
        self.muted: set[Key] = set()  # paths under which no further problem is reported
        self.problems: list[tuple[int, int, str]] = []  # (line, order, message)

    def line_of(self, path: Key) -> int:
        for i in range(len(path), -1, -1):
            if path[:i] in self.lines:
                return self.lines[path[:i]]
        return 0

    def report(
        self, path: Key, message: str, *, line: int | None = None, invalid: bool = False
    ) -> None:
        """Record a problem at `path`; `invalid` also marks its value unusable for later checks."""
        if invalid:
            self.bad.add(path)
        if any(path[:i] in self.muted for i in range(len(path) + 1)):
            return
        n = self.line_of(path) if line is None else line
        where = f"{self.source}:{n}" if n else self.source
        text = f"{where}: {fmt_path(path)}: {message}" if path else f"{where}: {message}"
        self.problems.append((n, len(self.problems), text))

    def ok(self, path: Key) -> bool:
        """No invalid value at `path` or above it (so it can be read and cross-checked)."""
        return not any(path[:i] in self.bad for i in range(len(path) + 1))

    def messages(self) -> list[str]:
        return [text for _, _, text in sorted(self.problems)]

    def show(self, path: Key, value: object) -> str:
        """How a value is quoted in a message: never a secret nor a value from the environment."""
        if path in self.from_env:
            names = ", ".join(f"${{{n}}}" for n in self.from_env[path])
            return f"the value of {names} (not shown)"
        if _is_sensitive(path) and isinstance(value, str | int | float):
            return f"'{REDACTED}'"
        return _describe(value)


def fmt_path(path: Key) -> str:
    """("upstreams", 0, "timeout") -> "upstreams[0].timeout"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def suggest(word: str, candidates: Iterable[str]) -> str:
    """A "; did you mean 'x'?" hint, or ""."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _is_sensitive(path: Key) -> bool:
    """Paths whose values are never echoed in messages."""
    if not path:
        return False
    if path[0] == "keys" or path[:2] in (("oidc", "client_secret"), ("session", "store")):
        return True
    if path[0] == "oidc" and path[2:3] == ("client_secret",):  # the list form: oidc[i]
        return True
    if path[:2] == ("session", "redis") and path[2:3] in (("password",), ("sentinel_password",)):
        return True
    return len(path) >= 4 and path[0] == "upstreams" and path[2] == "set_headers"


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
