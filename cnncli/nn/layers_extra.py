"""Layers of the airbench recipe (issue 26) beside the built-ins: GELU and a fixed scale (`multiply`).

Registered like the built-ins (importing `cnncli` loads this module); forward and backward side by side,
derived in docs/derivations.md (#gelu, #multiply). The engine has no fused stage for them: they run through their
own `forward` / `backward` in its per-layer stage (`_LayerStage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnncli.nn.layer import Layer
from cnncli.nn.options import LayerOptions, option
from cnncli.nn.registry import register_layer
from cnncli.nn.special import normal_cdf_and_density


@register_layer
class GELU(Layer):
    """y = x·Φ(x), Φ the standard normal CDF (the exact erf form), docs/derivations.md#gelu;
    δx = δy ⊙ (Φ(x) + x·φ(x)), φ(x) = e^(−x²/2)/√(2π).

    Φ(x) = ½·erfc(−x/√2) by `cnncli.special.normal_cdf` (float64: to a few units in the last place; float32:
    Abramowitz & Stegun 7.1.26, within 3·10⁻⁷). Input and output (N, ...) of any shape; smooth; keeps x, Φ(x)
    and φ(x).
    """

    type_name = "gelu"
    doc = "gelu"

    def __init__(self) -> None:
        super().__init__()
        self._x: np.ndarray | None = None
        self._cdf: np.ndarray | None = None
        self._pdf: np.ndarray | None = None

    def macs(self, input_shape: tuple[int, ...]) -> int:
        return int(np.prod(input_shape))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        cdf, pdf = normal_cdf_and_density(x)
        self._x, self._cdf, self._pdf = x, cdf, pdf
        return x * cdf

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        assert self._x is not None and self._cdf is not None and self._pdf is not None, "backward before forward"
        dx = self._x * self._pdf  # x·φ(x)
        dx += self._cdf
        dx *= dout
        return dx


@register_layer
class Scale(Layer):
    """y = α·x with a fixed α (`factor`), docs/derivations.md#multiply; δx = α·δy.

    Placed after the last linear layer it scales the logits (a softmax temperature of 1/α). Input and output
    (N, ...) of any shape; no parameters, no cache.
    """

    type_name = "multiply"
    doc = "multiply"

    @dataclass(frozen=True)
    class Options(LayerOptions):
        factor: float = option(1.0, help="α, the fixed factor (e.g. 0.111111 for logits × 1/9)")

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(factor) or factor == 0:
            raise ValueError(f"scale factor must be a finite non-zero number, got {factor!r}")
        self.factor = factor

    def describe(self) -> str:
        return f"multiply ×{self.factor:g}"

    def macs(self, input_shape: tuple[int, ...]) -> int:
        return int(np.prod(input_shape))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> y (N, ...)."""
        return x * x.dtype.type(self.factor)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """δy (N, ...) -> δx (N, ...)."""
        return dout * dout.dtype.type(self.factor)
