"""The network's layers, one class each, forward and backward side by side.

Notation follows docs/derivations.md (the design article's): the first conv layer maps the
input X to the pre-activation S¹, ReLU gives A¹, max-pooling P¹, flatten h, the FC layer z, softmax p, and
δ[·] = ∂L/∂(·). Every array is batched: N is the batch size, images are (N, C, H, W).

Each layer keeps only what its backward pass needs (the im2col matrix for conv, the ReLU mask, the pooling
arg-max offsets). Computation happens in the dtype of the arrays given: float32 for training, float64 for
checking; the caller chooses (see `Sequential.astype`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnncli.options import LayerOptions, NoOptions, option
from cnncli.registry import register_layer

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


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


INIT_CHOICES = ("he", "uniform")
INIT_HELP = ("initial weights: he = normal, std √(2/fan_in), bias 0; uniform = U(±1/√fan_in) for weights and bias "
             "(PyTorch's default)")


def initial_weights(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, init: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(W of `shape`, b (shape[0],)) drawn from `rng`. "he": He/Kaiming normal, std √(2 / fan_in), the scale
    that keeps ReLU activations' variance steady, and b = 0. "uniform": W and b uniform in ±1/√fan_in, the
    default of PyTorch's Conv2d and Linear (after a batch-norm the weights' scale sets the effective step size,
    so this matters there even though the forward pass is normalised)."""
    if init == "he":
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), np.zeros(shape[0])
    if init == "uniform":
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape), rng.uniform(-bound, bound, shape[0])
    raise ValueError(f"init must be one of {', '.join(INIT_CHOICES)}, got {init!r}")


@register_layer
class Conv2D(Layer):
    """2-D convolution (cross-correlation, as the article writes it), docs/derivations.md#convolution.

    S[n, c, i, j] = Σ_{c', u, v} W[c, c', u, v] · X[n, c', s·i + u − pad, s·j + v − pad] + b[c]

    Parameters: W (C_out, C_in, K, K), b (C_out,). Input X (N, C_in, H, W); output S (N, C_out, H', W') with
    H' = (H + 2·pad − K) // stride + 1.

    The forward pass is one matrix product over an im2col matrix of shape (C_in·K·K, N·H'·W'), kept for
    the weight gradient. Set `needs_input_grad = False` on a first layer: δX is then not computed.
    """

    type_name = "conv"
    name_prefix = "conv"
    doc = "convolution"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        out_channels: int = option(16, min=1, help="filters C_out")
        kernel_size: int = option(3, min=1, help="kernel side K")
        stride: int = option(1, min=1, help="step s between windows")
        padding: int = option(0, min=0, help="zeros added on each side")
        bias: bool = option(True, help="learn a bias b (false before a batch-norm, which has its own shift)")
        init: str = option("he", choices=INIT_CHOICES, help=INIT_HELP)

    @classmethod
    def from_options(cls, opts: LayerOptions, input_shape: Shape, rng: np.random.Generator, dtype: type) -> Conv2D:
        if len(input_shape) != 3:
            raise ValueError(f"needs an image input (C, H, W), got {tuple(input_shape)}")
        o = cls.Options(**option_values(opts))
        return cls(input_shape[0], o.out_channels, o.kernel_size, o.stride, o.padding, rng=rng, dtype=dtype,
                   bias=o.bias, init=o.init)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        name: str = "conv",
        rng: np.random.Generator | None = None,
        dtype: type = np.float32,
        bias: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.needs_input_grad = True
        rng = rng if rng is not None else np.random.default_rng(0)
        fan_in = in_channels * kernel_size * kernel_size
        w, b = initial_weights(rng, (out_channels, in_channels, kernel_size, kernel_size), fan_in, init)
        self.params = {"W": w.astype(dtype)}
        if bias:
            self.params["b"] = b.astype(dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cols: np.ndarray | None = None
        self._x_shape: Shape | None = None

    def describe(self) -> str:
        k, s, p = self.kernel_size, self.stride, self.padding
        return f"conv {self.out_channels}×{k}×{k}, stride {s}, pad {p}"

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"expects an image input (C, H, W), got shape {tuple(input_shape)}")
        c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"expects {self.in_channels} input channels, got {c}")
        ho = _conv_out(h, self.kernel_size, self.stride, self.padding)
        wo = _conv_out(w, self.kernel_size, self.stride, self.padding)
        if ho < 1 or wo < 1:
            raise ValueError(
                f"output would be empty: input {c}×{h}×{w} with kernel {self.kernel_size}, "
                f"stride {self.stride}, padding {self.padding} gives {self.out_channels}×{ho}×{wo}"
            )
        return (self.out_channels, ho, wo)

    def macs(self, input_shape: Shape) -> int:
        _, ho, wo = self.output_shape(input_shape)
        return self.out_channels * ho * wo * self.in_channels * self.kernel_size**2

    def _im2col(self, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        """x (N, C, H, W) -> cols (C·K·K, N·H'·W'), rows ordered (c', u, v), columns (n, i, j)."""
        k, s, p = self.kernel_size, self.stride, self.padding
        if p:
            x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]  # (N, C, H', W', K, K)
        n, c, ho, wo = win.shape[:4]
        cols = win.transpose(1, 4, 5, 0, 2, 3).reshape(c * k * k, n * ho * wo)  # copies once
        return cols, ho, wo

    def forward(self, x: np.ndarray) -> np.ndarray:
        """X (N, C_in, H, W) -> S (N, C_out, H', W')."""
        n = x.shape[0]
        cols, ho, wo = self._im2col(x)
        w_mat = self.params["W"].reshape(self.out_channels, -1)  # (C_out, C_in·K·K)
        out = w_mat @ cols  # (C_out, N·H'·W')
        if "b" in self.params:
            out += self.params["b"][:, None]
        self._cols, self._x_shape = cols, x.shape
        return out.reshape(self.out_channels, n, ho, wo).transpose(1, 0, 2, 3)

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """δS (N, C_out, H', W') -> δX (N, C_in, H, W); fills grads W (C_out, C_in, K, K), b (C_out,).

        δb[c] = Σ_{n,i,j} δS[n,c,i,j];  δW[c,c',u,v] = Σ_{n,i,j} δS[n,c,i,j] · X[n,c', s·i+u−pad, s·j+v−pad];
        δX[n,c',x,y] = Σ_{c,u,v} W[c,c',u,v] · δS[n,c,i,j] over the (i, j) with s·i+u−pad = x, s·j+v−pad = y.
        """
        assert self._cols is not None and self._x_shape is not None, "backward before forward"
        n, c_in, h, w = self._x_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        c_out, ho, wo = dout.shape[1:]
        dout_mat = dout.transpose(1, 0, 2, 3).reshape(c_out, -1)  # (C_out, N·H'·W')
        if "b" in self.params:
            self.grads["b"] = dout_mat.sum(axis=1)
        self.grads["W"] = (dout_mat @ self._cols.T).reshape(self.params["W"].shape)
        if not self.needs_input_grad:
            return None
        w_mat = self.params["W"].reshape(c_out, -1)
        dcols = (w_mat.T @ dout_mat).reshape(c_in, k, k, n, ho, wo)
        # Scatter each kernel offset (u, v) back into a padded buffer: K·K strided adds, no np.add.at.
        dxp = np.zeros((n, c_in, h + 2 * p, w + 2 * p), dtype=dout.dtype)
        for u in range(k):
            for v in range(k):
                dxp[:, :, u : u + s * ho : s, v : v + s * wo : s] += dcols[:, u, v].transpose(1, 0, 2, 3)
        return dxp[:, :, p : p + h, p : p + w] if p else dxp


@register_layer
class ReLU(Layer):
    """A = max(0, S), docs/derivations.md#relu; backward δS = δA · 1(S > 0).

    Input and output (N, ...) of any shape; keeps only the boolean mask 1(S > 0).
    """

    type_name = "relu"
    doc = "relu"

    def __init__(self) -> None:
        super().__init__()
        self._mask: np.ndarray | None = None

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """S (N, ...) -> A (N, ...)."""
        self._mask = x > 0
        return x * self._mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δA (N, ...) -> δS (N, ...)."""
        assert self._mask is not None, "backward before forward"
        return dout * self._mask

    def piece(self) -> np.ndarray | None:
        """The mask 1(S > 0) of the last forward pass (a copy)."""
        return None if self._mask is None else self._mask.copy()

    def forward_on_piece(self, x: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, bool]:
        """S · mask for a fixed mask; crossed when 1(S > 0) of this x differs from it."""
        return x * piece, not np.array_equal(x > 0, piece)


@register_layer
class MaxPool2D(Layer):
    """Max-pooling, docs/derivations.md#max-pooling: P[n,c,p,q] = max_{u,v} A[n,c, s·p+u, s·q+v].

    Input (N, C, H, W); output (N, C, H', W') with H' = (H − K) // stride + 1 (rows and columns that no
    window covers are dropped). Backward (docs/derivations.md#max-pooling) routes each window's gradient to exactly one
    position, its arg-max; when several entries tie, the first in row-major order (u, then v) takes it.
    Keeps only the arg-max offset u·K + v of each window (uint8; uint32 for windows over 16×16).
    """

    type_name = "maxpool"
    doc = "max-pooling"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        kernel_size: int = option(2, min=1, help="window side K")
        stride: int | None = option(None, min=1, help="step between windows (default: kernel_size)")

    @classmethod
    def from_options(cls, opts: LayerOptions, input_shape: Shape, rng: np.random.Generator, dtype: type) -> MaxPool2D:
        if len(input_shape) != 3:
            raise ValueError(f"needs an image input (C, H, W), got {tuple(input_shape)}")
        return super().from_options(opts, input_shape, rng, dtype)  # type: ignore[return-value]

    def __init__(self, kernel_size: int = 2, stride: int | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self._argmax: np.ndarray | None = None
        self._x_shape: Shape | None = None

    def describe(self) -> str:
        return f"maxpool {self.kernel_size}×{self.kernel_size}, stride {self.stride}"

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"expects an image input (C, H, W), got shape {tuple(input_shape)}")
        c, h, w = input_shape
        ho = _conv_out(h, self.kernel_size, self.stride, 0)
        wo = _conv_out(w, self.kernel_size, self.stride, 0)
        if ho < 1 or wo < 1:
            raise ValueError(
                f"output would be empty: input {c}×{h}×{w} with kernel {self.kernel_size}, "
                f"stride {self.stride} gives {c}×{max(ho, 0)}×{max(wo, 0)}"
            )
        return (c, ho, wo)

    def _window(self, a: np.ndarray, u: int, v: int, ho: int, wo: int) -> np.ndarray:
        s = self.stride
        return a[:, :, u : u + s * (ho - 1) + 1 : s, v : v + s * (wo - 1) + 1 : s]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """A (N, C, H, W) -> P (N, C, H', W')."""
        k = self.kernel_size
        _, ho, wo = self.output_shape(x.shape[1:])
        out = self._window(x, 0, 0, ho, wo).copy()
        argmax = np.zeros(out.shape, dtype=np.uint8 if k * k <= 256 else np.uint32)  # offsets 0 … K²−1
        for o in range(1, k * k):
            cand = self._window(x, o // k, o % k, ho, wo)
            better = cand > out  # strictly greater: the earlier offset keeps a tie
            np.maximum(out, cand, out=out)
            argmax[better] = o
        self._argmax, self._x_shape = argmax, x.shape
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δP (N, C, H', W') -> δA (N, C, H, W), non-zero only at each window's arg-max."""
        assert self._argmax is not None and self._x_shape is not None, "backward before forward"
        k = self.kernel_size
        ho, wo = dout.shape[2:]
        dx = np.zeros(self._x_shape, dtype=dout.dtype)
        for o in range(k * k):
            # `+=` so that overlapping windows (stride < kernel) add their shares.
            self._window(dx, o // k, o % k, ho, wo)[...] += dout * (self._argmax == o)
        return dx

    def piece(self) -> np.ndarray | None:
        """The arg-max offset u·K + v of every window in the last forward pass (a copy)."""
        return None if self._argmax is None else self._argmax.copy()

    def forward_on_piece(self, x: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, bool]:
        """P[n,c,p,q] = A at the fixed arg-max offset of window (p, q); crossed when x's own arg-maxes differ."""
        k = self.kernel_size
        ho, wo = piece.shape[2:]
        out = np.zeros(piece.shape, dtype=x.dtype)
        for o in range(k * k):
            out += self._window(x, o // k, o % k, ho, wo) * (piece == o)
        self.forward(x)  # the real pass, only to see where its arg-maxes are
        crossed = not np.array_equal(self._argmax, piece)
        return out, crossed


@register_layer
class AvgPool2D(Layer):
    """Average pooling, docs/derivations.md#average-pooling:

    P[n,c,p,q] = (1/K²) Σ_{u,v} Xpad[n, c, s·p + u, s·q + v]

    with Xpad the input zero-padded by `padding` on each side; the zeros count in the divisor K² (PyTorch's
    count_include_pad=True). Input (N, C, H, W); output (N, C, H', W'), H' = (H + 2·pad − K) // s + 1.
    Backward: each window's δP/K² goes to every entry of the window (overlapping windows add). No cache but
    the input shape.
    """

    type_name = "avgpool"
    doc = "average-pooling"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        kernel_size: int = option(2, min=1, help="window side K")
        stride: int | None = option(None, min=1, help="step between windows (default: kernel_size)")
        padding: int = option(0, min=0, help="zeros added on each side, at most kernel_size // 2")

    def __init__(self, kernel_size: int = 2, stride: int | None = None, padding: int = 0) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self._x_shape: Shape | None = None

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"needs an image input (C, H, W), got {tuple(input_shape)}")
        if self.padding > self.kernel_size // 2:
            raise ValueError(f"padding {self.padding} is more than half the kernel {self.kernel_size}")
        c, h, w = input_shape
        ho = _conv_out(h, self.kernel_size, self.stride, self.padding)
        wo = _conv_out(w, self.kernel_size, self.stride, self.padding)
        if ho < 1 or wo < 1:
            raise ValueError(
                f"output would be empty: input {c}×{h}×{w} with kernel {self.kernel_size}, "
                f"stride {self.stride}, padding {self.padding}"
            )
        return (c, ho, wo)

    def macs(self, input_shape: Shape) -> int:
        c, ho, wo = self.output_shape(input_shape)
        return c * ho * wo * self.kernel_size**2

    def _windows(self, a: np.ndarray, ho: int, wo: int) -> list[np.ndarray]:
        """The K² strided views a[:, :, s·p + u, s·q + v] of a padded (N, C, H + 2p, W + 2p) array."""
        k, s = self.kernel_size, self.stride
        return [a[:, :, u : u + s * (ho - 1) + 1 : s, v : v + s * (wo - 1) + 1 : s] for u in range(k) for v in range(k)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """X (N, C, H, W) -> P (N, C, H', W')."""
        p = self.padding
        _, ho, wo = self.output_shape(x.shape[1:])
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        out = np.zeros((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype)
        for win in self._windows(xp, ho, wo):
            out += win
        out /= self.kernel_size**2
        self._x_shape = x.shape
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δP (N, C, H', W') -> δX (N, C, H, W): δX[n,c,x,y] = Σ over the windows holding (x, y) of δP/K²."""
        assert self._x_shape is not None, "backward before forward"
        n, c, h, w = self._x_shape
        p = self.padding
        ho, wo = dout.shape[2:]
        dxp = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dout.dtype)
        share = dout / self.kernel_size**2
        for win in self._windows(dxp, ho, wo):
            win += share
        return dxp[:, :, p : p + h, p : p + w] if p else dxp


@register_layer
class Flatten(Layer):
    """h = flatten(P), docs/derivations.md#flatten: h[n, k] = P[n, c, i, j] with k = c·H·W + i·W + j (C order).

    Input (N, C, H, W); output (N, C·H·W). Backward (docs/derivations.md#flatten) is the inverse reshape.
    """

    type_name = "flatten"
    doc = "flatten"

    def __init__(self) -> None:
        super().__init__()
        self._x_shape: Shape | None = None

    def output_shape(self, input_shape: Shape) -> Shape:
        return (int(np.prod(input_shape)),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """P (N, C, H, W) -> h (N, C·H·W)."""
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δh (N, C·H·W) -> δP (N, C, H, W)."""
        assert self._x_shape is not None, "backward before forward"
        return dout.reshape(self._x_shape)


@register_layer
class Linear(Layer):
    """Fully connected layer, docs/derivations.md#linear: z[n, i] = Σ_k W[i, k] · h[n, k] + b[i].

    Parameters: W (out, in), b (out,). Input h (N, in); output z (N, out). Backward, docs/derivations.md#linear:
    δb[i] = Σ_n δz[n,i], δW[i,k] = Σ_n δz[n,i] · h[n,k], δh[n,k] = Σ_i W[i,k] · δz[n,i].
    """

    type_name = "linear"
    name_prefix = "fc"
    doc = "linear"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        out_features: int = option(10, min=1, help="outputs")
        bias: bool = option(True, help="learn a bias b")
        init: str = option("he", choices=INIT_CHOICES, help=INIT_HELP)

    @classmethod
    def from_options(cls, opts: LayerOptions, input_shape: Shape, rng: np.random.Generator, dtype: type) -> Linear:
        if len(input_shape) != 1:
            raise ValueError(
                f"a linear layer needs a flat input but gets shape {'×'.join(map(str, input_shape))}; "
                "put a flatten layer before it"
            )
        o = cls.Options(**option_values(opts))
        return cls(input_shape[0], o.out_features, rng=rng, dtype=dtype, bias=o.bias, init=o.init)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        name: str = "fc",
        rng: np.random.Generator | None = None,
        dtype: type = np.float32,
        bias: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.needs_input_grad = True
        rng = rng if rng is not None else np.random.default_rng(0)
        w, b = initial_weights(rng, (out_features, in_features), in_features, init)
        self.params = {"W": w.astype(dtype)}
        if bias:
            self.params["b"] = b.astype(dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x: np.ndarray | None = None

    def describe(self) -> str:
        return f"linear {self.in_features}→{self.out_features}"

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 1:
            raise ValueError(
                f"expects a flat input (features,), got shape {tuple(input_shape)}: "
                "put a flatten layer before it"
            )
        if input_shape[0] != self.in_features:
            raise ValueError(f"expects {self.in_features} input features, got {input_shape[0]}")
        return (self.out_features,)

    def macs(self, input_shape: Shape) -> int:
        return self.in_features * self.out_features

    def forward(self, x: np.ndarray) -> np.ndarray:
        """h (N, in) -> z (N, out)."""
        self._x = x
        z = x @ self.params["W"].T
        return z + self.params["b"] if "b" in self.params else z

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """δz (N, out) -> δh (N, in); fills grads W (out, in), b (out,)."""
        assert self._x is not None, "backward before forward"
        self.grads["W"] = dout.T @ self._x
        if "b" in self.params:
            self.grads["b"] = dout.sum(axis=0)
        if not self.needs_input_grad:
            return None
        return dout @ self.params["W"]


@register_layer
class BatchNorm(Layer):
    """Batch normalisation, docs/derivations.md#batch-normalisation, over channels for images and over
    features for vectors: x (N, C, H, W) with statistics over the M = N·H·W values of each channel, or
    x (N, D) over the M = N values of each feature.

    Training mode: μ = mean, σ² = biased variance of the batch; x̂ = (x − μ) / √(σ² + ε); y = γ·x̂ + β; the
    running statistics move by r ← (1 − momentum)·r + momentum·(batch value), the variance's with the
    unbiased M/(M − 1)·σ². Evaluation mode: the running mean and variance instead of the batch's.
    Parameters γ (C,) ones, β (C,) zeros, not weight-decayed; buffers running_mean (C,) zeros, running_var
    (C,) ones. Backward (training): δγ = Σ δy·x̂, δβ = Σ δy, δx = γ/(M·√(σ²+ε)) · (M·δy − Σδy − x̂·Σ(δy·x̂)),
    the three paths through x̂, μ and σ² summed; evaluation: δx = γ·δy/√(r_var + ε). Keeps x̂ and 1/√(σ²+ε).
    """

    type_name = "batchnorm"
    name_prefix = "bn"
    doc = "batch-normalisation"
    decay = ()

    @dataclass(frozen=True)
    class Options(LayerOptions):
        momentum: float = option(0.1, gt=0, max=1, help="weight of the batch in the running statistics")
        eps: float = option(1e-5, gt=0, help="ε added to the variance")

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self._xhat: np.ndarray | None = None
        self._inv_std: np.ndarray | None = None

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: type) -> None:
        if len(input_shape) not in (1, 3):
            raise ValueError(f"needs images (C, H, W) or vectors (D,), got shape {tuple(input_shape)}")
        c = input_shape[0]
        self.params = {"gamma": np.ones(c, dtype=dtype), "beta": np.zeros(c, dtype=dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.buffers = {"running_mean": np.zeros(c, dtype=dtype), "running_var": np.ones(c, dtype=dtype)}

    def couples_batch(self) -> bool:
        return self.training  # batch statistics, and forward moves the running ones

    def check_batch(self, n: int, shape: Shape) -> None:
        """In training mode a variance needs at least two values per channel: ConfigError for a batch of n
        examples of `shape` (C, H, W) or (D,) with fewer (the fused engine asks this too, before its workers start)."""
        if self.training and n * int(np.prod(shape[1:], dtype=np.int64)) < 2:
            from cnncli.errors import ConfigError

            raise ConfigError(
                f"{self.name or 'batchnorm'}: batch-norm in training mode needs more than one value per "
                f"channel, got a batch of {n} of shape {tuple(shape)} (variance undefined); "
                "use a larger train.batch_size"
            )

    def describe(self) -> str:
        return f"batchnorm momentum {self.momentum:g}, ε {self.eps:g}"

    def macs(self, input_shape: Shape) -> int:
        return int(np.prod(input_shape))

    @staticmethod
    def _axes(x: np.ndarray) -> tuple[int, ...]:
        return (0, 2, 3) if x.ndim == 4 else (0,)

    @staticmethod
    def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
        return v.reshape(1, -1, 1, 1) if ndim == 4 else v.reshape(1, -1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, H, W) or (N, D) -> y, the same shape."""
        axes = self._axes(x)
        m = x.size // x.shape[1]
        if self.training:
            self.check_batch(x.shape[0], x.shape[1:])
            mu = x.mean(axis=axes)
            var = ((x - self._per_channel(mu, x.ndim)) ** 2).mean(axis=axes)
            rm, rv, mom = self.buffers["running_mean"], self.buffers["running_var"], self.momentum
            rm *= 1 - mom
            rm += (mom * mu).astype(rm.dtype)
            rv *= 1 - mom
            rv += (mom * var * m / (m - 1)).astype(rv.dtype)
        else:
            mu, var = self.buffers["running_mean"], self.buffers["running_var"]
        inv_std = 1.0 / np.sqrt(var + self.eps)
        xhat = (x - self._per_channel(mu, x.ndim)) * self._per_channel(inv_std, x.ndim)
        self._xhat, self._inv_std, self._train_pass = xhat, inv_std.astype(x.dtype), self.training
        return self._per_channel(self.params["gamma"], x.ndim) * xhat + self._per_channel(self.params["beta"], x.ndim)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy -> δx (same shape); fills grads gamma (C,), beta (C,)."""
        assert self._xhat is not None and self._inv_std is not None, "backward before forward"
        xhat, axes, nd = self._xhat, self._axes(dout), dout.ndim
        self.grads["gamma"] = (dout * xhat).sum(axis=axes)
        self.grads["beta"] = dout.sum(axis=axes)
        scale = self._per_channel(self.params["gamma"] * self._inv_std, nd)
        if not self._train_pass:
            return scale * dout
        m = dout.size // dout.shape[1]
        mean_d = self._per_channel(self.grads["beta"] / m, nd)
        mean_dx = self._per_channel(self.grads["gamma"] / m, nd)
        return scale * (dout - mean_d - xhat * mean_dx)


def softmax(z: np.ndarray) -> np.ndarray:
    """p = softmax(z) row by row (docs/derivations.md#softmax-and-cross-entropy); z (N, K) -> p (N, K).
    Stable: shifts by the row max."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of softmax(z) against integer labels, and its gradient.

    L = (1/N) Σ_n −log p[n, y_n] (averaged over the batch); δz = (p − onehot(y)) / N
    (with the 1/N of the mean; docs/derivations.md#softmax-and-cross-entropy).

    z (N, K) logits, y (N,) integer labels in [0, K) -> (loss, δz (N, K), p (N, K)).
    """
    n = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    rows = np.arange(n)
    loss = float(np.mean(log_norm - shifted[rows, y]))
    p = np.exp(shifted - log_norm[:, None])
    dz = p.copy()
    dz[rows, y] -= 1.0
    dz /= n
    return loss, dz, p


# ==========================================================================================================
# The layers of a modern small CNN (docs/derivations.md#global-average-pooling … #residual-block).
# ==========================================================================================================


@register_layer
class GlobalAvgPool2D(Layer):
    """Global average pooling, docs/derivations.md#global-average-pooling: g[n, c] = (1/(H·W)) Σ_{i,j} x[n, c, i, j].

    Input x (N, C, H, W); output g (N, C), already flat (no flatten needed before a linear layer). Backward:
    δx[n, c, i, j] = δg[n, c] / (H·W) at every position. No parameters; keeps only the input shape.
    """

    type_name = "globalavgpool"
    doc = "global-average-pooling"

    def __init__(self) -> None:
        super().__init__()
        self._x_shape: Shape | None = None

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(
                f"global average pooling needs an image input (C, H, W), got a vector of shape {tuple(input_shape)}"
                if len(input_shape) == 1 else f"global average pooling needs an image input (C, H, W), "
                f"got shape {tuple(input_shape)}"
            )
        return (input_shape[0],)

    def macs(self, input_shape: Shape) -> int:
        return int(np.prod(input_shape))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, H, W) -> g (N, C)."""
        self._x_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δg (N, C) -> δx (N, C, H, W), δg / (H·W) at every position."""
        assert self._x_shape is not None, "backward before forward"
        h, w = self._x_shape[2:]
        dx = np.empty(self._x_shape, dtype=dout.dtype)
        dx[...] = (dout / (h * w))[:, :, None, None]
        return dx


DEFAULT_STEP_KEY: tuple[int, ...] = (0,)  # a dropout layer's key before any `set_step` (gradcheck, a bare forward)


@register_layer
class Dropout(Layer):
    """Inverted dropout, docs/derivations.md#dropout: y = x ⊙ m / (1 − p) in training, y = x in evaluation.

    The mask m (any shape (N, ...), True = keep) has independent entries, kept with probability 1 − p. Backward:
    δx = δy ⊙ m / (1 − p) (evaluation: δx = δy). No parameters; keeps the mask.

    The mask is a function of the training step alone: `set_step(key)` (called by `Sequential.set_step` with
    key = (seed, epoch, batch, layer index) before each training step) fixes it, and the whole batch's mask is
    drawn at once from `np.random.default_rng(key)`, so a resumed run draws the same masks, and the engine's
    micro-batches and threads cannot change them (in training the layer `couples_batch`: the engine runs the
    whole batch at once). Without a key (gradcheck, a bare forward) the key is `DEFAULT_STEP_KEY`. The key lives
    in a one-element list shared by shallow copies (the engine's per-worker copies see every `set_step`).
    `piece()` is the mask, so finite differences hold it fixed.
    """

    type_name = "dropout"
    doc = "dropout"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        p: float = option(0.5, min=0, lt=1, help="probability of dropping a unit in training")

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self._key: list[tuple[int, ...]] = [DEFAULT_STEP_KEY]
        self._mask: np.ndarray | None = None  # None after an evaluation-mode pass

    def describe(self) -> str:
        return f"dropout p {self.p:g}"

    def set_step(self, key: tuple[int, ...]) -> None:
        """The training step the next forward passes belong to (see the class docstring)."""
        self._key[0] = tuple(int(k) for k in key)

    def couples_batch(self) -> bool:
        return self.training  # the mask is drawn for the whole batch

    def mask_for(self, shape: Shape) -> np.ndarray:
        """The keep-mask m (bool, `shape` = the whole batch's) of the current step: u ≥ p for u ~ U[0, 1)."""
        return np.random.default_rng(list(self._key[0])).random(shape) >= self.p

    def _apply(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return x * mask * (1.0 / (1.0 - self.p))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        if not self.training:
            self._mask = None
            return x
        self._mask = self.mask_for(x.shape)
        return self._apply(x, self._mask)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        return dout if self._mask is None else self._apply(dout, self._mask)

    def piece(self) -> np.ndarray | None:
        """The mask of the last forward pass (a copy); None in evaluation mode (the identity is smooth)."""
        return None if self._mask is None else self._mask.copy()

    def forward_on_piece(self, x: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, bool]:
        """y = x ⊙ m / (1 − p) for the fixed mask m; linear in x, so no kink is ever crossed."""
        self._mask = piece
        return self._apply(x, piece), False


@register_layer
class LeakyReLU(Layer):
    """y = x · 1(x > 0) + α · x · 1(x ≤ 0), docs/derivations.md#leaky-relu; δx = δy · (1(x > 0) + α · 1(x ≤ 0)).

    Input and output (N, ...) of any shape; α (`slope`) is fixed, not learned. Keeps the mask 1(x > 0); at
    x = 0 the slope is α (the strict test, as ReLU's).
    """

    type_name = "leakyrelu"
    doc = "leaky-relu"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        slope: float = option(0.01, min=0, lt=1, help="α, the slope for x ≤ 0")

    def __init__(self, slope: float = 0.01) -> None:
        super().__init__()
        self.slope = slope
        self._mask: np.ndarray | None = None

    def describe(self) -> str:
        return f"leakyrelu α {self.slope:g}"

    def _apply(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask, x, self.slope * x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        self._mask = x > 0
        return self._apply(x, self._mask)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        assert self._mask is not None, "backward before forward"
        return self._apply(dout, self._mask)

    def piece(self) -> np.ndarray | None:
        """The mask 1(x > 0) of the last forward pass (a copy)."""
        return None if self._mask is None else self._mask.copy()

    def forward_on_piece(self, x: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, bool]:
        """y with the slopes of a fixed mask; crossed when 1(x > 0) of this x differs from it."""
        return self._apply(x, piece), not np.array_equal(x > 0, piece)


@register_layer
class Tanh(Layer):
    """y = tanh(x), docs/derivations.md#tanh; δx = δy ⊙ (1 − y²).

    Input and output (N, ...) of any shape; smooth; keeps only the output y.
    """

    type_name = "tanh"
    doc = "tanh"

    def __init__(self) -> None:
        super().__init__()
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        self._y = np.tanh(x)
        return self._y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        assert self._y is not None, "backward before forward"
        return dout * (1.0 - self._y * self._y)


@register_layer
class Sigmoid(Layer):
    """y = σ(x) = 1 / (1 + e^(−x)), docs/derivations.md#sigmoid; δx = δy ⊙ y ⊙ (1 − y).

    Evaluated as 1/(1 + e^(−|x|)) for x ≥ 0 and e^(−|x|)/(1 + e^(−|x|)) for x < 0, so the exponent is never
    positive. Input and output (N, ...) of any shape; smooth; keeps only the output y.
    """

    type_name = "sigmoid"
    doc = "sigmoid"

    def __init__(self) -> None:
        super().__init__()
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        e = np.exp(-np.abs(x))
        self._y = np.where(x >= 0, 1.0, e) / (1.0 + e)
        return self._y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        assert self._y is not None, "backward before forward"
        return dout * self._y * (1.0 - self._y)


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
        from cnncli.model import build_layers  # model.py imports this module

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
            f = c.forward(f)
        return (self._shortcut.forward(x) if self._shortcut is not None else x) + f

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """δy (N, *out) -> δx (N, *in), the sum of the shortcut path and the F path; fills the members' grads."""
        d: np.ndarray | None = dout
        for c in reversed(self._children):
            assert d is not None
            d = c.backward(d)
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
