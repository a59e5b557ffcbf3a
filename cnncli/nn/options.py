"""How a layer declares its config keys: a frozen dataclass of `option(...)` fields.

    @dataclass(frozen=True)
    class Options(LayerOptions):
        out_channels: int = option(16, min=1, help="filters, C_out")

Config validation (types, bounds, unknown keys with did-you-mean), `--set`, the README's key reference and
`cnn config layers` all read these declarations; nothing else lists a layer's keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Bound names understood by the config builder: "min"/"max" inclusive, "gt"/"lt" strict, "choices" for strings.
_BOUNDS = ("min", "max", "gt", "lt", "choices")


def option(default: Any, *, help: str = "", **bounds: Any) -> Any:
    """A config key with a default, optional bounds (`min`, `max`, `gt`, `lt`, `choices`) and a help text."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"option(): unknown bound(s) {sorted(unknown)}; use {', '.join(_BOUNDS)}")
    return dataclasses.field(default=default, metadata={**bounds, "help": help})


@dataclass(frozen=True)
class LayerOptions:
    """The keys every layer has: `type` (the registered name) and an optional `name`.

    `name` names the layer's parameters and buffers in checkpoints (`conv1.W`, `bn1.running_mean`); layers
    with parameters or buffers get `<prefix><k>` by default (conv1, conv2, fc1, …).
    """

    type: str = ""
    name: str | None = option(None, help="names its parameters in checkpoints (default: conv1, fc1, …)")


@dataclass(frozen=True)
class NoOptions(LayerOptions):
    """A layer without keys of its own (relu, flatten, …)."""
