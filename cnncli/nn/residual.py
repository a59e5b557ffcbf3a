"""The residual block: y = x + F(x) (or Proj(x) + F(x)), F a list of layers built like the network's own.

Derived in docs/derivations.md#residual-block. Its members are ordinary layers; the block builds them with
`cnncli/nn/build.py`, the same code that builds the network's top-level list.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnncli.nn import contracts
from cnncli.nn.build import build_layers
from cnncli.nn.layer import Layer, Shape, option_values
from cnncli.nn.layers import Conv2D
from cnncli.nn.options import LayerOptions, option
from cnncli.nn.registry import register_layer


class _Flat(MutableMapping):
    """A residual block's `params`, `grads` or `buffers`: its members' own dicts seen as one, under
    '<member>.<key>' ('conv1.W', 'bn1.running_mean', 'shortcut.W', 'res1.conv1.W' for a nested block).

    A live view, not a copy: reading gives the member's array, setting a key sets the member's entry (so
    `Sequential.astype`, the engine and checkpoints that replace or read arrays by name stay in sync).
    """

    def __init__(self, block: Residual, attr: str) -> None:
        self._block, self._attr = block, attr

    def _dict(self, key: str) -> tuple[dict[str, Any] | MutableMapping, str]:
        name, dot, sub = key.partition(".")
        for member_name, member in self._block.members():
            if member_name == name and dot:
                return getattr(member, self._attr), sub
        raise KeyError(key)

    def __getitem__(self, key: str) -> np.ndarray:
        d, sub = self._dict(key)
        return d[sub]

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        d, sub = self._dict(key)
        d[sub] = value

    def __delitem__(self, key: str) -> None:
        d, sub = self._dict(key)
        del d[sub]

    def __iter__(self) -> Iterator[str]:
        for name, member in self._block.members():
            for k in getattr(member, self._attr):
                yield f"{name}.{k}"

    def __len__(self) -> int:
        return sum(len(getattr(member, self._attr)) for _, member in self._block.members())

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {tuple(v.shape)}' for k, v in self.items())}}}"


def _shortcut_stride(h: int, w: int, ho: int, wo: int) -> int | None:
    """The smallest stride s of a 1×1 convolution without padding that maps H×W to H'×W' (⌊(H − 1)/s⌋ + 1 = H'),
    or None when there is none."""
    for s in range(1, max(h, w) + 1):
        if (h - 1) // s + 1 == ho and (w - 1) // s + 1 == wo:
            return s
    return None


@register_layer
class Residual(Layer):
    """A residual block, docs/derivations.md#residual-block: y = x + F(x), or y = Proj(x) + F(x).

    F is the block's own list of layers (`layers:`, any registered types, residual blocks too), built like the
    top level's: named conv1, bn1, … within the block, so their parameters are '<block>.conv1.W' in
    checkpoints. When F changes the shape (C, H, W) -> (C', H', W') and `projection: true`, the shortcut is
    a 1×1 convolution `shortcut` (W (C', C, 1, 1), no bias, no padding) with the stride s that maps H×W to
    H'×W'; otherwise a shape change is a config error. Input x (N, C, H, W) (or (N, D) with an identity
    shortcut); output y, F's output shape.

    Backward: δx = (shortcut path: δy, or Projᵀ δy) + (F path: F's own backward of δy); both are kept in
    `paths` for `cnn trace`. Parameters, gradients and buffers are the members' (`_Flat` views), so the
    optimizer, `astype`, checkpoints and the engine see them by name. `piece()` is the members' pieces (their
    ReLU masks, pool arg-maxes, dropout masks held by finite differences); `train()`/`eval()` and
    `needs_input_grad` reach the members; `couples_batch()` when a member couples; a shallow copy (the
    engine's per-worker copy) copies the members too, sharing their params and buffers.
    """

    type_name = "residual"
    name_prefix = "res"
    doc = "residual-block"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        layers: tuple[LayerOptions, ...] = option((), help="F, the block's layers in order (at least one; any types)")
        projection: bool = option(False, help="a 1×1 strided conv (no bias) on the shortcut when F changes the shape")

    @classmethod
    def from_options(cls, opts: LayerOptions, input_shape: Shape, rng: np.random.Generator, dtype: type) -> Residual:
        o = cls.Options(**option_values(opts))
        if not o.layers:
            raise ValueError("a residual block needs at least one layer in `layers` (its F)")
        shape = tuple(input_shape)
        children, out = build_layers(o.layers, shape, rng, dtype, path="layers")
        shortcut = None
        if out != shape:
            what = f"F maps {_dims(shape)} to {_dims(out)}, so x cannot be added to F(x)"
            if not o.projection:
                raise ValueError(f"{what}; set projection: true for a 1×1 conv shortcut, or make F keep the shape")
            if len(shape) != 3 or len(out) != 3:
                raise ValueError(f"{what}, and a 1×1 conv shortcut (projection) needs images (C, H, W) on both sides")
            stride = _shortcut_stride(shape[1], shape[2], out[1], out[2])
            if stride is None:
                raise ValueError(f"{what}, and no stride of a 1×1 conv shortcut (projection) maps "
                                 f"{shape[1]}×{shape[2]} to {out[1]}×{out[2]}")
            if any(c.name == "shortcut" for c in children):
                raise ValueError("a layer of F is named 'shortcut', the name of the projection; rename it")
            shortcut = Conv2D(shape[0], out[0], 1, stride=stride, padding=0, name="shortcut", rng=rng, dtype=dtype,
                              bias=False)
        return cls(children, shortcut, o.projection)

    def __init__(self, children: list[Layer], shortcut: Conv2D | None = None, projection: bool = False) -> None:
        super().__init__()  # before the members exist: its empty params/grads/buffers must not reach them
        if not children:
            raise ValueError("a residual block needs at least one layer (its F)")
        self._children = list(children)
        self._shortcut = shortcut
        self.projection = projection
        self.paths: tuple[np.ndarray, np.ndarray] | None = None  # (shortcut path, F path) of the last δx

    # ---- the members and their state ---------------------------------------------------------------------
    @property
    def children(self) -> list[Layer]:
        """F's layers, in order."""
        return self._children

    @property
    def shortcut(self) -> Conv2D | None:
        """The projection (a 1×1 conv), or None for the identity shortcut."""
        return self._shortcut

    def members(self) -> list[tuple[str, Layer]]:
        """The named layers inside (those with parameters or buffers), and the projection as 'shortcut'."""
        if "_children" not in self.__dict__:
            return []
        named = [(c.name, c) for c in self._children if c.name]
        return named + ([("shortcut", self._shortcut)] if self._shortcut is not None else [])

    def _all(self) -> list[Layer]:
        if "_children" not in self.__dict__:
            return []
        return [*self._children, *([self._shortcut] if self._shortcut is not None else [])]

    def _distribute(self, attr: str, mapping: Any) -> None:
        """Setting a whole dict (`block.grads = {}`, as the engine does on its copies) sets each member's part."""
        for name, member in self.members():
            setattr(member, attr, {k[len(name) + 1 :]: v for k, v in dict(mapping).items() if k.startswith(name + ".")})

    @property  # type: ignore[override]
    def params(self) -> MutableMapping:
        return _Flat(self, "params")

    @params.setter
    def params(self, mapping: Any) -> None:
        self._distribute("params", mapping)

    @property  # type: ignore[override]
    def grads(self) -> MutableMapping:
        return _Flat(self, "grads")

    @grads.setter
    def grads(self, mapping: Any) -> None:
        self._distribute("grads", mapping)

    @property  # type: ignore[override]
    def buffers(self) -> MutableMapping:
        return _Flat(self, "buffers")

    @buffers.setter
    def buffers(self, mapping: Any) -> None:
        self._distribute("buffers", mapping)

    @property  # type: ignore[override]
    def decay(self) -> tuple[str, ...]:  # type: ignore[override]
        """The members' decayed parameters, by their names here ('conv1.W', 'shortcut.W')."""
        return tuple(f"{name}.{k}" for name, m in self.members() for k in m.params if k in m.decay)

    @property  # type: ignore[override]
    def training(self) -> bool:
        return self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training"] = mode
        for layer in self._all():
            layer.train(mode)

    @property  # type: ignore[override]
    def needs_input_grad(self) -> bool:
        return self.__dict__.get("_needs_dx", True)

    @needs_input_grad.setter
    def needs_input_grad(self, needed: bool) -> None:
        """Only F's first layer and the projection skip their δx when the block's is not needed."""
        self.__dict__["_needs_dx"] = needed
        if "_children" in self.__dict__:
            self._children[0].needs_input_grad = needed
            if self._shortcut is not None:
                self._shortcut.needs_input_grad = needed

    def __copy__(self) -> Residual:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._children = [copy.copy(c) for c in self._children]
        new._shortcut = copy.copy(self._shortcut) if self._shortcut is not None else None
        return new

    def couples_batch(self) -> bool:
        return any(c.couples_batch() for c in self._children)

    def set_step(self, key: tuple[int, ...]) -> None:
        """Pass the training step on: F's j-th layer gets (*key, j) (see `Sequential.set_step`)."""
        for j, c in enumerate(self._children):
            hook = getattr(c, "set_step", None)
            if hook is not None:
                hook((*key, j))

    # ---- description --------------------------------------------------------------------------------------
    def describe(self) -> str:
        inner = " → ".join(c.name or c.kind for c in self._children)
        if self._shortcut is None:
            return f"residual x + F(x), F: {inner}"
        return f"residual Proj(x) + F(x), F: {inner}; Proj: 1×1 conv, stride {self._shortcut.stride}"

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        for c in self._children:
            shape = c.output_shape(shape)
        short = self._shortcut.output_shape(input_shape) if self._shortcut is not None else tuple(input_shape)
        if short != shape:
            raise ValueError(f"the shortcut gives {_dims(short)} but F gives {_dims(shape)}")
        return shape

    def macs(self, input_shape: Shape) -> int:
        total, shape = 0, tuple(input_shape)
        for c in self._children:
            total += c.macs(shape)
            shape = c.output_shape(shape)
        return total + (self._shortcut.macs(input_shape) if self._shortcut is not None else 0)

    # ---- computation ----------------------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, *in) -> y = x + F(x) (or Proj(x) + F(x)), (N, *out)."""
        f = x
        for c in self._children:
            f = contracts.forward(c, f)  # a user's layer inside a block keeps the contract too
        return (self._shortcut.forward(x) if self._shortcut is not None else x) + f

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """δy (N, *out) -> δx (N, *in), the sum of the shortcut path and the F path; fills the members' grads."""
        d: np.ndarray | None = dout
        for c in reversed(self._children):
            assert d is not None
            d = contracts.backward(c, d)
        ds = self._shortcut.backward(dout) if self._shortcut is not None else dout
        if not self.needs_input_grad or d is None or ds is None:
            self.paths = None
            return None
        self.paths = (ds, d)
        return ds + d

    def piece(self) -> list[Any] | None:
        """F's layers' pieces (None for a block of smooth layers)."""
        state = [c.piece() for c in self._children]
        return None if all(p is None for p in state) else state

    def forward_on_piece(self, x: np.ndarray, piece: list[Any]) -> tuple[np.ndarray, bool]:
        """y with every layer of F held on its piece; crossed when any of them would leave it."""
        f, crossed = x, False
        for c, p in zip(self._children, piece, strict=True):
            if p is None:
                f = c.forward(f)
            else:
                f, c_crossed = c.forward_on_piece(f, p)
                crossed = crossed or c_crossed
        return (self._shortcut.forward(x) if self._shortcut is not None else x) + f, crossed


def _dims(shape: Shape) -> str:
    return "×".join(str(s) for s in shape)
