"""Names a user gives to things that become checkpoint keys or file names: layer names (`name:` of a layer entry,
the `<layer>.` prefix of its parameters in checkpoints) and run names (a config's `name`, the study name of
`cnn sweep --name`, which name folders under runs/).

- a layer name: a letter, then letters, digits, '_' or '-', at most 64 in all. No '.', so one layer's keys never
  reach into another's ('res1.conv1.W' is conv1 inside the block res1); `optim`, `config` and `state` (any case)
  are the checkpoint's own entries and are reserved.
- a run name: a letter or digit, then letters, digits, '_', '-' or '.', at most 64 in all, never '..': a folder
  name that stays inside its parent (no separator, not '.' or '..').
"""

from __future__ import annotations

import re

from cnncli.host.errors import ConfigError

MAX_NAME = 64
LAYER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED_NAMES = ("optim", "config", "state")  # checkpoint entries: optim.<param>.<buffer>, config, state

_RULES = {LAYER_NAME: "a letter, then letters, digits, '_' or '-'",
          RUN_NAME: "a letter or digit, then letters, digits, '_', '-' or '.'"}


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def check_name(value: object, key: str, pattern: re.Pattern[str] = LAYER_NAME, note: str = "") -> str:
    """`value` if it is a valid name by `pattern` (LAYER_NAME or RUN_NAME); ConfigError naming `key` and the value
    otherwise (`note` is added to the message, e.g. where the name came from)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a name (a string), got {value!r}")
    if len(value) > MAX_NAME:
        raise ConfigError(f"{key}: {_shown(value)}{note} is {len(value)} characters long; a name has at most "
                          f"{MAX_NAME}")
    if not pattern.fullmatch(value) or ".." in value:
        escapes = "/" in value or "\\" in value or ".." in value
        why = "contains a path separator or '..'" if escapes else "is not a valid name"
        raise ConfigError(f"{key}: {_shown(value)}{note} {why}: use {_RULES[pattern]} (at most {MAX_NAME})")
    if pattern is LAYER_NAME and value.lower() in RESERVED_NAMES:
        raise ConfigError(f"{key}: {_shown(value)} is reserved for the checkpoint's own entries "
                          f"({', '.join(RESERVED_NAMES)}); choose another name")
    return value
