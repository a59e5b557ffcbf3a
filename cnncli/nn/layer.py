"""`Layer`, the base class of every layer (the built-in ones and a user's own), and `Shape`.

A layer declares its YAML type, its options and its parameters here; the registry (`cnncli/nn/registry.py`) maps
type names to these classes and the built-in layers live in `cnncli/nn/layers.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from cnncli.nn.options import LayerOptions, NoOptions

Shape = tuple[int, ...]


class Layer:
    """The public base class of every layer, the built-in ones and yours (`cnn … --layers my_layers.py`).

    A layer type is declared once, by its class:

    - `type_name`: the YAML `type` (`conv`, `relu`, …); `Options`: a frozen dataclass of its config keys
      (subclass `LayerOptions`, fields made with `option(default, min=…, help=…)`), read by config validation,
      `--set`, did-you-mean and the key reference;
    - `from_options(opts, input_shape, rng, dtype)`: the layer for one example's input shape (default:
      `cls(**options)` then `build(input_shape, rng, dtype)`, where a layer creates its parameters);
    - `output_shape(input_shape)`, `forward(x)`, `backward(dout)`, side by side; `macs(input_shape)`.

    State: `params` and `grads` (same keys; the optimizer updates params, weight decay only on the keys in
    `decay`), `buffers` (non-trainable arrays such as running statistics: saved in checkpoints as
    `<name>.<key>`, never touched by the optimizer), `training` (the mode: `train()` / `eval()`), and
    `needs_input_grad` (False on a first layer: `backward` may then return None).

    Finite differences (`cnn gradcheck`, `cnn trace`) evaluate a piecewise-smooth layer on one fixed piece:
    `piece()` returns the discrete choices of the last forward pass (a ReLU mask, pool arg-maxes, a dropout
    mask) or None for a smooth layer, and `forward_on_piece(x, piece)` computes the output with those choices
    held, saying whether x's own choices would differ (a kink was crossed). See docs/layers-api.md.

    Optional hook `set_step(key: tuple[int, ...])`: a layer that draws random numbers in training (dropout)
    defines it; `Sequential.set_step(seed, epoch, batch)`, called by the training loop before each step, passes
    key = (seed, epoch, batch, layer index), so the draws depend on the step alone (a resumed run repeats them).
    """

    type_name: ClassVar[str] = ""
    Options: ClassVar[type[LayerOptions]] = NoOptions
    name_prefix: ClassVar[str] = ""  # default names <prefix>1, <prefix>2, …; "" means type_name
    decay: ClassVar[tuple[str, ...]] = ("W",)  # parameters that weight decay applies to
    doc: ClassVar[str] = ""  # its section of docs/derivations.md (the anchor), or a path of its own document

    name: str = ""
    options: LayerOptions | None = None

    def __init__(self) -> None:
        self.name = ""
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.training = True
        self.needs_input_grad = True

    # ---- declaration ------------------------------------------------------------------------------------
    @classmethod
    def from_options(cls, opts: LayerOptions, input_shape: Shape, rng: np.random.Generator, dtype: type) -> Layer:
        """The layer that `opts` (its config entry) describes, for one example's `input_shape`."""
        layer = cls(**option_values(opts))
        layer.build(tuple(input_shape), rng, dtype)
        return layer

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: type) -> None:
        """Create the parameters (and buffers) for one example's input shape; nothing by default."""

    @classmethod
    def param_count(cls, opts: LayerOptions, input_shape: Shape) -> int:
        """Parameters and buffers this type creates for `opts` and one example's `input_shape`, counted without
        creating them (checked against the memory limit before `build` allocates). 0 by default: a type with
        parameters overrides it (a user's layer that does not is simply not counted)."""
        return 0

    @classmethod
    def param_text(cls, opts: LayerOptions, input_shape: Shape, n: int) -> str:
        """The keys that make `param_count`'s figure, for the message that refuses it."""
        return f"{n:,} parameters and buffers"

    @property
    def kind(self) -> str:
        return self.type_name

    # ---- mode -------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Layer:
        self.training = mode
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def couples_batch(self) -> bool:
        """True when one example's output depends on the other examples of the batch (batch-norm in
        training mode), or when forward writes the buffers: the engine then runs the layer on the whole
        batch at once instead of in micro-batches."""
        return False

    # ---- computation --------------------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def output_shape(self, input_shape: Shape) -> Shape:
        """Shape of one example's output for one example's input shape; ValueError if it does not fit."""
        return tuple(input_shape)

    def macs(self, input_shape: Shape) -> int:
        """Multiply-adds per example in the forward pass."""
        return 0

    def piece(self) -> Any:
        """The discrete choices of the last forward pass (copies), or None when the layer is smooth."""
        return None

    def forward_on_piece(self, x: np.ndarray, piece: Any) -> tuple[np.ndarray, bool]:
        """Forward with `piece` (from `piece()`) held fixed -> (output, whether x's own choices differ)."""
        return self.forward(x), False

    def describe(self) -> str:
        """One line for `cnn summary`: the type and the options that differ from their defaults."""
        if self.options is None:
            return self.type_name
        defaults = type(self.options)()
        keys = [f"{k}={v}" for k, v in option_values(self.options).items() if v != getattr(defaults, k)]
        return " ".join([self.type_name, *keys])


def option_values(opts: LayerOptions) -> dict[str, Any]:
    """A layer's own option values (every field but `type` and `name`)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in ("type", "name")}
