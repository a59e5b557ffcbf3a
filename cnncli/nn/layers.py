"""The network's layers, one class each, forward and backward side by side.

Notation follows docs/derivations.md (the design article's): the first conv layer maps the
input X to the pre-activation S¹, ReLU gives A¹, max-pooling P¹, flatten h, the FC layer z, softmax p, and
δ[·] = ∂L/∂(·). Every array is batched: N is the batch size, images are (N, C, H, W).

Each layer keeps only what its backward pass needs (the im2col matrix for conv, the ReLU mask, the pooling
arg-max offsets). Computation happens in the dtype of the arrays given: float32 for training, float64 for
checking; the caller chooses (see `Sequential.astype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnncli.nn.layer import Layer, Shape, option_values
from cnncli.nn.options import LayerOptions, option
from cnncli.nn.registry import register_layer


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


def dirac_weights(w: np.ndarray) -> np.ndarray:
    """W (C_out, C_in, K, K) with its first min(C_in, C_out) filters replaced by the identity (Dirac) kernel:
    W[c, c', u, v] = 1(c' = c, u = v = K//2) for c < min(C_in, C_out); the other filters keep their values. With
    'same' padding (K odd, pad K//2) and stride 1 those output channels start as copies of the input channels
    (docs/derivations.md#dirac-initialisation)."""
    w = w.copy()
    k = w.shape[2] // 2
    for c in range(min(w.shape[0], w.shape[1])):
        w[c] = 0.0
        w[c, c, k, k] = 1.0
    return w


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
        dirac: bool = option(False, help="then make the first min(C_in, C_out) filters the identity (Dirac): "
                             "W[c, c, K//2, K//2] = 1, zero elsewhere")
        whiten: int = option(0, min=0, help="set W from the first N training images before training: eigenvectors "
                             "of their K×K patches' covariance / √(λ + whiten_eps) and their negatives (needs "
                             "out_channels = 2·C_in·K·K); 0 = off")
        whiten_eps: float = option(5e-4, gt=0, help="ε of the whitening init")

    @classmethod
    def param_count(cls, opts: LayerOptions, input_shape: Shape) -> int:
        """C_out·C_in·K² weights (+ C_out biases); 0 for an input that is not an image (refused when built)."""
        if len(input_shape) != 3:
            return 0
        k = int(opts.out_channels) * int(input_shape[0]) * int(opts.kernel_size) ** 2
        return k + (int(opts.out_channels) if opts.bias else 0)

    @classmethod
    def param_text(cls, opts: LayerOptions, input_shape: Shape, n: int) -> str:
        return (f"out_channels {int(opts.out_channels):,} × {input_shape[0]:,} input channels × kernel_size "
                f"{int(opts.kernel_size):,}² (+ bias) = {n:,} parameters")

    @classmethod
    def from_options(cls, opts: LayerOptions, input_shape: Shape, rng: np.random.Generator, dtype: type) -> Conv2D:
        if len(input_shape) != 3:
            raise ValueError(f"needs an image input (C, H, W), got {tuple(input_shape)}")
        o = cls.Options(**option_values(opts))
        d = input_shape[0] * o.kernel_size**2
        if o.whiten and o.out_channels != 2 * d:
            raise ValueError(f"whiten: a whitening init gives 2·C_in·K·K = {2 * d} filters (each eigenvector and its "
                             f"negative), but out_channels is {o.out_channels}")
        conv = cls(input_shape[0], o.out_channels, o.kernel_size, o.stride, o.padding, rng=rng, dtype=dtype,
                   bias=o.bias, init=o.init, dirac=o.dirac)
        conv.whiten, conv.whiten_eps = o.whiten, o.whiten_eps  # read by cnncli/nn/datainit.py before training
        return conv

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
        dirac: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.needs_input_grad = True
        self.whiten, self.whiten_eps = 0, 5e-4  # a data-dependent init (cnncli/nn/datainit.py); 0 = none
        rng = rng if rng is not None else np.random.default_rng(0)
        fan_in = in_channels * kernel_size * kernel_size
        w, b = initial_weights(rng, (out_channels, in_channels, kernel_size, kernel_size), fan_in, init)
        if dirac:
            w = dirac_weights(w)
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
    def param_count(cls, opts: LayerOptions, input_shape: Shape) -> int:
        """out·in weights (+ out biases); 0 for an input that is not a vector (refused when built)."""
        if len(input_shape) != 1:
            return 0
        return int(opts.out_features) * int(input_shape[0]) + (int(opts.out_features) if opts.bias else 0)

    @classmethod
    def param_text(cls, opts: LayerOptions, input_shape: Shape, n: int) -> str:
        return f"out_features {int(opts.out_features):,} × {input_shape[0]:,} inputs (+ bias) = {n:,} parameters"

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
    Parameters γ (C,) ones (none with `scale: false`: γ is then fixed at 1), β (C,) zeros, not
    weight-decayed; buffers running_mean (C,) zeros, running_var (C,) ones. Backward (training): δγ = Σ δy·x̂,
    δβ = Σ δy, δx = γ/(M·√(σ²+ε)) · (M·δy − Σδy − x̂·Σ(δy·x̂)), the three paths through x̂, μ and σ² summed;
    evaluation: δx = γ·δy/√(r_var + ε). Keeps x̂ and 1/√(σ²+ε).
    """

    type_name = "batchnorm"
    name_prefix = "bn"
    doc = "batch-normalisation"
    decay = ()

    @dataclass(frozen=True)
    class Options(LayerOptions):
        momentum: float = option(0.1, gt=0, max=1, help="weight of the batch in the running statistics")
        eps: float = option(1e-5, gt=0, help="ε added to the variance")
        scale: bool = option(True, help="learn the scale γ (false: γ fixed at 1, only β trains)")

    @classmethod
    def param_count(cls, opts: LayerOptions, input_shape: Shape) -> int:
        """γ (unless `scale: false`), β and the two running statistics: 4·C (3·C)."""
        return (4 if opts.scale else 3) * int(input_shape[0]) if len(input_shape) in (1, 3) else 0

    @classmethod
    def param_text(cls, opts: LayerOptions, input_shape: Shape, n: int) -> str:
        return f"{input_shape[0]:,} channels: {n:,} parameters and buffers"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, scale: bool = True) -> None:
        super().__init__()
        self.momentum, self.eps, self.scale = momentum, eps, scale
        self._xhat: np.ndarray | None = None
        self._inv_std: np.ndarray | None = None
        self._ones: np.ndarray = np.ones(0)

    def gamma(self) -> np.ndarray:
        """γ (C,): the parameter, or ones when the scale is fixed (`scale: false`)."""
        return self.params["gamma"] if "gamma" in self.params else self._ones

    def build(self, input_shape: Shape, rng: np.random.Generator, dtype: type) -> None:
        if len(input_shape) not in (1, 3):
            raise ValueError(f"needs images (C, H, W) or vectors (D,), got shape {tuple(input_shape)}")
        c = input_shape[0]
        self._ones = np.ones(c, dtype=dtype)
        self.params = {"gamma": np.ones(c, dtype=dtype)} if self.scale else {}
        self.params["beta"] = np.zeros(c, dtype=dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.buffers = {"running_mean": np.zeros(c, dtype=dtype), "running_var": np.ones(c, dtype=dtype)}

    def couples_batch(self) -> bool:
        return self.training  # batch statistics, and forward moves the running ones

    def check_batch(self, n: int, shape: Shape) -> None:
        """In training mode a variance needs at least two values per channel: ConfigError for a batch of n
        examples of `shape` (C, H, W) or (D,) with fewer (the fused engine asks this too, before its workers start)."""
        if self.training and n * int(np.prod(shape[1:], dtype=np.int64)) < 2:
            from cnncli.host.errors import ConfigError

            raise ConfigError(
                f"{self.name or 'batchnorm'}: batch-norm in training mode needs more than one value per "
                f"channel, got a batch of {n} of shape {tuple(shape)} (variance undefined); "
                "use a larger train.batch_size"
            )

    def describe(self) -> str:
        return f"batchnorm momentum {self.momentum:g}, ε {self.eps:g}" + ("" if self.scale else ", γ fixed at 1")

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
        return self._per_channel(self.gamma(), x.ndim) * xhat + self._per_channel(self.params["beta"], x.ndim)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy -> δx (same shape); fills grads gamma (C,), beta (C,)."""
        assert self._xhat is not None and self._inv_std is not None, "backward before forward"
        xhat, axes, nd = self._xhat, self._axes(dout), dout.ndim
        sum_dyx = (dout * xhat).sum(axis=axes)  # δγ (kept only when γ is a parameter)
        if "gamma" in self.params:
            self.grads["gamma"] = sum_dyx
        self.grads["beta"] = dout.sum(axis=axes)
        scale = self._per_channel(self.gamma() * self._inv_std, nd)
        if not self._train_pass:
            return scale * dout
        m = dout.size // dout.shape[1]
        mean_d = self._per_channel(self.grads["beta"] / m, nd)
        mean_dx = self._per_channel(sum_dyx / m, nd)
        return scale * (dout - mean_d - xhat * mean_dx)


def softmax(z: np.ndarray) -> np.ndarray:
    """p = softmax(z) row by row (docs/derivations.md#softmax-and-cross-entropy); z (N, K) -> p (N, K).
    Stable: shifts by the row max."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(z: np.ndarray, y: np.ndarray, smoothing: float = 0.0
                          ) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of softmax(z) against integer labels, and its gradient.

    L = (1/N) Σ_n −Σ_k q[n, k] log p[n, k] (averaged over the batch) with the target q = onehot(y) or, with
    label smoothing ε (`smoothing`), q = (1 − ε)·onehot(y) + ε/K; δz = (p − q) / N (with the 1/N of the
    mean; docs/derivations.md#softmax-and-cross-entropy, #label-smoothing).

    z (N, K) logits, y (N,) integer labels in [0, K) -> (loss, δz (N, K), p (N, K)).
    """
    n, k = z.shape
    shifted = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    rows = np.arange(n)
    nll = log_norm - shifted[rows, y]  # −log p[n, y_n]
    if smoothing:
        nll = (1.0 - smoothing) * nll + smoothing * (log_norm - shifted.mean(axis=1))
    loss = float(np.mean(nll))
    p = np.exp(shifted - log_norm[:, None])
    dz = p.copy()
    if smoothing:
        dz -= smoothing / k
    dz[rows, y] -= 1.0 - smoothing
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
