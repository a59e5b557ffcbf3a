"""Reading YAML and JSON that may be hostile (configs, `--set` values, run.json, sweep.json, a checkpoint's
stored config): plain data only, and bounded, so that no file can make the tool expand it into memory, recurse
until Python gives up, or print it whole into an error message.

- YAML aliases (`*name`, the "billion laughs" bomb) are refused outright: a config never needs them, and an
  alias is the only way a small file becomes a large structure. Anchors alone (`&name`) are harmless.
- Nesting deeper than `MAX_DEPTH` levels is refused (in YAML and JSON).
- Integers longer than `MAX_INT_DIGITS` characters or beyond ±(2⁶³ − 1) are refused before they are converted.
- A YAML mapping that repeats a key is refused (the second value would silently win).
- `describe(value)` / `show(value)` render a value for an error message: its kind and a prefix at most a
  line long, never the whole value.

Errors are `yaml.MarkedYAMLError`s (line and column) for YAML and `ValueError`s for JSON; the callers name the
file or option. Nothing here prints.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

MAX_DEPTH = 64  # nesting levels; the deepest built-in config has 6
MAX_INT = 2**63 - 1  # no key of any config means more than this
MAX_INT_DIGITS = 40  # characters of an integer literal (signs, underscores, 0x prefixes included)
MAX_SHOWN = 60  # characters of a value in an error message


class _Loader(yaml.SafeLoader):
    """SafeLoader (plain data only) that refuses aliases, deep nesting, huge integers and repeated keys, and
    reads `1e6` and `1e-3` as floats (YAML 1.1 reads them as strings; people mean numbers)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not accepted here; write the value "
                                "out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    repeated = key in seen
                except TypeError:
                    continue  # unhashable: the base class says so
                if repeated:
                    raise ConstructorError("while reading a mapping", node.start_mark,
                                           f"the key {show(key)} appears twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        text = str(node.value)
        if len(text) > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"an integer of {len(text)} characters is too large", node.start_mark)
        value = super().construct_yaml_int(node)
        if abs(value) > MAX_INT:
            raise ConstructorError(None, None, f"the integer {value} is too large (at most {MAX_INT})",
                                   node.start_mark)
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse one YAML document into plain data (dicts, lists, strings, numbers, booleans, None, dates).

    Raises yaml.YAMLError (a MarkedYAMLError with the line for every refusal listed in the module docstring)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: builds only plain data


def _json_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is too large")
    value = int(text)
    if abs(value) > MAX_INT:
        raise ValueError(f"the integer {value} is too large (at most {MAX_INT})")
    return value


def load_json(text: str) -> Any:
    """`json.loads` bounded as `load_yaml` is (depth, integers). Raises ValueError (JSONDecodeError included)."""
    try:
        value = json.loads(text, parse_int=_json_int)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    if depth_exceeds(value, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists/dicts nest deeper than `limit` levels (iterative: safe on any depth)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list | tuple):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def too_deep(value: Any, limit: int = MAX_DEPTH, level: int = 1) -> str | None:
    """None when mappings and lists in `value` nest at most `limit` levels; otherwise a one-line description
    of where they go deeper (the key path's start). Iterative, so safe on any depth, and it ends on a mapping
    or list that holds itself (which nests without end). `level`: the level `value` itself is at (2 for a
    top-level key's value). For values built in Python (the API): YAML and JSON are refused as they are read."""
    stack: list[tuple[Any, int, str]] = [(value, level, "")]
    while stack:
        v, d, where = stack.pop()
        if isinstance(v, dict | list | tuple):
            if d > limit:
                shown = where if len(where) <= MAX_SHOWN else where[:MAX_SHOWN] + "…"
                return (f"nested deeper than {limit} levels at {shown or 'the top'} (a mapping or list inside "
                        "itself nests without end)")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                key = f"[{k}]" if not isinstance(v, dict) else (f".{k}" if where else str(k))
                stack.append((x, d + 1, where + key if len(where) <= MAX_SHOWN else where))
    return None


# ------------------------------------------------------------------------------------- error messages


def kind(value: Any) -> str:
    """'a list', 'a mapping', 'a string', … : what a value is, in the words of a config's reader."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key(s)" if len(value) > 3 else "a mapping"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} values" if len(value) > 3 else "a list"
    if isinstance(value, datetime.datetime | datetime.date):
        return "a date"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, set | frozenset):
        return "a set"
    return f"a {type(value).__name__}"


class _Full(Exception):
    pass


def show(value: Any, limit: int = MAX_SHOWN) -> str:
    """`value` in YAML/JSON flow style for a message, cut after about `limit` characters with '…'."""
    parts: list[str] = []
    room = [limit]

    def emit(text: str) -> None:
        parts.append(text)
        room[0] -= len(text)
        if room[0] < 0:
            raise _Full

    def walk(v: Any, depth: int) -> None:
        if depth > 8:
            emit("…")
        elif isinstance(v, dict):
            emit("{")
            for i, (k, x) in enumerate(v.items()):
                emit(", " if i else "")
                walk(k, depth + 1)
                emit(": ")
                walk(x, depth + 1)
            emit("}")
        elif isinstance(v, list | tuple):
            emit("[")
            for i, x in enumerate(v):
                emit(", " if i else "")
                walk(x, depth + 1)
            emit("]")
        elif isinstance(v, str):
            emit(json.dumps(v[: limit + 1], ensure_ascii=False))
        elif v is None or isinstance(v, bool):
            emit(json.dumps(v))
        elif isinstance(v, int):
            digits = int(v.bit_length() * 0.30103) + 1
            emit(str(v) if digits < 100 else f"{'-' if v < 0 else ''}<an integer of about {digits} digits>")
        elif isinstance(v, float):
            emit(repr(v))
        else:
            emit(repr(v)[: limit + 1])

    try:
        walk(value, 0)
    except _Full:
        return "".join(parts)[:limit] + "…"
    return "".join(parts)


def describe(value: Any) -> str:
    """`show(value)` and its kind, for 'expected …, got <describe>': '[1, 2] (a list)', 'null'."""
    return "null" if value is None else f"{show(value)} ({kind(value)})"
