"""What is wrong with a gradient that fails its finite-difference check, read from the whole tensor.

`diagnose(analytic, numeric, ...)` looks at every checked entry of one tensor at once, not only its worst:

- sign flipped: analytic = −1 × numeric everywhere;
- a constant factor: analytic = r × numeric everywhere, r named when it is a product of the layer's sizes
  (1/N: a mean where a sum belongs; N: a missing average; 2, ½);
- zero: the backward leaves it 0 (or never writes it) while the loss changes with it;
- not used: the loss does not change with it, but the backward gives a gradient;
- wrong shape: which axis is extra, and whether summing over it gives the numeric gradient;
- a few entries: wrong only at some (an indexing bug), with where, and what those entries have in common;
- wrong throughout: none of the above.

A tensor whose gradient is zero on both sides is not checked at all (nothing was compared), and one whose
parameters all sat on one value (β = 1, a bias of zeros) may hide a bug that the value cancels: both are
reported as such, with how to move away. `locate` finds the layer at fault: walking backward from the output,
the first layer whose own backward disagrees with finite differences of its own forward (random upstream
gradient, random directions), so a report names one layer instead of every tensor below it.

Library code: returns data, never prints.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnncli.nn.contracts import class_label, extra_axes

ZERO = 1e-11  # |gradient| at or below this counts as zero (the five-point noise in float64 is ~1e-13)
FEW = 0.25  # at most this fraction of the checked entries wrong: "a few entries"
SPECIAL = (0.0, 1.0, -1.0)


@dataclass(frozen=True)
class Entry:
    """One checked entry: its index in the tensor, the analytic and numeric values, their relative error."""

    index: tuple[int, ...]
    analytic: float
    numeric: float
    rel_error: float

    def as_dict(self) -> dict[str, Any]:
        return {"index": list(self.index), "analytic": _num(self.analytic), "numeric": _num(self.numeric),
                "rel_error": _num(self.rel_error)}


@dataclass(frozen=True)
class Diagnosis:
    """`kind` is a stable word (for --json and autograders); `text` says it in words; `advice` what to do."""

    kind: str
    text: str
    factor: float | None = None
    where: tuple[tuple[int, ...], ...] = ()
    advice: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "factor": _num(self.factor),
                "where": [list(w) for w in self.where], "advice": self.advice}


@dataclass(frozen=True)
class LayerFault:
    """A layer whose own backward disagrees with finite differences of its own forward."""

    index: int
    name: str
    cls: str
    errors: dict[str, float] = field(default_factory=dict)  # 'δx', 'grads[k]' -> directional relative error

    def wrong(self, tol: float) -> list[str]:
        return [k for k, e in self.errors.items() if not e <= tol]

    def as_dict(self, tol: float) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "class": self.cls, "wrong": self.wrong(tol),
                "errors": {k: _num(v) for k, v in self.errors.items()}}


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


def rel_error(a: np.ndarray | float, n: np.ndarray | float) -> np.ndarray:
    """CS231n relative error |a − n| / max(1e-8, |a| + |n|), element-wise."""
    a, n = np.asarray(a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    return np.abs(a - n) / np.maximum(1e-8, np.abs(a) + np.abs(n))


def fd_noise(loss: float, eps: float) -> float:
    """How far a five-point difference of a float64 loss can be off through rounding alone: its four loss
    values each carry about 2⁻⁵²·|L|, combined with weights (8, 8, 1, 1)/12ε; eight units of that. For L ≈ 2
    and ε = 1e-3 about 4e-12. Below it, a gap between analytic and numeric says nothing."""
    return 8 * float(np.finfo(np.float64).eps) * max(1.0, abs(float(loss))) * 18 / (12 * eps)


def entry_errors(a: np.ndarray | float, n: np.ndarray | float, noise: float = 0.0) -> np.ndarray:
    """`rel_error` of each checked entry, with an entry counted as agreeing when it is zero on both sides (|a|
    and |n| at most `ZERO`) or when |a − n| is within `noise` (`fd_noise`: the finite difference's own rounding).
    CS231n's formula reads such entries as large errors through its 1e-8 floor — 1e-14 against 3e-14 gives 0.5,
    −5.07394e-8 against −5.07396e-8 gives 1.3e-6 — which is rounding, not a bug (a conv's Dirac centre tap
    under batch-norm has an exact gradient of 0 and reads like that)."""
    a, n = np.asarray(a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    agree = ((np.abs(a) <= ZERO) & (np.abs(n) <= ZERO)) | (np.abs(a - n) <= noise)
    return np.where(agree, 0.0, rel_error(a, n))


def worst_entries(analytic: np.ndarray, numeric: np.ndarray, indices: Sequence[tuple[int, ...]], k: int = 3,
                  noise: float = 0.0) -> tuple[Entry, ...]:
    err = entry_errors(analytic, numeric, noise)
    err = np.where(np.isfinite(err), err, np.inf)
    order = np.argsort(-err, kind="stable")[:k]
    return tuple(Entry(tuple(indices[i]), float(analytic[i]), float(numeric[i]), float(err[i])) for i in order)


def _factor_name(r: float, sizes: dict[str, int]) -> tuple[str, str]:
    """('1/4096', '4096 = N·H·W = 4·32·32: a mean where a sum belongs') and the like."""
    k = 1.0 / abs(r) if abs(r) < 1 else abs(r)
    sign = "−" if r < 0 else ""
    near = round(k)
    if near < 2 or abs(k - near) > 1e-6 * k:
        return f"{sign}{abs(r):.4g}", ""
    names = [(n, s) for n, s in sizes.items() if s > 1]
    found = ""
    for size in range(1, len(names) + 1):
        for combo in itertools.combinations(names, size):
            if int(np.prod([s for _, s in combo])) == near:
                found = f"{near} = {'·'.join(n for n, _ in combo)}" + (
                    f" = {'·'.join(str(s) for _, s in combo)}" if size > 1 else "")
                break
        if found:
            break
    if abs(r) < 1:
        what = "a mean where a sum belongs (δy already carries the batch's 1/N)" if found else \
            "a division too many"
        return f"{sign}1/{near}", f"{found}: {what}" if found else what
    what = "a missing average, or a sum over something the mean loss already averages" if found else \
        "a term counted more than once" if near == 2 else "a multiplication too many"
    return f"{sign}{near}", f"{found}: {what}" if found else what


def _pattern(wrong: list[tuple[int, ...]], checked: list[tuple[int, ...]], shape: tuple[int, ...],
             axes: Sequence[str] | None) -> str:
    """What the wrong entries have in common: 'axis 2 (row) = 0 (its first)', 'axis 2 (row) in 6…7 (the
    last checked along it)'."""
    if not wrong or not shape:
        return ""
    parts = []
    for axis in range(len(shape)):
        vw = sorted({w[axis] for w in wrong})
        vc = sorted({c[axis] for c in checked})
        if len(vw) >= len(vc):
            continue
        name = f" ({axes[axis]})" if axes and axis < len(axes) else ""
        if len(vw) == 1:
            v = vw[0]
            edge = " (its first)" if v == 0 else f" (its last, of {shape[axis]})" if v == shape[axis] - 1 else ""
            parts.append(f"axis {axis}{name} = {v}{edge}")
        elif len(vw) > len(vc) / 2:
            continue
        elif vw == vc[-len(vw):]:
            parts.append(f"axis {axis}{name} in {vw[0]}…{vw[-1]} (the last along it, of {shape[axis]})")
        elif vw == vc[: len(vw)]:
            parts.append(f"axis {axis}{name} in {vw[0]}…{vw[-1]} (the first along it)")
    if not parts:
        return ""
    return "; every wrong entry has " + " and ".join(parts)


def is_special(values: np.ndarray) -> float | None:
    """The one value every entry holds, when that can hide a bug: all entries equal (more than one) or a lone
    0, 1 or −1. None otherwise."""
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0 or not np.all(flat == flat[0]):
        return None
    v = float(flat[0])
    return v if flat.size > 1 or v in SPECIAL else None


def move_off(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random values around the constant value v of a tensor: v + U(−½, ½)·max(|v|, ½)."""
    v = float(np.asarray(values).reshape(-1)[0])
    return v + rng.uniform(-0.5, 0.5, np.shape(values)) * max(abs(v), 0.5)


def diagnose(
    analytic: np.ndarray,
    numeric: np.ndarray,
    indices: Sequence[tuple[int, ...]],
    shape: tuple[int, ...],
    tol: float,
    sizes: dict[str, int] | None = None,
    axes: Sequence[str] | None = None,
    noise: float = 0.0,
) -> Diagnosis:
    """Diagnose one tensor from its checked entries: analytic[i] and numeric[i] at `indices[i]` of `shape`.
    `sizes`: named sizes of the layer ({'N': 4, 'C': 16, 'H': 32, 'W': 32}) to name a constant factor;
    `axes`: the tensor's axis names (('c', "c'", 'u', 'v') for a conv's W) to say where wrong entries are;
    `noise`: the finite difference's rounding (`fd_noise`), below which a gap is no evidence."""
    a = np.asarray(analytic, dtype=np.float64).reshape(-1)
    n = np.asarray(numeric, dtype=np.float64).reshape(-1)
    sizes = sizes or {}
    if not np.isfinite(n).all():
        return Diagnosis("numeric-not-finite", "the finite difference itself is not finite (the loss overflowed "
                         "near this point)", advice="try a smaller --eps or another --seed")
    if not np.isfinite(a).all():
        return Diagnosis("not-finite", f"the analytic gradient has {int((~np.isfinite(a)).sum())} non-finite "
                         "entries")
    amax, nmax = float(np.abs(a).max(initial=0.0)), float(np.abs(n).max(initial=0.0))
    if amax <= ZERO and nmax <= ZERO:
        return Diagnosis(
            "zero-both-sides", "not checked: the gradient is zero on both sides (the loss does not change with "
            "this tensor here, and the backward says 0), so nothing was compared",
            advice="move away from this point: another --seed or --batch-size, or check the layer alone with "
            "`cnn gradcheck --layer NAME` (random parameters and upstream gradients; there a parameter the output "
            "ignores fails). A forward that never uses the tensor looks exactly like this")
    if amax <= ZERO:
        return Diagnosis("zero", f"the backward gives 0 everywhere, the finite differences up to {nmax:.3g}: "
                         "the gradient is never written (or written as zeros)")
    if nmax <= ZERO:
        return Diagnosis("not-used", f"the loss does not change with this tensor (finite differences 0), but "
                         f"the backward gives up to {amax:.3g}: the forward does not use it, or the backward "
                         "computes another tensor's gradient")
    err = entry_errors(a, n, noise)
    if err.max() <= tol:
        return Diagnosis("ok", "agrees")
    r = float(a @ n / (n @ n))
    if rel_error(a, r * n).max() <= max(tol, 1e-7) * 10:
        if abs(r + 1) <= 1e-6:
            return Diagnosis("sign-flipped", "the sign is flipped: analytic = −1 × numeric on every checked entry",
                             factor=-1.0)
        value, why = _factor_name(r, sizes)
        return Diagnosis("constant-factor", f"off by a constant factor: analytic = {value} × numeric on every "
                         f"checked entry" + (f" ({why})" if why else ""), factor=r)
    wrong = err > tol
    m = len(a)
    where = tuple(tuple(indices[i]) for i in np.flatnonzero(wrong))
    pattern = _pattern(list(where), [tuple(i) for i in indices], shape, axes)
    if m >= 4 and (wrong.sum() <= max(1, FEW * m) or (pattern and wrong.sum() <= m / 2)):
        shown = ", ".join(str(w) for w in where[:6]) + (" …" if len(where) > 6 else "")
        return Diagnosis("few-entries", f"wrong at {int(wrong.sum())} of {m} checked entries, right at the rest "
                         f"(an indexing bug): at {shown}{pattern}", where=where)
    ratio = a[np.abs(n) > ZERO] / n[np.abs(n) > ZERO]
    return Diagnosis("wrong", f"wrong throughout: no sign or constant factor explains it (analytic/numeric "
                     f"ranges over {ratio.min():.3g} … {ratio.max():.3g})")


def diagnose_shape(analytic: np.ndarray, numeric: np.ndarray, indices: Sequence[tuple[int, ...]],
                   shape: tuple[int, ...], tol: float, batch: int | None) -> Diagnosis:
    """A gradient whose shape is not its tensor's: which axis is extra, and what summing (or averaging) over
    it would give."""
    got = tuple(analytic.shape)
    why = extra_axes(got, shape, batch)
    text = f"wrong shape: the gradient is {got}, the tensor {shape}: {why}"
    extra = len(got) - len(shape)
    if extra > 0:
        for axes in itertools.combinations(range(len(got)), extra):
            if tuple(s for i, s in enumerate(got) if i not in axes) != shape:
                continue
            for how, reduce in (("summed", np.sum), ("averaged", np.mean)):
                reduced = reduce(analytic, axis=axes)
                vals = np.array([reduced[i] for i in indices])
                if rel_error(vals, numeric).max() <= tol:
                    text += f"; {how} over axis {', '.join(map(str, axes))} it matches the finite differences"
                    break
            break
    return Diagnosis("wrong-shape", text)


# ------------------------------------------------------------------------------ the layer at fault


def _directional(f: Any, eps: float) -> float:
    """Five-point centred derivative of f(t) at 0, f given as the change f(t) − f(0)."""
    return (8 * (f(eps) - f(-eps)) - (f(2 * eps) - f(-2 * eps))) / (12 * eps)


def layer_errors(layer: Any, x: np.ndarray, rng: np.random.Generator, eps: float = 1e-3, directions: int = 2,
                 need_dx: bool = True) -> dict[str, float]:
    """The layer's own backward against finite differences of its own forward at input x (float64), along
    random directions: for an upstream gradient g, ⟨g, f(x + t·d)⟩ differentiated at t = 0 against ⟨δx, d⟩,
    and for each parameter k ⟨g, f_{θ + t·d}(x)⟩ against ⟨grads[k], d⟩. Perturbed passes run on x's piece.
    Returns {'δx': worst relative error, 'grads[k]': …}."""
    y0 = np.array(layer.forward(x), dtype=np.float64)
    piece = layer.piece()
    g = rng.standard_normal(y0.shape)
    dx = layer.backward(g)
    grads = {k: np.array(v, dtype=np.float64) for k, v in layer.grads.items()}

    def out(inp: np.ndarray) -> np.ndarray:
        y = layer.forward(inp) if piece is None else layer.forward_on_piece(inp, piece)[0]
        return np.asarray(y, dtype=np.float64)

    errors: dict[str, float] = {}
    if need_dx and dx is not None and np.shape(dx) == x.shape:
        worst = 0.0
        for _ in range(directions):
            d = rng.standard_normal(x.shape)
            numeric = _directional(lambda t, d=d: float(np.sum(g * (out(x + t * d) - y0))), eps)
            worst = max(worst, float(rel_error(np.sum(dx * d), numeric)))
        errors["δx"] = worst
    for k, p in layer.params.items():
        gk = grads.get(k)
        if gk is None or gk.shape != p.shape:
            errors[f"grads[{k!r}]"] = 1.0
            continue
        worst = 0.0
        saved = p.copy()
        for _ in range(directions):
            d = rng.standard_normal(p.shape)

            def change(t: float, d: np.ndarray = d, p: np.ndarray = p, saved: np.ndarray = saved) -> float:
                p[...] = saved + t * d
                try:
                    return float(np.sum(g * (out(x) - y0)))
                finally:
                    p[...] = saved

            numeric = _directional(change, eps)
            worst = max(worst, float(rel_error(np.sum(gk * d), numeric)))
        errors[f"grads[{k!r}]"] = worst
    return errors


def locate(layers: Sequence[Any], inputs: Sequence[np.ndarray], tol: float, seed: int = 0,
           eps: float = 1e-3) -> list[LayerFault]:
    """Every layer whose own backward disagrees with its own forward, walking backward from the output
    (so the first is the layer at fault). `inputs[i]` is what layer i received in the network's pass."""
    rng = np.random.default_rng(seed)
    faults = []
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        errors = layer_errors(layer, inputs[i], rng, eps=eps)
        fault = LayerFault(i, layer.name or layer.type_name, class_label(layer), errors)
        if fault.wrong(tol):
            faults.append(fault)
    return faults
