"""Memory estimates from a network's sizes, checked before anything large is allocated.

Two checks, both raising a one-line ConfigError that names the key, the estimate and the limit:

- while a model is built (`param_budget`, used by `cnncli.model.build_model`): before each built-in layer with
  parameters allocates them, its count (from the config entry and its input shape: conv C_out·C_in·K² (+ C_out),
  linear out·in (+ out), batch-norm 2·C plus 2·C buffers) is added to the model's total, and building stops when
  creating them would not fit. So an absurd `out_channels`, `out_features`, `kernel_size` or `input_shape` is
  refused by every command that builds a network, and by a checkpoint whose stored config describes one.
- for one step (`check_step`, before any data loads): the built model's parameters, gradients, optimizer buffers
  and the engine's per-worker gradient slots, plus the activations of the examples resident at once, from each
  layer's `output_shape` (and a convolution's im2col columns, C_in·K²·H'·W' per example, from its `macs`), plus
  the batch itself. The engine keeps `TRAIN_MICRO_BATCH` (`EVAL_MICRO_BATCH`) examples per worker thread, or the
  whole batch for a network with batch-norm in training (cnncli/engine.py); the reference path (gradcheck, trace)
  the whole batch, in float64.

The limit is `$CNNCLI_MEMORY_LIMIT` (e.g. `8GiB`, `512MiB`, plain bytes; `0` or `off`: no check), else the memory
available now: MemAvailable in /proc/meminfo, capped by the cgroup's limit (containers), else the physical
memory (os.sysconf). The step estimates leave out NumPy's short-lived temporaries and the data set itself; for the
shipped configs they came within 0.55–1.4× of the peaks tracemalloc measured (tests/test_faults_memory.py holds
them within 0.4–2.5×). They are meant to stop sizes that are off by orders of magnitude, not to budget tightly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnncli.errors import ConfigError

if TYPE_CHECKING:
    from cnncli.layers import Layer
    from cnncli.model import Sequential

LIMIT_ENV = "CNNCLI_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


@dataclass(frozen=True)
class Limit:
    """How many bytes a command may plan to use (None: no check), and where that figure comes from."""

    bytes: int | None
    source: str

    def describe(self) -> str:
        if self.bytes is None:
            return f"no limit ({self.source})"
        hint = "" if self.source.startswith("$") else f"; ${LIMIT_ENV} overrides"
        return f"{human_bytes(self.bytes)} ({self.source}{hint})"


def human_bytes(n: float) -> str:
    """Binary units, as memory is counted: 512 B, 3.0 KiB, 37.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop returns


def parse_size(text: str) -> int | None:
    """'8GiB', '512M', '1.5 GB', '123456' -> bytes; '0', 'off', 'none' -> None (no limit). ValueError otherwise."""
    t = text.strip().lower()
    if t in ("0", "off", "none", "no", "false"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_room() -> int | None:
    """What the cgroup (v2 memory.max, v1 memory.limit_in_bytes) still allows this process, or None."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1's "no limit" is a huge number
            return None
        return max(limit - usage, 0)
    return None


def memory_limit() -> Limit:
    """The limit the checks compare with (see the module docstring). ConfigError for a bad $CNNCLI_MEMORY_LIMIT."""
    env = os.environ.get(LIMIT_ENV, "").strip()
    if env:
        try:
            return Limit(parse_size(env), f"${LIMIT_ENV}")
        except ValueError:
            raise ConfigError(f"${LIMIT_ENV}: expected a size such as 8GiB, 512MiB or a number of bytes, or 0 "
                              f"for no limit; got {env!r}") from None
    available, source = _meminfo_available(), "available memory, MemAvailable in /proc/meminfo"
    room = _cgroup_room()
    if room is not None and (available is None or room < available):
        available, source = room, "what the cgroup's memory limit leaves"
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            source = "physical memory"
        except (ValueError, OSError, AttributeError):
            return Limit(None, "the memory available could not be read")
    return Limit(available, source)


# ------------------------------------------------------------------------------------- while building


def param_count(opts: Any, input_shape: tuple[int, ...]) -> int:
    """Parameters and buffers a built-in layer entry creates for `input_shape`, computed without creating them
    (0 for layers without, for an input the layer will refuse anyway, and for layer types of your own)."""
    kind = getattr(opts, "type", "")
    shape = tuple(int(s) for s in input_shape)
    if kind == "conv" and len(shape) == 3:
        k = int(opts.out_channels) * shape[0] * int(opts.kernel_size) ** 2
        return k + (int(opts.out_channels) if opts.bias else 0)
    if kind == "linear" and len(shape) == 1:
        return int(opts.out_features) * shape[0] + (int(opts.out_features) if opts.bias else 0)
    if kind == "batchnorm" and len(shape) in (1, 3):
        return 4 * shape[0]  # γ, β and the two running statistics
    return 0


def _param_text(opts: Any, input_shape: tuple[int, ...], n: int) -> str:
    """The keys that make the count: 'out_channels 1,000,000 × 3 input channels × kernel_size 30² = …'."""
    kind = getattr(opts, "type", "")
    if kind == "conv":
        return (f"out_channels {int(opts.out_channels):,} × {input_shape[0]:,} input channels × kernel_size "
                f"{int(opts.kernel_size):,}² (+ bias) = {n:,} parameters")
    if kind == "linear":
        return f"out_features {int(opts.out_features):,} × {input_shape[0]:,} inputs (+ bias) = {n:,} parameters"
    return f"{input_shape[0]:,} channels: {n:,} parameters and buffers"


# Bytes per parameter while a model is built: the float64 draw of the initialisation, the parameter and its
# gradient buffer (the float32 ones of a float32 model).
BUILD_BYTES_FLOAT64_DRAW = 8


class ParamBudget:
    """The parameters of the model being built, checked against `limit` before each layer allocates its own."""

    def __init__(self, limit: Limit, itemsize: int) -> None:
        self.limit, self.itemsize = limit, itemsize
        self.count = 0

    def reserve(self, opts: Any, input_shape: tuple[int, ...], where: str) -> None:
        n = param_count(opts, input_shape)
        if not n:
            return
        self.count += n
        need = self.count * (BUILD_BYTES_FLOAT64_DRAW + 2 * self.itemsize)
        if self.limit.bytes is not None and need > self.limit.bytes:
            total = "" if self.count == n else f" ({self.count:,} with the layers before it)"
            raise ConfigError(
                f"{where}: {_param_text(opts, input_shape, n)}{total} need an estimated {human_bytes(need)} just to "
                f"create; the limit is {self.limit.describe()}"
            )


_BUDGET: ContextVar[ParamBudget | None] = ContextVar("cnncli_param_budget", default=None)


@contextmanager
def param_budget(itemsize: int) -> Iterator[ParamBudget]:
    """Check every layer `build_layers` creates inside the block (nested blocks share the outer budget)."""
    outer = _BUDGET.get()
    if outer is not None:
        yield outer
        return
    budget = ParamBudget(memory_limit(), itemsize)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def current_budget() -> ParamBudget | None:
    return _BUDGET.get()


# ----------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepEstimate:
    """Bytes one step needs, by part; `largest` names the layer with the most activation memory per example."""

    params: int  # parameters, gradients, optimizer buffers, the engine's gradient slots
    activations: int  # of the examples resident at once
    batch: int  # the batch's images (uint8, augmented, normalized) and logits
    resident: int  # examples in the network at once
    per_example: int  # activation bytes of one example
    largest: str  # 'model.layers[2] (conv2), output 64×16×16'

    @property
    def total(self) -> int:
        return self.params + self.activations + self.batch


def _layer_rows(layers: list[Layer], shape: tuple[int, ...], path: str) -> Iterator[tuple[str, int]]:
    """(label, activation elements per example) of each layer, residual blocks' members included."""
    for i, layer in enumerate(layers):
        out = tuple(layer.output_shape(shape))
        where = f"{path}[{i}]" + (f" ({layer.name})" if layer.name else f" ({layer.kind})")
        children = getattr(layer, "children", None)
        if isinstance(children, list) and children:
            yield from _layer_rows(children, shape, f"{where.split(' ')[0]}.layers")
            n = math.prod(out) * 2  # the block's sum and its δ
        else:
            # the output and its δ (the input's δ is the previous layer's)
            n = 2 * math.prod(out)
            macs, channels = layer.macs(shape), getattr(layer, "out_channels", 0)
            if layer.kind == "conv" and channels:
                n += macs // channels + 2 * math.prod(shape)  # im2col columns (C_in·K²·H'·W'); padded input, its δ
        yield f"{where}, output {'×'.join(map(str, out))}", n
        shape = out


def estimate_step(model: Sequential, batch: int, *, train: bool = True, itemsize: int = 4, engine: bool = True,
                  optimizer_buffers: int = 1, workers: int | None = None) -> StepEstimate:
    """What one training (or evaluation) step of `batch` examples needs, from the built model's sizes.

    engine: the fused engine (micro-batches per worker) or, False, the reference per-layer path (whole batch).
    optimizer_buffers: per parameter (SGD with momentum 1, Adam 2, plain SGD 0).
    """
    from cnncli.engine import EVAL_MICRO_BATCH, TRAIN_MICRO_BATCH, default_threads

    workers = workers or (default_threads() if engine else 1)
    n_params = sum(int(v.size) for v in model.named_params().values())
    n_buffers = sum(int(v.size) for v in model.named_buffers().values())
    per_param = (2 + optimizer_buffers + (workers if engine else 0)) if train else 1
    params = (n_params * per_param + n_buffers) * itemsize
    rows = list(_layer_rows(model.layers, tuple(model.input_shape), "model.layers"))
    inputs = math.prod(model.input_shape)
    per_example = (sum(n for _, n in rows) + 2 * inputs) * itemsize
    if not train:
        per_example //= 2  # nothing kept for a backward pass: no δ
    whole = train and any(layer.couples_batch() for layer in model.layers)
    micro = TRAIN_MICRO_BATCH if train else EVAL_MICRO_BATCH
    resident = batch if (whole or not engine) else min(batch, micro * workers)
    classes = math.prod(model.output_shape)
    batch_bytes = batch * (inputs * (3 + itemsize) + 2 * classes * itemsize)
    label, _ = max(rows, key=lambda r: r[1]) if rows else ("model.input_shape", 0)
    if rows and max(n for _, n in rows) < 2 * inputs:
        label = f"model.input_shape {list(model.input_shape)}"
    return StepEstimate(params, resident * per_example, batch_bytes, resident, per_example, label)


def check_step(model: Sequential, batch: int, key: str, what: str, limit: Limit | None = None,
               asked: int | None = None, **kwargs: Any) -> StepEstimate:
    """ConfigError when `estimate_step` exceeds the limit. `key` names the batch size (`train.batch_size`,
    `--batch`) and `asked` its value when `batch` is that value capped; `what` the step ('one training step').
    One example too many blames the largest layer; otherwise the batch size, with how many examples would fit."""
    limit = limit or memory_limit()
    est = estimate_step(model, batch, **kwargs)
    if limit.bytes is None or est.total <= limit.bytes:
        return est
    one = estimate_step(model, 1, **kwargs)
    parts = (f"parameters and optimizer {human_bytes(est.params)}, activations of {est.resident:,} examples "
             f"{human_bytes(est.activations)}, the batch {human_bytes(est.batch)}")
    if one.total > limit.bytes:
        where = "model.input_shape" if est.largest.startswith("model.input_shape") else est.largest.split(",")[0]
        raise ConfigError(
            f"{where}: {what} needs an estimated {human_bytes(one.total)} for a single example "
            f"(largest: {est.largest}; {parts}); the limit is {limit.describe()}"
        )
    fits = _largest_batch(model, batch, limit.bytes, **kwargs)
    raise ConfigError(
        f"{key}: {asked or batch:,}{f' (at most {batch:,} images at once)' if asked and asked > batch else ''}: "
        f"{what} needs an estimated {human_bytes(est.total)} ({parts}); the limit is "
        f"{limit.describe()}; at most about {fits:,} fit"
    )


def _largest_batch(model: Sequential, batch: int, limit: int, **kwargs: Any) -> int:
    lo, hi = 1, batch  # estimate(lo) fits, estimate(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate_step(model, mid, **kwargs).total <= limit else (lo, mid)
    return lo


# The most images a split of each downloadable data set holds (the official files), to cap the batch sizes the
# checks assume: a batch never holds more images than its split. A folder data set has no known size.
LARGEST_SPLIT = {"cifar10": 50_000, "cifar100": 50_000, "mnist": 60_000, "fashion-mnist": 60_000}


def batch_cap(data_cfg: Any) -> int | None:
    """The most images one batch of this data config can hold (None: unknown)."""
    caps = [c for c in (data_cfg.limit, LARGEST_SPLIT.get(data_cfg.dataset)) if c is not None]
    return min(caps) if caps else None


def check_training(cfg: Any) -> None:
    """Refuse, before any data loads, a config whose network or whose training or evaluation step would not fit:
    builds the network (the parameter check), then `check_step` for train.batch_size and train.eval_batch_size
    (each capped by `batch_cap`, as a batch never holds more images than its split)."""
    from cnncli.config import AdamConfig
    from cnncli.model import build_model

    limit = memory_limit()
    if limit.bytes is None:
        return
    model = build_model(cfg.model, seed=cfg.seed)
    opt = cfg.train.optimizer
    buffers = 2 if isinstance(opt, AdamConfig) else (1 if opt.momentum > 0 else 0)
    cap = batch_cap(cfg.data) or max(cfg.train.batch_size, cfg.train.eval_batch_size)
    check_step(model, min(cfg.train.batch_size, cap), "train.batch_size", "one training step", limit,
               cfg.train.batch_size, optimizer_buffers=buffers)
    check_step(model, min(cfg.train.eval_batch_size, cap), "train.eval_batch_size", "one evaluation batch", limit,
               cfg.train.eval_batch_size, train=False)
