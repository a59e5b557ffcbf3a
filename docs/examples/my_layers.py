"""Two layers of your own, each with the backward pass derived by hand (see docs/layers-api.md).

Use them in a config with `type: swish` and `type: prelu`, and name this file on the command line:

    cnn gradcheck --config docs/examples/my-layers.yaml --layers docs/examples/my_layers.py

Importing this file runs it as Python code: the tool only does that for a file you name with --layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncli import Layer, LayerOptions, option


class Swish(Layer):
    """y = x · σ(x) element-wise, σ(x) = 1 / (1 + e^(−x)): smooth, no parameters.

    Input and output (N, ...) of any shape. Backward: dy/dx = σ(x) + x · σ(x) · (1 − σ(x)), so
    δx = δy · (σ + x · σ · (1 − σ)). Keeps x and σ(x) for the backward pass.
    """

    type_name = "swish"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        self._x = x
        self._sig = 1.0 / (1.0 + np.exp(-x))
        return x * self._sig

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        x, s = self._x, self._sig
        return dout * (s + x * s * (1.0 - s))


class PReLU(Layer):
    """Parametric ReLU with one learnable slope per channel: y = x where x > 0, else a[c] · x.

    Input and output (N, C, ...) (images or vectors; channel = axis 1). Parameter a (C,), initialised to
    `init`. Backward, with m = 1(x > 0):
        δx = δy · (m + a[c] · (1 − m));   δa[c] = Σ over n and positions of δy · x · (1 − m).
    The kink at x = 0 makes the loss piecewise smooth: `piece()` hands the mask to the finite-difference
    checker, which then evaluates perturbed passes on the same mask (`forward_on_piece`).
    """

    type_name = "prelu"
    decay = ()  # a slope is not a weight: no weight decay on it

    @dataclass(frozen=True)
    class Options(LayerOptions):
        init: float = option(0.25, min=0.0, max=1.0, help="initial slope for negative inputs")

    def __init__(self, init: float = 0.25) -> None:
        super().__init__()
        self.init = init

    def build(self, input_shape: tuple[int, ...], rng: np.random.Generator, dtype: type) -> None:
        channels = input_shape[0]
        self.params = {"a": np.full(channels, self.init, dtype=dtype)}
        self.grads = {"a": np.zeros(channels, dtype=dtype)}

    def _slope(self, ndim: int) -> np.ndarray:
        """a shaped (1, C, 1, …) to broadcast over (N, C, …)."""
        return self.params["a"].reshape(1, -1, *([1] * (ndim - 2)))

    def _apply(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask, x, self._slope(x.ndim) * x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, ...) -> y (N, C, ...)."""
        self._x, self._mask = x, x > 0
        return self._apply(x, self._mask)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, C, ...) -> δx (N, C, ...); fills grads['a'] (C,)."""
        x, m = self._x, self._mask
        axes = tuple(i for i in range(x.ndim) if i != 1)
        self.grads["a"] = (dout * x * ~m).sum(axis=axes)
        return np.where(m, dout, self._slope(x.ndim) * dout)

    def piece(self) -> np.ndarray:
        return self._mask.copy()

    def forward_on_piece(self, x: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, bool]:
        return self._apply(x, piece), not np.array_equal(x > 0, piece)
