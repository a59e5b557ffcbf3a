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

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnncli.host.blas import blas_threads
from cnncli.nn import contracts
from cnncli.nn.diagnose import (
    Diagnosis,
    Entry,
    LayerFault,
    diagnose,
    diagnose_shape,
    entry_errors,
    fd_noise,
    is_special,
    locate,
    move_off,
    worst_entries,
)
from cnncli.nn.layer import Layer
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import Sequential

DEFAULT_EPS = 1e-3
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ENTRIES = 200
NOT_CHECKED = ("zero-both-sides", "special-value")  # diagnoses of a tensor that was not really compared


@dataclass(frozen=True)
class TensorCheck:
    """The result for one tensor ('conv1.W', ..., 'X')."""

    name: str
    shape: tuple[int, ...]
    size: int
    checked: int  # entries compared
    sampled: bool  # True when a random subset of entries was checked
    kinks: int  # checked entries whose ±ε steps would cross a ReLU/pool kink (evaluated on θ's piece)
    max_rel_error: float  # nan when nothing comparable was computed (a gradient never set, of another shape)
    worst_index: tuple[int, ...]
    passed: bool  # False only for a failure; a tensor "not checked" passes (see `status`)
    status: str = "pass"  # "pass", "fail" or "not checked" (zero on both sides, or a special value kept)
    diagnosis: Diagnosis | None = None  # what the whole tensor says (cnncli/nn/diagnose.py)
    worst: tuple[Entry, ...] = ()  # the worst entries: index, analytic, numeric, relative error
    layer: str = ""  # the layer the tensor belongs to ('' for X)
    inherited: str = ""  # the layer at fault above this tensor, whose error flows down into it


@dataclass(frozen=True)
class Report:
    """`gradcheck_report`'s answer: every tensor, the layers whose own backward disagrees with their own
    forward (the first is the layer at fault), and the parameters moved off a special value."""

    tensors: list[TensorCheck]
    faults: list[LayerFault]
    moved: list[tuple[str, float]]
    tol: float

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    @property
    def at_fault(self) -> LayerFault | None:
        return self.faults[0] if self.faults and not self.passed else None


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


def gradcheck(model: Sequential, **options: Any) -> list[TensorCheck]:
    """Check every parameter gradient of `model` and δX against finite differences: `gradcheck_report(...)`'s
    tensors (same options)."""
    return gradcheck_report(model, **options).tensors


def _sizes(n: int, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> dict[str, int]:
    """Named sizes of a layer, to name a constant factor: N, the input's C, H, W (or D), the output's."""
    names_in = ("C", "H", "W") if len(shape_in) == 3 else ("D",) if len(shape_in) == 1 else ()
    names_out = ("C_out", "H'", "W'") if len(shape_out) == 3 else ("D_out",) if len(shape_out) == 1 else ()
    sizes = {"N": n, **dict(zip(names_in, shape_in, strict=False))}
    for k, v in zip(names_out, shape_out, strict=False):
        if v not in sizes.values():
            sizes[k] = v
    return sizes


def _axes(layer: Layer | None, key: str, ndim: int) -> tuple[str, ...] | None:
    if layer is None:
        return ("n", "c", "row", "col") if ndim == 4 else ("n", "k") if ndim == 2 else None
    if key == "W" and ndim == 4:
        return ("c", "c'", "u", "v")
    if key == "W" and ndim == 2:
        return ("i", "k")
    return ("c",) if ndim == 1 else None


def gradcheck_report(
    model: Sequential,
    batch: int = 4,
    eps: float = DEFAULT_EPS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    initial_params: bool = False,
) -> Report:
    """Check every parameter gradient of `model` and δX against finite differences, and diagnose failures.

    The model is converted to float64 in place. x (N, *input_shape) and y (N,) default to a seeded random
    batch (standard normal pixels, uniform labels). Tensors with more than `max_entries` entries are checked
    on a seeded random subset of that many. Layers run in their current mode (training, for a new model:
    batch statistics); buffers are restored afterwards. `progress(done, total)` is called after each entry.

    `initial_params=False` first moves every parameter tensor that sits on a special value (all entries equal,
    or a lone 0 or ±1: β = 1, a zero bias) to random values around it, drawn from `seed` (listed in
    `Report.moved`); with True such tensors are kept and reported "not checked". Gradients that are never
    set, of the wrong shape or dtype are diagnosed per tensor (the layer contract, cnncli/nn/contracts.py); every
    other contract violation raises `LayerContractError`. When a tensor fails, each layer's own backward is
    checked against its own forward (`diagnose.locate`) and the tensors below the layer at fault are marked
    as inheriting its error.
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
    owner: dict[str, int] = {}
    for i, layer in enumerate(model.layers):
        for k in layer.params:
            owner[f"{layer.name}.{k}"] = i
    moved: list[tuple[str, float]] = []
    special: dict[str, float] = {}
    for name, arr in model.named_params().items():
        v = is_special(arr)
        if v is None:
            continue
        if initial_params:
            special[name] = v
        else:
            arr[...] = move_off(arr, np.random.default_rng([seed, len(moved)]))
            moved.append((name, v))

    # One BLAS thread: the products of a small float64 batch are tiny, and a multi-threaded BLAS spends
    # most of its time waking threads (10× slower on two busy cores).
    with frozen_buffers(model), blas_threads(1):
        inputs: list[np.ndarray] = []
        a = x
        for layer in model.layers:
            inputs.append(a)
            a = contracts.forward(layer, a)
        z = a
        loss0, dz, _ = softmax_cross_entropy(z, y)
        noise = fd_noise(loss0, eps)  # the five-point difference's own rounding: a smaller gap is no evidence
        base_state = pieces(model.layers)
        violations: dict[str, contracts.Violation] = {}
        d: Any = dz
        for layer in reversed(model.layers):
            found: list[contracts.Violation] = []
            d = contracts.backward(layer, d, collect=found)
            unknown = [v for v in found if v.kind == "grad-unknown-key"]
            for v in found:
                if v.kind != "grad-unknown-key":
                    violations[f"{layer.name}.{v.key}"] = v
            if unknown:
                never = [k for k in layer.params if (f"{layer.name}.{k}" in violations
                                                      and violations[f"{layer.name}.{k}"].kind == "grad-never-set")]
                if not never:
                    contracts.raise_first(layer, "backward", unknown)
                for k in never:
                    v = violations[f"{layer.name}.{k}"]
                    violations[f"{layer.name}.{k}"] = contracts.Violation(
                        v.kind, k, f"{v.message}; it set grads{[u.key for u in unknown]} instead, which is not a "
                        "parameter: a misspelt key?")
        dx = d
        analytic = {k: np.array(v, dtype=np.float64) for k, v in model.named_grads().items()}
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
        n = x.shape[0]
        for name, arr in tensors.items():
            entries = _pick_entries(arr.size, max_entries, rng)
            numeric = np.empty(len(entries))
            kinks = 0
            for i, flat in enumerate(entries):
                numeric[i], crossed = five_point(lambda step, f=int(flat), a=arr: loss_at(a, f, step), eps)
                kinks += crossed
                done += 1
                if progress is not None:
                    progress(done, total)
            index = [tuple(int(j) for j in np.unravel_index(int(f), arr.shape)) for f in entries]
            i_layer = owner.get(name, -1)
            layer = model.layers[i_layer] if i_layer >= 0 else None
            shape_in = tuple(inputs[i_layer].shape[1:]) if i_layer >= 0 else tuple(model.input_shape)
            shape_out = tuple(layer.output_shape(shape_in)) if layer is not None else shape_in
            got = analytic[name]
            violation = violations.get(name)
            diag: Diagnosis
            if violation is not None and violation.kind == "grad-shape":
                diag = diagnose_shape(got, numeric, index, tuple(arr.shape), tol, n)
                a_vals = np.full(len(entries), np.nan)
            elif violation is not None:
                diag = Diagnosis(violation.kind, violation.message)
                a_vals = np.full(len(entries), np.nan)
            else:
                a_vals = got.reshape(-1)[entries]
                diag = diagnose(a_vals, numeric, index, tuple(arr.shape), tol, _sizes(n, shape_in, shape_out),
                                _axes(layer, name.rpartition(".")[2], arr.ndim), noise=noise)
            errors = entry_errors(a_vals, numeric, noise)
            worst_at = int(np.nanargmax(errors)) if np.isfinite(errors).any() else 0
            worst = float(errors[worst_at])
            if diag.kind == "ok" and name in special:
                v = special[name]
                diag = Diagnosis(
                    "special-value", f"not checked: every entry is {v:g}, a value that can hide a bug (a factor "
                    "left out where it is 1, an index mixed up where all entries are equal)",
                    advice="let gradcheck draw such tensors at random (drop --initial-params), or check the layer "
                    "alone: cnn gradcheck --layer NAME")
            status = "pass" if diag.kind == "ok" else "not checked" if diag.kind in NOT_CHECKED else "fail"
            results.append(
                TensorCheck(
                    name=name,
                    shape=tuple(arr.shape),
                    size=int(arr.size),
                    checked=len(entries),
                    sampled=len(entries) < arr.size,
                    kinks=int(kinks),
                    max_rel_error=worst,
                    worst_index=index[worst_at],
                    passed=status != "fail",
                    status=status,
                    diagnosis=diag,
                    worst=worst_entries(a_vals, numeric, index, noise=noise),
                    layer=layer.name if layer is not None else "",
                )
            )
        faults: list[LayerFault] = []
        if not all(r.passed for r in results):
            for layer in model.layers:  # writable gradients again (the contract check left NaN read-only ones)
                for k in list(layer.params):
                    layer.grads[k] = np.zeros_like(layer.params[k])
            faults = locate(model.layers, inputs, tol, seed=seed, eps=eps)
            if faults:
                top = faults[0]
                results = [
                    dataclasses.replace(r, inherited=top.name)
                    if not r.passed and owner.get(r.name, 0) < top.index else r
                    for r in results
                ]
    model.set_input_grad(False)
    return Report(results, faults, moved, tol)
