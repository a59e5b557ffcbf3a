"""Finite-difference check of every analytic gradient: each parameter tensor and the input X.

In float64 on a small random batch, each checked entry θ is perturbed and the loss re-evaluated with the
five-point centred difference

    n = (8·(L(θ+ε) − L(θ−ε)) − (L(θ+2ε) − L(θ−2ε))) / (12ε),

whose truncation error is O(ε⁴), so ε can be large enough that rounding noise stays far below 1e-6.

Kinks (ReLU at 0, max-pool near-ties) would make a difference quotient meaningless: the loss is only
piecewise smooth. The analytic gradient at θ is the derivative of the smooth piece θ lies on (fixed ReLU
masks 1(S > 0), fixed pool arg-maxes, a fixed dropout mask). So every perturbed forward pass here is
evaluated on that piece, through the public part of the layer API: `Layer.piece()` after the unperturbed
pass, `Layer.forward_on_piece` in the perturbed ones (smooth layers run as usual). A step that would have
crossed a kink is detected and counted in `kinks`; its entry is still checked, on the piece, so kinks never
cause a false failure. `cnn trace` uses the same functions (`pieces`, `forward_on_pieces`, `five_point`).
Derivation: docs/derivations.md#finite-difference-checks.

Relative error is CS231n's: |a − n| / max(1e-8, |a| + |n|), the worst entry of each tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnncli.host.blas import blas_threads
from cnncli.nn.layer import Layer
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import Sequential

DEFAULT_EPS = 1e-3
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ENTRIES = 200


@dataclass(frozen=True)
class TensorCheck:
    """The result for one tensor ('conv1.W', ..., 'X')."""

    name: str
    shape: tuple[int, ...]
    size: int
    checked: int  # entries compared
    sampled: bool  # True when a random subset of entries was checked
    kinks: int  # checked entries whose ±ε steps would cross a ReLU/pool kink (evaluated on θ's piece)
    max_rel_error: float
    worst_index: tuple[int, ...]
    passed: bool


def rel_error(a: np.ndarray | float, n: np.ndarray | float) -> np.ndarray:
    """CS231n relative error |a − n| / max(1e-8, |a| + |n|), element-wise."""
    a, n = np.asarray(a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    return np.abs(a - n) / np.maximum(1e-8, np.abs(a) + np.abs(n))


def pieces(layers: Sequence[Layer]) -> list[Any]:
    """The smooth piece the last forward pass lies on: each layer's `piece()` (None for smooth layers)."""
    return [layer.piece() for layer in layers]


def forward_on_pieces(layers: Sequence[Layer], x: np.ndarray, state: Sequence[Any]) -> tuple[np.ndarray, bool]:
    """Run `layers` on x with each piecewise layer held on its piece from `state` (see `pieces`); also says
    whether the true pass would leave the piece (a kink was crossed)."""
    crossed = False
    for layer, piece in zip(layers, state, strict=True):
        if piece is None:
            x = layer.forward(x)
        else:
            x, c = layer.forward_on_piece(x, piece)
            crossed = crossed or c
    return x, crossed


def five_point(change: Callable[[float], tuple[float, bool]], eps: float) -> tuple[float, bool]:
    """The five-point centred difference of f from `change(step)` = (f(θ + step) − f(θ) or f(θ + step),
    crossed): (8·(f(θ+ε) − f(θ−ε)) − (f(θ+2ε) − f(θ−2ε))) / 12ε, and whether any step crossed a kink.
    Differences are taken first, so equal values give exactly 0, not a rounding residue."""
    (fp2, c1), (fp1, c2), (fm1, c3), (fm2, c4) = (change(k * eps) for k in (2, 1, -1, -2))
    return (8 * (fp1 - fm1) - (fp2 - fm2)) / (12 * eps), bool(c1 or c2 or c3 or c4)


@contextmanager
def frozen_buffers(model: Sequential) -> Iterator[None]:
    """Restore every buffer (running statistics) after the block: perturbed passes must not move them."""
    saved = {k: v.copy() for k, v in model.named_buffers().items()}
    try:
        yield
    finally:
        model.load_buffers(saved)


def _pick_entries(size: int, max_entries: int, rng: np.random.Generator) -> np.ndarray:
    if size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, size=max_entries, replace=False))


def gradcheck(
    model: Sequential,
    batch: int = 4,
    eps: float = DEFAULT_EPS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[TensorCheck]:
    """Check every parameter gradient of `model` and δX against finite differences.

    The model is converted to float64 in place. x (N, *input_shape) and y (N,) default to a seeded random
    batch (standard normal pixels, uniform labels). Tensors with more than `max_entries` entries are checked
    on a seeded random subset of that many. Layers run in their current mode (training, for a new model:
    batch statistics); buffers are restored afterwards. `progress(done, total)` is called after each entry.
    """
    rng = np.random.default_rng(seed)
    model.astype(np.float64)
    model.set_input_grad(True)
    n_classes = model.output_shape[0]
    if x is None:
        x = rng.standard_normal((batch, *model.input_shape))
    x = np.array(x, dtype=np.float64)
    if y is None:
        y = rng.integers(0, n_classes, size=x.shape[0])

    # One BLAS thread: the products of a small float64 batch are tiny, and a multi-threaded BLAS spends
    # most of its time waking threads (10× slower on two busy cores).
    with frozen_buffers(model), blas_threads(1):
        z = model.forward(x)
        _, dz, _ = softmax_cross_entropy(z, y)
        base_state = pieces(model.layers)
        dx = model.backward(dz)
        analytic = {k: v.copy() for k, v in model.named_grads().items()}
        assert dx is not None
        analytic["X"] = dx

        tensors = dict(model.named_params())
        tensors["X"] = x

        def loss_at(arr: np.ndarray, flat_index: int, step: float) -> tuple[float, bool]:
            view = arr.reshape(-1)
            old = view[flat_index]
            view[flat_index] = old + step
            try:
                z, crossed = forward_on_pieces(model.layers, x, base_state)
                loss, _, _ = softmax_cross_entropy(z, y)
            finally:
                view[flat_index] = old
            return loss, crossed

        results = []
        total = sum(min(arr.size, max_entries) for arr in tensors.values())
        done = 0
        for name, arr in tensors.items():
            entries = _pick_entries(arr.size, max_entries, rng)
            errors = np.empty(len(entries))
            kinks = 0
            for i, flat in enumerate(entries):
                numeric, crossed = five_point(lambda step, f=int(flat), a=arr: loss_at(a, f, step), eps)
                kinks += crossed
                errors[i] = rel_error(analytic[name].reshape(-1)[flat], numeric)
                done += 1
                if progress is not None:
                    progress(done, total)
            worst_at = int(np.argmax(errors))
            worst = float(errors[worst_at])
            results.append(
                TensorCheck(
                    name=name,
                    shape=tuple(arr.shape),
                    size=int(arr.size),
                    checked=len(entries),
                    sampled=len(entries) < arr.size,
                    kinks=int(kinks),
                    max_rel_error=worst,
                    worst_index=tuple(int(i) for i in np.unravel_index(entries[worst_at], arr.shape)),
                    passed=worst <= tol,
                )
            )
    model.set_input_grad(False)
    return results
