"""The layer types a config may name: the built-in ones and those of `--layers` files.

`LAYER_TYPES` maps a YAML `type` to its `Layer` class. The built-in classes register themselves with the
`@register_layer` decorator where they are defined (importing `cnncli` loads them); config parsing, model
building, the engine, gradcheck, trace, summary and checkpoints all find a layer type here. A `--layers FILE`
is imported as the user's own Python code (by design: it is theirs, named on the command line, never by a
config or a checkpoint, which stay data); every `Layer` subclass it defines with a `type_name` is registered.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import stat
import sys
from pathlib import Path
from typing import TypeVar

from cnncli.host.errors import ConfigError, os_reason
from cnncli.host.files import kind_of
from cnncli.nn.layer import Layer
from cnncli.nn.options import LayerOptions

L = TypeVar("L", bound="type[Layer]")

LAYER_TYPES: dict[str, type[Layer]] = {}
_SOURCES: dict[str, str] = {}  # type name -> where it was defined ("built-in" or the file)
_LOADED: dict[Path, list[str]] = {}


def _check_declaration(cls: type[Layer], source: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise ConfigError(f"{source}: {cls!r} is not a subclass of cnncli.Layer")
    name = cls.type_name
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{source}: {cls.__name__}.type_name must be a short word such as 'swish', got {name!r}")
    opts = cls.Options
    if not (isinstance(opts, type) and dataclasses.is_dataclass(opts) and issubclass(opts, LayerOptions)):
        raise ConfigError(
            f"{source}: {cls.__name__}.Options must be a dataclass subclassing cnncli.LayerOptions, got {opts!r}"
        )
    try:
        opts()
    except TypeError as e:
        raise ConfigError(f"{source}: {cls.__name__}.Options: every key needs a default ({e})") from None


def register_layer(cls: L, source: str = "built-in") -> L:
    """Add a layer class under its `type_name`; ConfigError when the name is taken by another class.

    The built-in layers use it as a class decorator (`@register_layer`), so a type is declared in one place."""
    _check_declaration(cls, source)
    name = cls.type_name
    if name in LAYER_TYPES and LAYER_TYPES[name] is not cls:
        where = _SOURCES[name]
        what = "a built-in layer type" if where == "built-in" else f"already defined in {where}"
        raise ConfigError(f"{source}: layer type {name!r} ({cls.__name__}) is {what}; choose another type_name")
    LAYER_TYPES[name] = cls
    _SOURCES[name] = source
    return cls


def load_layer_file(path: Path | str) -> list[str]:
    """Import a user's layer file and register its Layer subclasses; returns their type names.

    One-line ConfigError for a file that is missing, is not Python or defines no layer, and for a type name
    that clashes; an exception raised by the file's own code while importing keeps its traceback.
    """
    path = Path(path)
    key = path.resolve()
    if key in _LOADED:
        return _LOADED[key]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"--layers {path}: not found (a Python file of Layer subclasses)") from None
    except OSError as e:
        raise ConfigError(f"--layers {path}: cannot read: {os_reason(e)}") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the import, /dev/zero never end it
        raise ConfigError(f"--layers {path}: is {kind_of(mode)}, not a Python file of Layer subclasses")
    if path.suffix != ".py":
        raise ConfigError(f"--layers {path}: expected a Python file ending in .py")
    module_name = f"cnncli_user_layers_{len(_LOADED)}_{path.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have a loader
        raise ConfigError(f"--layers {path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)  # the user's own code: its exceptions keep their traceback
    except SyntaxError as e:
        del sys.modules[module_name]
        raise ConfigError(f"--layers {path}: invalid Python at line {e.lineno}: {e.msg}") from None
    found = [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Layer) and obj.__module__ == module_name and obj.type_name
    ]
    if not found:
        raise ConfigError(
            f"--layers {path}: defines no layer (a subclass of cnncli.Layer with a type_name, e.g. type_name = 'swish')"
        )
    names = []
    for cls in found:
        register_layer(cls, str(path))
        names.append(cls.type_name)
    _LOADED[key] = names
    return names


def layer_class(type_name: str) -> type[Layer]:
    return LAYER_TYPES[type_name]


def _bounds_text(meta: dict) -> str:
    parts = []
    for key, sign in (("min", "≥"), ("gt", ">"), ("max", "≤"), ("lt", "<")):
        if key in meta:
            parts.append(f"{sign} {meta[key]}")
    if "choices" in meta:
        parts.append(" \\| ".join(meta["choices"]))
    return f" ({', '.join(parts)})" if parts else ""


def layer_reference() -> str:
    """The README's table of layer types and their keys, made from the declarations themselves (every type
    also takes `name`)."""
    lines = ["| `type` | keys: default (bounds), meaning | derived in |", "|---|---|---|"]
    for name, cls in LAYER_TYPES.items():
        keys = []
        for f in dataclasses.fields(cls.Options):
            if f.name in ("type", "name"):
                continue
            default = f.default
            if default is None or isinstance(default, bool):
                default = "null" if default is None else str(default).lower()
            text = f"`{f.name}`: {default}{_bounds_text(dict(f.metadata))}"
            if f.metadata.get("help"):
                text += f", {f.metadata['help']}"
            keys.append(text)
        doc = f"[derivations](docs/derivations.md#{cls.doc})" if cls.doc else ""
        lines.append(f"| `{name}` | {'; '.join(keys) or '—'} | {doc} |")
    return "\n".join(lines) + "\n"
