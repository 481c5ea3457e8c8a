"""YAML text -> plain Python values, recording each value's line and substituting `${VAR}`.

`yaml.compose` (SafeLoader) gives nodes with line numbers, which are converted by hand rather than
constructed by PyYAML so that every path gets its line, duplicate keys and odd tags are reported,
and alias bombs are stopped (`_MAX_NODES`, `_MAX_DEPTH`).

`${VAR}` and `${VAR:-default}` in string values come from the environment (`$${` is a literal
`${`). A bare `${X}` is not valid YAML inside a flow list such as `[${A}, ${B}]`, so references
are swapped for inert placeholder words before parsing and restored afterwards. Values that came
from the environment are recorded in `ctx.from_env` so that messages never echo them.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Final

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from bff.config.problems import Abort, Context, Key

_MAX_NODES: Final = 100_000  # after alias expansion: defeats "billion laughs" alias bombs
_MAX_DEPTH: Final = 64  # nesting depth; also stops recursive aliases (`&a [*a]`)

_TAG: Final = "tag:yaml.org,2002:"
_CONSTRUCTOR: Final = SafeConstructor()
# `$${` is an escaped literal `${`; `${...}` up to the first `}` on the same line is a reference.
_RAW_REF_RE: Final = re.compile(r"\$\$\{|\$\{[^{}\n]*\}")
_REF_RE: Final = re.compile(r"\$\$\{|\$\{([^}\n]*)\}|\$\{")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_yaml(ctx: Context, text: str) -> dict[str, Any]:
    """The top-level mapping of `text`, with lines and env references recorded in `ctx`.

    Raises Abort (after reporting) when there is no mapping to go on with.
    """
    ph = _Placeholders(text)
    try:
        node = yaml.compose(ph.text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = "; ".join(s for s in (e.context, e.problem) if s)
        ctx.report((), f"invalid YAML: {ph.restore(what or 'syntax error')}", line=line)
        raise Abort from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        ctx.report((), f"invalid YAML: character {e.character!r} is not allowed", line=line)
        raise Abort from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error is one of the above
        ctx.report((), f"invalid YAML: {type(e).__name__}", line=0)
        raise Abort from None
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null"):
        ctx.report((), "the config is empty; expected a mapping of settings", line=1)
        raise Abort
    ctx.lines[()] = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode) or node.tag != _TAG + "map":
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        ctx.report((), f"expected a mapping of settings at the top level, got {kind}")
        raise Abort
    data = _Converter(ctx, ph).convert(node, ())
    assert isinstance(data, dict)
    return data


class _Placeholders:
    """Swap `${...}` for words that YAML parses as plain text anywhere (even in `[a, b]`)."""

    def __init__(self, text: str) -> None:
        nonce = secrets.token_hex(6)
        while nonce in text:  # pragma: no cover - 48 random bits
            nonce = secrets.token_hex(6)
        self._originals: list[str] = []
        self._word = re.compile(rf"Q{nonce}(\d+)Z")

        def swap(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return m.group(0)
            self._originals.append(m.group(0))
            return f"Q{nonce}{len(self._originals) - 1}Z"

        self.text = _RAW_REF_RE.sub(swap, text) if "${" in text else text

    def restore(self, value: str) -> str:
        if not self._originals:
            return value
        return self._word.sub(lambda m: self._originals[int(m.group(1))], value)


class _Converter:
    def __init__(self, ctx: Context, ph: _Placeholders) -> None:
        self.ctx = ctx
        self.ph = ph
        self.count = 0

    def convert(self, node: yaml.Node, path: Key, depth: int = 0) -> Any:
        self.count += 1
        if self.count > _MAX_NODES or depth > _MAX_DEPTH:
            what = "too many nodes" if self.count > _MAX_NODES else "nested too deeply"
            self.ctx.report(path[:1], f"{what} (an alias loop or alias bomb?)")
            raise Abort
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, yaml.SequenceNode) and node.tag == _TAG + "seq":
            out: list[Any] = []
            for i, item in enumerate(node.value):
                self.ctx.lines[(*path, i)] = item.start_mark.line + 1
                out.append(self.convert(item, (*path, i), depth + 1))
            return out
        if isinstance(node, yaml.MappingNode) and node.tag == _TAG + "map":
            return self.mapping(node, path, depth)
        return self.bad_tag(node, path)

    def bad_tag(self, node: yaml.Node, path: Key) -> None:
        tag = node.tag.replace(_TAG, "!!", 1) if node.tag.startswith(_TAG) else node.tag
        self.ctx.report(path, f"unsupported YAML tag {tag}", invalid=True)
        self.ctx.muted.add(path)

    def mapping(self, node: yaml.MappingNode, path: Key, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        # `<<: *anchor` / `<<: [*a, *b]`: merged first, so that keys given here override them;
        # among merges the earlier one wins.
        for key_node, value_node in node.value:
            if key_node.tag != _TAG + "merge":
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    line = src.start_mark.line + 1
                    self.ctx.report(path, "'<<' merges only mappings", line=line)
                    continue
                for key, value in self.mapping(src, path, depth + 1).items():
                    out.setdefault(key, value)
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _TAG + "merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.ctx.report(path, "mapping keys must be plain strings", line=line)
                continue
            key = self.ph.restore(key_node.value)
            if key in first_line:
                self.ctx.report(
                    (*path, key),
                    f"duplicate key (first given on line {first_line[key]})",
                    line=line,
                )
                continue
            first_line[key] = line
            if key in out:  # overrides a merged key: forget what the merge recorded
                self.forget((*path, key))
            self.ctx.lines[(*path, key)] = line
            out[key] = self.convert(value_node, (*path, key), depth + 1)
        return out

    def forget(self, prefix: Key) -> None:
        n = len(prefix)
        for table in (self.ctx.lines, self.ctx.from_env):
            for k in [k for k in table if k[:n] == prefix]:
                del table[k]
        for marks in (self.ctx.bad, self.ctx.muted):
            marks.difference_update({k for k in marks if k[:n] == prefix})

    def scalar(self, node: yaml.ScalarNode, path: Key) -> Any:
        tag = node.tag
        value = self.ph.restore(node.value)
        if tag in (_TAG + "str", _TAG + "timestamp"):  # dates stay text: no key wants a date
            return self.substitute(value, path)
        if tag == _TAG + "null":
            return None
        if tag == _TAG + "bool":
            return _CONSTRUCTOR.bool_values.get(value.lower())
        if tag in (_TAG + "int", _TAG + "float"):
            try:
                if tag == _TAG + "int":
                    return _CONSTRUCTOR.construct_yaml_int(node)
                return _CONSTRUCTOR.construct_yaml_float(node)
            except (ValueError, ConstructorError):
                shown = self.ctx.show(path, value)
                self.ctx.report(
                    path, f"not a valid {tag.removeprefix(_TAG)}: {shown}", invalid=True
                )
                self.ctx.muted.add(path)
                return None
        return self.bad_tag(node, path)

    def substitute(self, value: str, path: Key) -> str:
        """`value` with its `${VAR}` references resolved; problems are reported at `path`."""
        if "${" not in value:
            return value
        names: list[str] = []
        failed = False

        def fail(message: str) -> str:
            nonlocal failed
            self.ctx.report(path, message)
            failed = True
            return ""

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            body = m.group(1)
            if body is None:
                return fail("unterminated ${ (write $${ for a literal ${)")
            name, sep, default = body.partition(":-")
            if not _ENV_NAME_RE.fullmatch(name):
                return fail(f"invalid variable reference ${{{body}}}")
            if "${" in default:
                return fail(f"${{{name}:-...}}: nested references are not supported")
            names.append(name)
            got = self.ctx.env.get(name)
            if sep and not got:  # ${VAR:-default}: unset or empty -> default
                return default
            if got is None:
                return fail(
                    f"environment variable {name} is not set"
                    f" (write ${{{name}:-default}} to give a default)"
                )
            return got

        result = _REF_RE.sub(repl, value)
        if failed:
            self.ctx.bad.add(path)
            self.ctx.muted.add(path)  # nothing more to say about a value we could not build
        if names:
            self.ctx.from_env[path] = tuple(dict.fromkeys(names))
        return result
