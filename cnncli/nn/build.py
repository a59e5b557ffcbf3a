"""Building layers from their config entries: `build_layers` (each entry for the previous one's output shape,
names conv1, bn1, …, errors with the entry's path), used for the network's list and a residual block's own, and
the parameter budget that refuses a layer before it allocates more than memory holds.

The budget: before each layer with parameters allocates them, its count (`Layer.param_count`, from the entry and
its input shape: conv C_out·C_in·K² (+ C_out), linear out·in (+ out), batch-norm 2·C plus 2·C buffers) is added
to the model's total, and building stops when creating them would not fit (`cnncli/host/limits.py`). So an absurd
`out_channels`, `out_features`, `kernel_size` or `input_shape` is refused by every command that builds a network,
and by a checkpoint whose stored config describes one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from cnncli.host.errors import ConfigError
from cnncli.host.limits import Limit, human_bytes, memory_limit
from cnncli.host.names import check_name
from cnncli.nn import contracts
from cnncli.nn.layer import Layer, Shape
from cnncli.nn.options import LayerOptions
from cnncli.nn.registry import LAYER_TYPES

# Bytes per parameter while a model is built: the float64 draw of the initialisation, the parameter and its
# gradient buffer (the float32 ones of a float32 model).
BUILD_BYTES_FLOAT64_DRAW = 8


class ParamBudget:
    """The parameters of the model being built, checked against `limit` before each layer allocates its own."""

    def __init__(self, limit: Limit, itemsize: int) -> None:
        self.limit, self.itemsize = limit, itemsize
        self.count = 0

    def reserve(self, opts: Any, input_shape: tuple[int, ...], where: str) -> None:
        cls = LAYER_TYPES.get(getattr(opts, "type", ""))
        n = cls.param_count(opts, tuple(int(s) for s in input_shape)) if cls is not None else 0
        if not n:
            return
        self.count += n
        need = self.count * (BUILD_BYTES_FLOAT64_DRAW + 2 * self.itemsize)
        if self.limit.bytes is not None and need > self.limit.bytes:
            total = "" if self.count == n else f" ({self.count:,} with the layers before it)"
            raise ConfigError(
                f"{where}: {cls.param_text(opts, input_shape, n)}{total} need an estimated {human_bytes(need)} just to "
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


class NestedLayerError(ConfigError):
    """A layer that does not fit, raised by `build_layers` with its path (`model.layers[2].layers[0] (conv1): …`);
    a block that builds layers of its own (`residual`) lets it pass, and its caller adds its own index."""


def build_layers(
    opts_list: tuple[LayerOptions, ...] | list[LayerOptions],
    input_shape: Shape,
    rng: np.random.Generator,
    dtype: type,
    path: str = "model.layers",
) -> tuple[list[Layer], Shape]:
    """Build a list of layer entries in order, each for the previous one's output shape -> (layers, output shape).

    Layers with parameters or buffers are named `<prefix><k>` (conv1, conv2, fc1, …) unless the entry names
    them; names are unique within one list (a residual block's layers are named within the block). Raises
    `NestedLayerError` naming the entry (`<path>[i] (name)`) when a layer does not fit its input.
    """
    shape: Shape = tuple(input_shape)
    layers: list[Layer] = []
    counts: dict[str, int] = {}
    names: set[str] = set()
    for i, opts in enumerate(opts_list):
        where = f"{path}[{i}]"
        cls = LAYER_TYPES[opts.type]
        prefix = cls.name_prefix or cls.type_name
        counts[prefix] = counts.get(prefix, 0) + 1
        default_name = f"{prefix}{counts[prefix]}"
        label = f"{where} ({opts.name or (default_name if cls.name_prefix else opts.type)})"
        budget = current_budget()
        try:
            if opts.name is not None:
                check_name(opts.name, f"{where}.name")
            if budget is not None:  # before the layer allocates its parameters: an absurd size stops here
                budget.reserve(opts, shape, label)
        except NestedLayerError:
            raise
        except ConfigError as e:  # a block's caller adds its own index to the path
            raise NestedLayerError(str(e)) from None
        try:
            layer = cls.from_options(opts, shape, rng, dtype)
            contracts.check_constructed(layer, where)  # a missing super().__init__() named before anything uses it
            out = layer.output_shape(shape)
        except NestedLayerError as e:  # from the layers inside a block: prefix the block's own index
            raise NestedLayerError(f"{where}.{e}") from None
        except ValueError as e:
            raise NestedLayerError(f"{label}: {e}") from None
        layer.options = opts
        if layer.params or layer.buffers or opts.name:
            layer.name = opts.name or default_name
            if layer.name in names:
                raise NestedLayerError(f"{where}.name: {layer.name!r} is already used by an earlier layer")
            names.add(layer.name)
        shape = out
        layers.append(layer)
    return layers, shape
