"""Finite-difference check of every analytic gradient: each parameter tensor and the input X.

In float64 on a small random batch, each checked entry θ is perturbed and the loss re-evaluated with the
five-point centred difference

    n = (8·(L(θ+ε) − L(θ−ε)) − (L(θ+2ε) − L(θ−2ε))) / (12ε),

whose truncation error is O(ε⁴), so ε can be large enough that rounding noise stays far below 1e-6.

Kinks (ReLU at 0, max-pool near-ties) would make a difference quotient meaningless: the loss is only
piecewise smooth. The analytic gradient at θ is the derivative of the smooth piece θ lies on (fixed ReLU
masks 1(S > 0), fixed pool arg-maxes). So every perturbed forward pass here is evaluated on that piece: it
reuses the unperturbed pass's masks and arg-maxes (the conv and linear layers run as usual). A step that
would have crossed a kink is detected (the perturbed pass's own masks differ) and counted in `kinks`; its
entry is still checked, on the piece, so kinks never cause a false failure.

Relative error is CS231n's: |a − n| / max(1e-8, |a| + |n|), the worst entry of each tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncli.layers import MaxPool2D, ReLU, softmax_cross_entropy
from cnncli.model import Sequential

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


def _kink_state(model: Sequential) -> list[np.ndarray]:
    """The piece of the piecewise-smooth loss we are on: every ReLU mask and pool arg-max (copies)."""
    state = []
    for layer in model.layers:
        if isinstance(layer, ReLU):
            state.append(layer._mask.copy())
        elif isinstance(layer, MaxPool2D):
            state.append(layer._argmax.copy())
    return state


def _piece_forward(model: Sequential, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, bool]:
    """Forward pass on the smooth piece given by `state`; also says whether the real pass would leave it."""
    pieces = iter(state)
    crossed = False
    for layer in model.layers:
        if isinstance(layer, ReLU):
            mask = next(pieces)
            crossed = crossed or not np.array_equal(x > 0, mask)
            x = x * mask
        elif isinstance(layer, MaxPool2D):
            argmax = next(pieces)
            layer.forward(x)  # the real pass, only to see whether its arg-maxes moved
            crossed = crossed or not np.array_equal(layer._argmax, argmax)
            k = layer.kernel_size
            ho, wo = argmax.shape[2:]
            out = np.zeros(argmax.shape, dtype=x.dtype)
            for o in range(k * k):
                out += layer._window(x, o // k, o % k, ho, wo) * (argmax == o)
            x = out
        else:
            x = layer.forward(x)
    return x, crossed


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
) -> list[TensorCheck]:
    """Check every parameter gradient of `model` and δX against finite differences.

    The model is converted to float64 in place. x (N, *input_shape) and y (N,) default to a seeded random
    batch (standard normal pixels, uniform labels). Tensors with more than `max_entries` entries are checked
    on a seeded random subset of that many.
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

    z = model.forward(x)
    _, dz, _ = softmax_cross_entropy(z, y)
    base_state = [s.copy() for s in _kink_state(model)]
    dx = model.backward(dz)
    analytic = {k: v.copy() for k, v in model.named_grads().items()}
    assert dx is not None
    analytic["X"] = dx

    tensors = dict(model.named_params())
    tensors["X"] = x

    def loss_at(arr: np.ndarray, flat_index: int, value: float) -> tuple[float, bool]:
        view = arr.reshape(-1)
        old = view[flat_index]
        view[flat_index] = value
        try:
            z, crossed = _piece_forward(model, x, base_state)
            loss, _, _ = softmax_cross_entropy(z, y)
        finally:
            view[flat_index] = old
        return loss, crossed

    results = []
    for name, arr in tensors.items():
        entries = _pick_entries(arr.size, max_entries, rng)
        errors = np.empty(len(entries))
        kinks = 0
        for i, flat in enumerate(entries):
            theta = float(arr.reshape(-1)[flat])
            (lp2, c1), (lp1, c2), (lm1, c3), (lm2, c4) = (
                loss_at(arr, flat, theta + k * eps) for k in (2, 1, -1, -2)
            )
            kinks += c1 or c2 or c3 or c4
            # Differences first: equal losses then give exactly 0, not a rounding residue.
            numeric = (8 * (lp1 - lm1) - (lp2 - lm2)) / (12 * eps)
            errors[i] = rel_error(analytic[name].reshape(-1)[flat], numeric)
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
