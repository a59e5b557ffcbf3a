"""Memory estimates from a network's sizes, checked before anything large is allocated.

Two checks, both raising a one-line ConfigError that names the key, the estimate and the limit:

- while a model is built: the parameter budget of `cnncli/nn/build.py`;
- for one step (`check_step`, before any data loads): the built model's parameters, gradients, optimizer buffers
  and the engine's per-worker gradient slots, plus the activations of the examples resident at once, from each
  layer's `output_shape` (and a convolution's im2col columns, C_in·K²·H'·W' per example, from its `macs`), plus
  the batch itself. The engine keeps `TRAIN_MICRO_BATCH` (`EVAL_MICRO_BATCH`) examples per worker thread, or the
  whole batch for a network with batch-norm in training (cnncli/engine/); the reference path (gradcheck, trace)
  the whole batch, in float64.

The limit comes from `cnncli/host/limits.py`. The step estimates leave out NumPy's short-lived temporaries and the data
set itself; for the shipped configs they came within 0.55–1.4× of the peaks tracemalloc measured
(tests/faults/test_faults_memory.py holds them within 0.4–2.5×). They are meant to stop sizes that are off by orders of
magnitude, not to budget tightly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cnncli.host.errors import ConfigError

if TYPE_CHECKING:
    from cnncli.nn.layer import Layer
    from cnncli.nn.model import Sequential

from cnncli.catalogue import LARGEST_SPLIT
from cnncli.host.limits import Limit, human_bytes, memory_limit

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
    from cnncli.engine.executor import EVAL_MICRO_BATCH, TRAIN_MICRO_BATCH
    from cnncli.host.blas import worker_threads

    workers = workers or (worker_threads() if engine else 1)
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


def batch_cap(data_cfg: Any) -> int | None:
    """The most images one batch of this data config can hold (None: unknown)."""
    caps = [c for c in (data_cfg.limit, LARGEST_SPLIT.get(data_cfg.dataset)) if c is not None]
    return min(caps) if caps else None


def check_training(cfg: Any) -> None:
    """Refuse, before any data loads, a config whose network or whose training or evaluation step would not fit:
    builds the network (the parameter check), then `check_step` for train.batch_size and train.eval_batch_size
    (each capped by `batch_cap`, as a batch never holds more images than its split)."""
    from cnncli.config import AdamConfig
    from cnncli.nn.model import build_model

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
