"""YAML configs -> frozen dataclasses, with errors that name the key path and the value.

A config has four parts: `seed`, `model` (input shape and layer list), `data` and `train`. Every key has a
default except the model's layers; `model.input_shape` defaults to the data set's image shape. Unknown keys
are errors that suggest the nearest valid key; `--set key.path=value` overrides are applied to the raw
mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cnncli.catalogue import DATASET_NAMES, image_shape
from cnncli.host.errors import ConfigError
from cnncli.host.safeload import MAX_INT, MAX_SHOWN, describe, load_json, load_yaml, show, too_deep
from cnncli.nn.options import LayerOptions
from cnncli.nn.registry import LAYER_TYPES

# ---------------------------------------------------------------------------------------------- schema
# `metadata={"min": x}` bounds a number from below (inclusive); "gt" bounds it strictly;
# "max"/"lt" from above; "choices" lists allowed strings; "len" fixes a list's length. Layer types declare
# their keys the same way, in their own `Options` dataclass (`cnncli/nn/options.py`, `cnncli/nn/layers.py`).


@dataclass(frozen=True)
class ModelConfig:
    # One image's (C, H, W). Left out (None), `build_config` takes it from the data set `data` names
    # (`cnncli.catalogue.image_shape`), so every built config, and so every run's config.yaml and checkpoint, has it.
    input_shape: tuple[int, ...] | None = field(default=None, metadata={"min": 1, "len": 3})
    layers: tuple[LayerOptions, ...] = ()  # each entry is its layer type's Options (cnncli/nn/registry.py)


@dataclass(frozen=True)
class NormalizeConfig:
    # Per-channel mean and std on the [0, 1] scale (CIFAR-10's training-set statistics by default).
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = field(default=(0.2470, 0.2435, 0.2616), metadata={"gt": 0})


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True  # random horizontal flip
    crop_padding: int = field(default=4, metadata={"min": 0})  # random crop after zero padding; 0 = off
    pad_mode: str = field(default="zeros", metadata={"choices": ("zeros", "reflect")})  # what the crop pads with
    # random: a coin per image and batch; alternate: a random half of the images flipped in epoch 0, then each
    # epoch flips exactly those the previous one did not (a function of the seed, the image and the epoch)
    flip_mode: str = field(default="random", metadata={"choices": ("random", "alternate")})




@dataclass(frozen=True)
class DataConfig:
    dataset: str = field(default="cifar10", metadata={"choices": DATASET_NAMES})
    # Where the data set lives or is downloaded to (after --data-dir and $CNNCLI_DATA); for `folder`, the image
    # folder itself (after --data-dir; $CNNCLI_DATA does not apply).
    dir: str | None = None
    # A mirror (after $CNNCLI_CIFAR10_URL, $CNNCLI_CIFAR100_URL, $CNNCLI_MNIST_URL, $CNNCLI_FASHION_MNIST_URL):
    # the archive's URL for cifar10/cifar100, the URL of the folder holding the four .gz files for the MNISTs.
    url: str | None = None
    labels: str = field(default="fine", metadata={"choices": ("fine", "coarse")})  # cifar100: 100 or 20 classes
    # folder: channels (1 or 3), height, width every image is converted to (resized, centre-cropped)
    image_size: tuple[int, ...] = field(default=(3, 32, 32), metadata={"min": 1, "len": 3})
    val_size: int = field(default=5000, metadata={"min": 0})  # held out from the training images
    limit: int | None = field(default=None, metadata={"min": 1})  # use only the first N training images
    # {mean: [...], std: [...]}, or `auto`: computed from the training split (after data.limit and data.val_size);
    # a run stores the computed mean and std in its config.yaml and checkpoints.
    normalize: NormalizeConfig | str = field(default=NormalizeConfig(), metadata={"choices": ("auto",)})
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class SGDConfig:
    type: str = "sgd"
    lr: float = field(default=0.01, metadata={"gt": 0})
    momentum: float = field(default=0.9, metadata={"min": 0, "lt": 1})
    nesterov: bool = True
    weight_decay: float = field(default=5.0e-4, metadata={"min": 0})
    # false: λ·θ joins the gradient (L2); true: the decay does not scale with the learning rate or a group's
    # lr_scale: λ·s·θ per step, s the schedule's factor, still through the momentum (docs/derivations.md#optimisers)
    decoupled_weight_decay: bool = False


@dataclass(frozen=True)
class AdamConfig:
    type: str = "adam"
    lr: float = field(default=1.0e-3, metadata={"gt": 0})
    betas: tuple[float, ...] = field(default=(0.9, 0.999), metadata={"min": 0, "lt": 1, "len": 2})
    eps: float = field(default=1.0e-8, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})  # L2 added to the gradient
    decoupled_weight_decay: bool = False  # as SGD's


OptimizerConfig = Union[SGDConfig, AdamConfig]  # noqa: UP007
OPTIMIZER_TYPES: dict[str, type] = {"sgd": SGDConfig, "adam": AdamConfig}


# Per-epoch numbers that early stopping and the plateau schedule can watch; accuracies improve upwards.
MONITORED = ("val_acc", "val_loss", "train_acc", "train_loss")


@dataclass(frozen=True)
class ScheduleConfig:
    type: str = field(default="cosine", metadata={"choices": ("constant", "step", "cosine", "plateau", "piecewise")})
    warmup_epochs: float = field(default=0.0, metadata={"min": 0})  # linear ramp from ~0 to lr, per step
    step_size: int = field(default=5, metadata={"min": 1})  # step: multiply by gamma every step_size epochs
    gamma: float = field(default=0.1, metadata={"gt": 0})
    min_lr: float = field(default=0.0, metadata={"min": 0})  # cosine: floor of the decay; plateau: lowest lr
    # plateau: multiply the lr by `factor` once `monitor` has not improved by more than `min_delta` for
    # `patience` epochs in a row (as Keras's ReduceLROnPlateau, without cooldown)
    factor: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    patience: int = field(default=2, metadata={"min": 1})
    monitor: str = field(default="val_loss", metadata={"choices": MONITORED})
    min_delta: float = field(default=1.0e-4, metadata={"min": 0})
    # piecewise: [[fraction of the run's steps, factor of lr], …], fractions increasing from 0 to 1, the factor
    # linear in between (airbench: [[0, 0.2], [0.23, 1], [1, 0.07]])
    points: tuple[tuple[float, ...], ...] = field(default=(), metadata={"min": 0})


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop once `metric` has not improved by more than `min_delta` for `patience` epochs in a row."""

    metric: str = field(default="val_acc", metadata={"choices": MONITORED})
    patience: int = field(default=3, metadata={"min": 1})
    min_delta: float = field(default=0.0, metadata={"min": 0})


@dataclass(frozen=True)
class ParamGroupConfig:
    """How the parameters whose names match `match` train (cnncli/run/paramgroups.py; the first matching group
    of `train.param_groups` decides for a parameter, the others keep the defaults)."""

    # shell-style pattern on the names of `cnn summary` and checkpoints: "bn*.beta", "conv1.*", "*.b"
    match: str = ""
    lr_scale: float = field(default=1.0, metadata={"gt": 0})  # the learning rate is multiplied by this
    decay: bool | None = None  # weight decay on (true) or off (false); null: the layer's own rule (weights only)
    frozen: bool = False  # never updated
    trains_from: int = field(default=0, metadata={"min": 0})  # frozen in the epochs before this one (0-based)
    trains_until: int | None = field(default=None, metadata={"min": 0})  # frozen from this epoch (0-based) on


@dataclass(frozen=True)
class LookaheadConfig:
    """Every `every` steps the network moves to a running average of itself (cnncli/run/lookahead.py)."""

    every: int = field(default=5, metadata={"min": 1})
    decay: float = field(default=0.95, metadata={"gt": 0, "lt": 1})  # d = decay^every · (t/T)^power
    power: float = field(default=3.0, metadata={"min": 0})


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=15, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    eval_batch_size: int = field(default=1000, metadata={"min": 1})
    optimizer: OptimizerConfig = SGDConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    steps: int | None = field(default=None, metadata={"min": 1})  # total optimizer steps; replaces epochs
    drop_last: bool = False  # leave out each epoch's incomplete last batch
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "lt": 1})  # ε: target (1−ε)·onehot + ε/K
    param_groups: tuple[ParamGroupConfig, ...] = ()  # per-parameter learning-rate scale, decay, freezing
    lookahead: LookaheadConfig | None = None  # off unless given
    # test-time augmentation of the final test (cnncli/run/tta.py): none, mirror (2 views), mirror-translate (6 views)
    tta: str = field(default="none", metadata={"choices": ("none", "mirror", "mirror-translate")})
    early_stopping: EarlyStoppingConfig | None = None  # off unless given
    tensorboard: bool = False  # event files in the run folder (needs the tensorboard extra)
    gradflow: bool = True  # gradflow.json in the run folder: gradient norms, update ratios, dead ReLUs per epoch


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata={"min": 0})
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    name: str = "config"  # the config file's stem: names the run folder


def _layer_options() -> dict[str, type]:
    """The registered layer types' Options classes (live: `--layers` files add to them)."""
    return {name: cls.Options for name, cls in LAYER_TYPES.items()}


# A field annotated with one of these keys holds a mapping whose `type` picks the dataclass to build.
TAGGED_UNIONS: dict[Any, tuple[str, Any]] = {
    LayerOptions: ("layer type", _layer_options),
    OptimizerConfig: ("optimizer type", lambda: OPTIMIZER_TYPES),
}

# --------------------------------------------------------------------------------------------- builder


class ConfigValueError(ConfigError):
    """A ConfigError about one key: `path` is its key path ('train.optimizer.lr'), `detail` what is wrong, so
    that a caller can say where the value came from (the file or a --set)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}" if path else detail)
        self.path, self.detail = path, detail


def _fmt(value: Any) -> str:
    return show(value)


def _check_bounds(value: Any, meta: Any, path: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigValueError(path, f"must be one of {', '.join(meta['choices'])}, got {_fmt(value)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if "min" in meta and value < meta["min"]:
        kind = "a positive number" if meta["min"] == 1 else f"at least {meta['min']}"
        raise ConfigValueError(path, f"must be {kind}, got {_fmt(value)}")
    if "max" in meta and value > meta["max"]:
        raise ConfigValueError(path, f"must be at most {meta['max']}, got {_fmt(value)}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigValueError(path, f"must be greater than {meta['gt']}, got {_fmt(value)}")
    if "lt" in meta and value >= meta["lt"]:
        raise ConfigValueError(path, f"must be less than {meta['lt']}, got {_fmt(value)}")


def _convert(value: Any, tp: Any, meta: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples, int -> float)."""
    if tp in TAGGED_UNIONS:
        what, tables = TAGGED_UNIONS[tp]
        table = tables()
        if not isinstance(value, dict):
            raise ConfigValueError(path, f"expected a mapping with a 'type' key, got {describe(value)}")
        if "type" not in value:
            raise ConfigValueError(path, f"missing 'type' (one of {', '.join(table)})")
        kind = value["type"]
        if not isinstance(kind, str):
            raise ConfigValueError(f"{path}.type", f"expected the name of a {what} (one of {', '.join(table)}), "
                                   f"got {describe(kind)}")
        if kind not in table:
            hint = difflib.get_close_matches(kind, table, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            own = "; a layer of your own needs --layers FILE" if tp is LayerOptions and not did else ""
            raise ConfigValueError(f"{path}.type", f"unknown {what} {_fmt(kind)}{did}; one of {', '.join(table)}{own}")
        return _build(table[kind], value, path)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, str) and str in args:  # a mapping-or-keyword union: data.normalize: auto
            return _convert(value, str, meta, path)
        return _convert(value, args[0], meta, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigValueError(path, f"expected a mapping, got {describe(value)}")
        return _build(tp, value, path)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigValueError(path, f"expected a list, got {describe(value)}")
        if "len" in meta and len(value) != meta["len"]:
            raise ConfigValueError(path, f"expected a list of {meta['len']} values, got {describe(list(value))}")
        item_meta = {k: v for k, v in meta.items() if k != "len"}
        return tuple(_convert(v, item_tp, item_meta, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigValueError(path, f"expected true or false, got {describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigValueError(path, f"expected an integer, got {describe(value)}")
        if abs(value) > MAX_INT:
            raise ConfigValueError(path, f"the integer {_fmt(value)} is too large (at most {MAX_INT})")
        _check_bounds(value, meta, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigValueError(path, f"expected a number, got {describe(value)}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigValueError(path, f"the number {_fmt(value)} is too large (at most {MAX_INT})")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigValueError(path, f"expected a finite number, got {_fmt(value)}")
        _check_bounds(float(value), meta, path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigValueError(path, f"expected a string, got {describe(value)}")
        _check_bounds(value, meta, path)
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in the schema, not user input


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type, raw: dict[str, Any], path: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            name = key if isinstance(key, str) and len(key) <= MAX_SHOWN else _fmt(key)
            where = f"{path}.{name}" if path else name
            hint = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.6)
            did = f"; did you mean {(path + '.' if path else '') + hint[0]!r}?" if hint else ""
            valid = ", ".join(fields)
            raise ConfigValueError(where, f"unknown key{did} (valid keys here: {valid})")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            where = f"{path}.{name}" if path else name
            kwargs[name] = _convert(raw[name], hints[name], f.metadata, where)
    return cls(**kwargs)


def build_config(raw: Any, name: str = "config") -> Config:
    """Validate a raw mapping (as YAML gives it) into a `Config`; ConfigError names any wrong key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigValueError("", f"expected a mapping (seed, model, data, train) at the top level, got "
                               f"{describe(raw)}")
    deep = too_deep(raw)  # a mapping from Python may nest 5,000 levels or hold itself: YAML stops at 64
    if deep:
        raise ConfigValueError("", deep)
    raw = dict(raw)
    raw.setdefault("name", name)
    model = raw.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigValueError("model", f"expected a mapping (input_shape, layers), got {describe(model)}")
    if model is None or "layers" not in model:
        raise ConfigValueError("model.layers", "missing; list the network's layers (see cnn config show seed)")
    if not isinstance(model["layers"], list) or not model["layers"]:
        raise ConfigValueError("model.layers", f"expected a non-empty list of layers, got {describe(model['layers'])}")
    return resolve_input_shape(_build(Config, raw, ""))


def resolve_input_shape(cfg: Config) -> Config:
    """`cfg` with `model.input_shape` taken from its data set when the config leaves it out: the one place
    it is resolved. From the config alone, nothing read: (3, 32, 32) for CIFAR-10/100, (1, 28, 28) for the
    MNISTs, ``data.image_size`` for a folder. A stated shape is kept; training checks it against the data."""
    if cfg.model.input_shape is not None:
        return cfg
    model = dataclasses.replace(cfg.model, input_shape=tuple(image_shape(cfg.data.dataset, cfg.data.image_size)))
    return dataclasses.replace(cfg, model=model)


# ------------------------------------------------------------------------------------------ load & set

MAX_CONFIG_BYTES = 4 * 1024**2  # a config file is a few kilobytes; anything this large is something else


def parse_yaml(text: str) -> Any:
    """YAML text -> plain data, bounded (cnncli/host/safeload.py: no aliases, no deep nesting, no huge integers);
    also reads exponent floats such as 1e6. Raises yaml.YAMLError."""
    return load_yaml(text)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """' at line 3, column 7: <problem>' for a YAML error (the message PyYAML gives, on one line)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{where}: {' '.join(str(e.problem or e.context or 'invalid').split())}"
    return f": {' '.join(str(e).split())}"


def read_config_text(path: Path) -> str:
    """The text of a config file. ConfigError names the file and says what it is instead when it is no YAML
    text: missing, a folder, not a regular file (a FIFO or device would block or never end), too large, empty,
    a checkpoint (.npz) or another binary file, not UTF-8."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found{_builtin_hint(path)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: is not a regular file (a pipe or device), not a YAML config")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: is {st.st_size / 1024**2:.1f} MiB, not a YAML config (a config is at most "
                          f"{MAX_CONFIG_BYTES // 1024**2} MiB)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        if path.suffix == ".npz":
            raise ConfigError(f"{path}: is a .npz checkpoint, not a YAML config; to evaluate it: cnn eval {path}")
        raise ConfigError(f"{path}: is a zip archive, not a YAML config")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ConfigError(f"{path}: is UTF-16 text; a config is UTF-8 (save it as UTF-8)")
    if b"\x00" in data[:65536]:
        raise ConfigError(f"{path}: is a binary file, not a YAML config")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}), not a YAML "
                          "config") from None
    if not text.strip():
        raise ConfigError(f"{path}: is empty, not a config (see cnn config show seed for one to start from)")
    return text


def read_yaml(path: Path) -> Any:
    """Parse a YAML config file; ConfigError names the file (and the line, for a syntax error)."""
    text = read_config_text(path)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML{_yaml_problem(e)}") from None


def _parse_path(key: str) -> list[str | int]:
    """'model.layers[2].out_channels' -> ['model', 'layers', 2, 'out_channels']."""
    parts: list[str | int] = []
    for segment in key.split("."):
        name, _, rest = segment.partition("[")
        if not name and not parts:
            raise ValueError
        if name:
            parts.append(name)
        while rest:
            index, close, rest = rest.partition("]")
            if not close or not index.lstrip("-").isdigit():
                raise ValueError
            parts.append(int(index))
            rest = rest.removeprefix("[")
    if not parts:
        raise ValueError
    return parts


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _key_text(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _apply(raw: Any, overrides: list[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """`apply_overrides`, also returning (key path as build_config names it, the --set text) per override."""
    raw = copy.deepcopy(raw if raw is not None else {})
    if not isinstance(raw, dict):
        raise ConfigValueError("", f"expected a mapping at the top level, got {describe(raw)}")
    where: list[tuple[str, str]] = []
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        shown = _cut(item)
        if not eq or not key:
            raise ConfigError(f"--set {shown!r}: expected key.path=value, e.g. --set train.epochs=3")
        try:
            parts = _parse_path(key)
        except ValueError:
            raise ConfigError(f"--set {shown!r}: cannot read the key path {_cut(key)!r}") from None
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {shown!r}: cannot read the value{_yaml_problem(e)}") from None
        key = _cut(key)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            sub = _key_text(parts[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    raise ConfigError(f"--set {key}: {sub} is not an existing list entry")
                parts[i] = part % len(node)  # -1 -> the index build_config names
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {key}: {sub} is not a mapping")
                if not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or not -len(node) <= last < len(node):
                raise ConfigError(f"--set {key}: not an existing list entry")
            parts[-1] = last % len(node)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {key}: the parent is not a mapping")
        node[last] = value
        where.append((_key_text(parts), shown))
    return raw, where


def apply_overrides(raw: Any, overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (value parsed as YAML) to a raw config mapping, returning a copy."""
    return _apply(raw, overrides)[0]


def _within(path: str, parent: str) -> bool:
    """'model.layers[0].type' lies within 'model.layers' and 'model'; everything within '' (the top level)."""
    return not parent or path.startswith((parent + ".", parent + "["))


def build_with_overrides(raw: Any, overrides: list[str] | None, source: str, name: str = "config") -> Config:
    """`build_config(apply_overrides(raw, overrides))`, with errors that say where the wrong value came from:
    `--set KEY=VALUE: …` for a value an override set (a key inside it, or one it created on its way), and
    `SOURCE: key.path: …` otherwise."""
    raw, where = _apply(raw, list(overrides or []))
    try:
        return build_config(raw, name=name)
    except ConfigValueError as e:
        for path, item in reversed(where):  # the last --set of a key is the one that counts
            # the --set's value, a key inside it, or a key the --set created on its way (train.optimiser.lr=…)
            if e.path == path or _within(e.path, path) or _within(path, e.path):
                detail = e.detail if e.path == path else str(e)
                raise ConfigError(f"--set {item}: {detail}") from None
        raise ConfigError(f"{source}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# ------------------------------------------------------------------------------------ built-in configs

# The configs shipped in the package: cnncli/configs is a link to the checkout's configs/ folder (the source
# of truth), and the wheel carries the files themselves (package data), so `--config seed` works anywhere.
BUILTIN_DIR = Path(__file__).resolve().parent / "configs"


def builtin_configs() -> dict[str, Path]:
    """Name -> file of every built-in config (the .yaml files of cnncli/configs), sorted by name."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"), key=lambda p: p.stem)}


def _is_bare_name(text: str) -> bool:
    return bool(text) and "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))


def _builtin_hint(path: Path) -> str:
    names = builtin_configs()
    if path.stem in names:
        return f" (the built-in config of that name: --config {path.stem})"
    return f" (built-in configs: {', '.join(names)})" if names else ""


def resolve_config(spec: Path | str) -> Path:
    """The file `--config` means: a built-in config's name (`seed`, `seed-diagram`, … : `cnn config list`)
    unless a file of exactly that name exists here, else the path as given (a name with a .yaml or .yml suffix
    or a folder part is always a path). ConfigError (one line, listing the built-in names) for a bare name that
    is neither."""
    text = str(spec)
    path = Path(spec)
    if not _is_bare_name(text) or path.is_file():
        return path
    names = builtin_configs()
    if text in names:
        return names[text]
    if path.exists():
        return path  # a folder or a pipe of that name: read_config_text says what it is
    hint = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(f"{_cut(text)}: no config file of that name, and no built-in config {_cut(text)!r}{did} "
                      f"(built-in configs: {', '.join(names)}; or give a path to a .yaml file)")


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path, or a built-in config's name: `resolve_config`), apply `--set` overrides,
    validate. The config's name is the file's stem. Errors name the file, or the --set a wrong value came from."""
    path = resolve_config(path)
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: is not a YAML config: its top level is {describe(raw)}, a config is a mapping "
                          "(seed, model, data, train)")
    return build_with_overrides(raw, overrides, str(path), name=path.stem)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, JSON/YAML-ready mapping (tuples -> lists) that `build_config` reads back unchanged."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


def config_from_json(text: str, source: str) -> Config:
    """Rebuild a config stored as JSON (in a checkpoint; bounded as cnncli/host/safeload.py says); errors name
    `source`."""
    try:
        raw = load_json(text)
    except ValueError as e:
        raise ConfigError(f"{source}: the stored config is not valid JSON ({_cut(str(e))})") from None
    try:
        name = raw.get("name", "config") if isinstance(raw, dict) else "config"
        return build_config(raw, name=name if isinstance(name, str) else "config")
    except ConfigError as e:
        raise ConfigError(f"{source}: stored config: {e}") from None
