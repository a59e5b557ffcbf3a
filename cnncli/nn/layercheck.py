"""One layer alone against finite differences of its own forward (`cnn gradcheck --layer`, `cnn lab check`).

The check every backpropagation lab is graded by (CS231n's `eval_numerical_gradient_array`): for a layer f,
a random input x and a random upstream gradient g, the scalar ⟨g, f(x)⟩ has gradient δx = backward(g) with
respect to x and grads[k] with respect to each parameter. Each sampled entry is stepped by ±ε, ±2ε and the
five-point difference compared with the analytic value; perturbed passes are evaluated on the unperturbed
pass's piece (`piece()` / `forward_on_piece`), as in `cnn gradcheck`.

Unlike the whole-network check it draws the layer's parameters (and buffers) at random under the seed, not
their initial values: an initial β = 1 or a zero bias hides the bugs that the value cancels (β left out of
δx passes while β = 1). It runs several input shapes (batch 1 and 3, odd sizes), in training and evaluation
mode, in float64, and a parameter whose finite differences are zero for a random input and upstream gradient
fails: the output does not depend on it (a bias never added).

Library code: returns data, never prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnncli.host.blas import blas_threads
from cnncli.nn import contracts
from cnncli.nn.diagnose import Diagnosis, Entry, diagnose, diagnose_shape, entry_errors, worst_entries
from cnncli.nn.gradcheck import DEFAULT_EPS, DEFAULT_TOL, five_point

BATCHES = (1, 3)
MAX_ENTRIES = 60


@dataclass(frozen=True)
class Case:
    """One run of the layer: the per-example input shape, the batch size and the mode."""

    shape: tuple[int, ...]
    batch: int
    training: bool

    def text(self) -> str:
        return f"{'×'.join(map(str, (self.batch, *self.shape)))} {'train' if self.training else 'eval'}"


@dataclass(frozen=True)
class TensorResult:
    """One tensor ('δx' or a parameter key) in one case."""

    case: Case
    name: str
    shape: tuple[int, ...]
    checked: int
    max_rel_error: float
    passed: bool
    diagnosis: Diagnosis
    worst: tuple[Entry, ...]


@dataclass(frozen=True)
class LayerReport:
    layer: str  # the layer's label (name and class)
    results: list[TensorResult]
    tol: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def first_failures(self) -> list[TensorResult]:
        """The first failing case of each tensor."""
        seen: dict[str, TensorResult] = {}
        for r in self.results:
            if not r.passed and r.name not in seen:
                seen[r.name] = r
        return list(seen.values())


def randomize(layer: Any, rng: np.random.Generator) -> None:
    """Parameters drawn at random, magnitudes in [0.3, 1.7] with random signs (away from 0 and ±1, each entry
    different); buffers (running statistics) uniform in [0.5, 1.5] (positive, as a variance must be)."""
    for k, p in layer.params.items():
        layer.params[k] = (rng.uniform(0.3, 1.7, p.shape) * rng.choice((-1.0, 1.0), p.shape)).astype(np.float64)
    for k, b in layer.buffers.items():
        layer.buffers[k] = rng.uniform(0.5, 1.5, b.shape).astype(np.float64)
    for k in list(layer.grads):
        if k in layer.params:
            layer.grads[k] = np.zeros_like(layer.params[k])


def _pick(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(size) if size <= n else np.sort(rng.choice(size, size=n, replace=False))


def check_case(make: Callable[[tuple[int, ...]], Any], case: Case, seed: int, eps: float, tol: float,
               max_entries: int = MAX_ENTRIES) -> list[TensorResult]:
    """The layer built for `case.shape` by `make`, with random parameters, input and upstream gradient."""
    rng = np.random.default_rng([seed, case.batch, int(case.training), *case.shape])
    layer = make(case.shape)
    contracts.check_constructed(layer)
    randomize(layer, rng)
    layer.train(case.training)
    layer.needs_input_grad = True
    x = rng.standard_normal((case.batch, *case.shape))
    saved_buffers = {k: v.copy() for k, v in layer.buffers.items()}
    y0 = layer.forward(x)
    contracts.raise_first(layer, "forward", contracts.forward_violations(layer, x, y0))
    y0 = np.array(y0, dtype=np.float64)
    piece = layer.piece()
    g = rng.standard_normal(y0.shape)
    found: list[contracts.Violation] = []
    dx = contracts.backward(layer, g, x_shape=x.shape, collect=found)
    violations = {v.key: v for v in found if v.kind != "grad-unknown-key"}
    unknown = [v for v in found if v.kind == "grad-unknown-key"]
    if unknown and not any(v.kind == "grad-never-set" for v in violations.values()):
        contracts.raise_first(layer, "backward", unknown)
    for k, v in list(violations.items()):
        if unknown and v.kind == "grad-never-set":
            violations[k] = contracts.Violation(v.kind, k, f"{v.message}; it set grads{[u.key for u in unknown]} "
                                                "instead, which is not a parameter: a misspelt key?")
    analytic = {"δx": np.asarray(dx, dtype=np.float64)}
    analytic.update({k: np.asarray(layer.grads[k]) for k in layer.params if k not in violations})

    def change(arr: np.ndarray, flat: int, step: float) -> tuple[float, bool]:
        view = arr.reshape(-1)
        old = view[flat]
        view[flat] = old + step
        try:
            y, crossed = (layer.forward(x), False) if piece is None else layer.forward_on_piece(x, piece)
            return float(np.sum(g * (np.asarray(y, dtype=np.float64) - y0))), crossed
        finally:
            view[flat] = old
            for k, v in saved_buffers.items():
                layer.buffers[k][...] = v

    n = case.batch
    sizes = {"N": n, **dict(zip(("C", "H", "W") if len(case.shape) == 3 else ("D",), case.shape, strict=False))}
    results = []
    for name, arr in [("δx", x), *layer.params.items()]:
        entries = _pick(arr.size, max_entries, rng)
        numeric = np.array([five_point(lambda s, f=int(f), a=arr: change(a, f, s), eps)[0] for f in entries])
        index = [tuple(int(j) for j in np.unravel_index(int(f), arr.shape)) for f in entries]
        v = violations.get(name)
        if v is not None and v.kind == "grad-shape":
            diag = diagnose_shape(np.asarray(layer.grads[name], dtype=np.float64), numeric, index, arr.shape, tol,
                                  n)
            a_vals = np.full(len(entries), np.nan)
        elif v is not None:
            diag, a_vals = Diagnosis(v.kind, v.message), np.full(len(entries), np.nan)
        else:
            a_vals = analytic[name].reshape(-1)[entries]
            axes = ("n", "c", "row", "col") if name == "δx" and arr.ndim == 4 else \
                ("c", "c'", "u", "v") if name == "W" and arr.ndim == 4 else None
            diag = diagnose(a_vals, numeric, index, tuple(arr.shape), tol, sizes, axes)
            if diag.kind == "zero-both-sides":  # random input and upstream gradient: nothing may be zero
                what = "the input" if name == "δx" else f"parameter {name!r}"
                diag = Diagnosis("unused", f"the output does not change with {what} at all (finite differences 0 "
                                 "for a random input and upstream gradient) and the backward says 0: the forward "
                                 "never uses it (a bias never added?)")
        errors = entry_errors(a_vals, numeric)
        worst = float(np.nanmax(errors)) if np.isfinite(errors).any() else float("nan")
        results.append(TensorResult(case, name, tuple(arr.shape), len(entries), worst, diag.kind == "ok", diag,
                                    worst_entries(a_vals, numeric, index)))
    return results


def check_layer(make: Callable[[tuple[int, ...]], Any], shapes: Sequence[tuple[int, ...]], seed: int = 0,
                eps: float = DEFAULT_EPS, tol: float = DEFAULT_TOL, batches: Sequence[int] = BATCHES,
                modes: Sequence[bool] = (True, False), max_entries: int = MAX_ENTRIES) -> LayerReport:
    """Check the layer `make(shape)` builds, for every shape × batch × mode (training, evaluation).

    `make(shape)` returns a fresh layer for one example's input shape (its parameters are then drawn at
    random from `seed`). Contract violations other than a gradient's (never set, wrong shape) raise
    `LayerContractError`; exceptions inside the layer's own code propagate unchanged."""
    results: list[TensorResult] = []
    label = ""
    with blas_threads(1):
        for shape in shapes:
            for batch in batches:
                for training in modes:
                    case = Case(tuple(shape), batch, training)
                    results += check_case(make, case, seed, eps, tol, max_entries)
                    if not label:
                        label = contracts.label(make(tuple(shape)))
    return LayerReport(label, results, tol)


def fitting_shapes(make: Callable[[tuple[int, ...]], Any], first: tuple[int, ...] | None = None
                   ) -> list[tuple[int, ...]]:
    """Input shapes the layer accepts: `first` (its shape in a config) and small odd ones of the same channels,
    or for a type alone (3, 5, 7) and (2, 6, 6), else vectors (7,)."""
    if first is not None:
        c = first[0]
        candidates = [tuple(first)] + ([(c, 5, 7), (c, 6, 6)] if len(first) == 3 else [])
    else:
        candidates = [(3, 5, 7), (2, 6, 6), (7,)]
    shapes = []
    for s in candidates:
        try:
            layer = make(s)
            layer.output_shape(s)
        except ValueError:
            continue
        if s not in shapes:
            shapes.append(s)
    if first is None and any(len(s) == 3 for s in shapes):
        shapes = [s for s in shapes if len(s) == 3]
    return shapes[:2] if first is None else shapes


def _maker(opts: Any, dtype: type = np.float64) -> Callable[[tuple[int, ...]], Any]:
    from cnncli.nn.build import build_layers

    def make(shape: tuple[int, ...]) -> Any:
        layers, _ = build_layers([opts], tuple(shape), np.random.default_rng(0), dtype)
        return layers[0]

    return make


def _fitting(make: Callable[[tuple[int, ...]], Any], first: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    from cnncli.host.errors import ConfigError

    def safe(shape: tuple[int, ...]) -> Any:
        try:
            return make(shape)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    return fitting_shapes(safe, first)
