"""The layer contract, checked where a layer runs: what `forward` and `backward` must return.

A layer of the user's own (`--layers FILE`, or any class not defined inside cnncli) is checked the first time
each of its methods runs, in every command (gradcheck, trace, train, eval, predict); with
`$CNNCLI_CHECK_LAYERS=all` the built-in layers that run through their own methods are checked too
(`off`: nothing is checked). The contract (docs/layers-api.md#the-contract):

- `__init__` called `super().__init__()` (the layer has `params`, `grads`, `buffers`, `training`, …);
- forward(x (N, *in)) returns a NumPy array of shape (N, *output_shape(in)), finite for a finite x;
- backward(δy) returns δx of x's shape (None only when `needs_input_grad` is False), finite for a finite δy;
- backward assigns `grads[k]` for every parameter k, of k's shape and dtype, and no other key.

A violation raises `LayerContractError`: one line naming the layer, the method, what it returned and what was
expected. Before a checked backward each `grads[k]` is set to NaN, so a gradient that is never assigned, or
added to (`+=`) instead of assigned, shows up as NaN left behind. Exceptions raised inside the user's methods
are not caught here: they keep their traceback (it is the user's code).

Library code: raises, never prints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncli.host.errors import CnnError

if TYPE_CHECKING:
    from cnncli.nn.layer import Layer

ENV = "CNNCLI_CHECK_LAYERS"  # "all": every layer run through its own methods; "off": none; else the user's
_STATE = ("params", "grads", "buffers", "training", "needs_input_grad")
_DONE_FW, _DONE_BW, _X_SHAPE = "_contract_forward_done", "_contract_backward_done", "_contract_x_shape"


class LayerContractError(CnnError):
    """A layer's method returned something the contract does not allow (one line: layer, method, got, expected)."""


@dataclass(frozen=True)
class Violation:
    """One broken rule: `kind` (a stable word for --json), the parameter key it concerns ('' for δx/y)."""

    kind: str
    key: str
    message: str


def is_users(layer: Layer) -> bool:
    """A layer whose class is not defined inside cnncli (a `--layers` file, a notebook, a test)."""
    module = type(layer).__module__
    return not (module == "cnncli" or module.startswith("cnncli."))


def _mode() -> str:
    value = os.environ.get(ENV, "").strip().lower()
    return value if value in ("all", "off") else "user"


def due(layer: Layer, done_flag: str) -> bool:
    mode = _mode()
    if mode == "off" or layer.__dict__.get(done_flag):
        return False
    return mode == "all" or is_users(layer)


def class_label(layer: Layer) -> str:
    """'SwishB from my_layers.py': a layer's class and, for a user's, where it comes from."""
    cls = type(layer)
    module = cls.__module__
    where = "" if not is_users(layer) else f" from {module.split('_', 4)[-1]}.py" if module.startswith(
        "cnncli_user_layers_") else f" from {module}"
    return f"{cls.__name__}{where}"


def label(layer: Layer) -> str:
    """'swishb1 (SwishB from my_layers.py)': the layer's name, or its type, and where its class comes from."""
    cls = type(layer)
    name = layer.__dict__.get("name") or getattr(cls, "type_name", "") or cls.__name__
    return f"{name} ({class_label(layer)})"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _what(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return f"an array of shape {_shape(value.shape)} ({value.dtype})"
    return f"a {type(value).__name__}"


def _nonfinite(a: np.ndarray) -> str:
    bad = ~np.isfinite(a)
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
    kinds = sorted({("nan" if np.isnan(v) else "inf") for v in a[bad].ravel()[:1000]})
    return f"{int(bad.sum())} non-finite values ({', '.join(kinds)}) of {a.size}, the first at {_shape(first)}"


def extra_axes(got: Sequence[int], want: Sequence[int], batch: int | None = None) -> str:
    """Why shape `got` is not `want`, in words: which axis is extra (a missing sum), or a transposition."""
    got, want = tuple(got), tuple(want)
    if len(got) == len(want) + 1:
        for axis in range(len(got)):
            if got[:axis] + got[axis + 1:] == want:
                size = got[axis]
                what = " (the batch N: a missing sum over the batch)" if batch is not None and size == batch and \
                    axis == 0 else " (a missing sum over it)"
                return f"axis {axis} of size {size} is extra{what}"
    if len(got) > len(want) and got[len(got) - len(want):] == want:
        lead = got[: len(got) - len(want)]
        return f"the leading axes {_shape(lead)} are extra (a missing sum over them)"
    if sorted(got) == sorted(want) and len(got) == len(want):
        return "the axes are in another order (transposed?)"
    if int(np.prod(got)) == int(np.prod(want)):
        return "the same number of entries in another shape: a reshape missing?"
    return "the shapes do not correspond"


def check_constructed(layer: Layer, where: str = "") -> None:
    """A layer whose `__init__` did not run `super().__init__()`: named before anything uses it (`where`: its
    place in the config, 'model.layers[1]')."""
    missing = [k for k in _STATE if not hasattr(layer, k)]
    if missing:
        raise LayerContractError(
            f"{where + ', ' if where else ''}layer {label(layer)}: "
            f"__init__ did not call super().__init__() (no attribute "
            f"{', '.join(repr(k) for k in missing)}); call it first in {type(layer).__name__}.__init__"
        )


def forward_violations(layer: Layer, x: np.ndarray, y: Any) -> list[Violation]:
    """What is wrong with y = layer.forward(x); needs `layer.output_shape` (the user's code, not caught)."""
    expected = (int(x.shape[0]), *(int(s) for s in layer.output_shape(tuple(x.shape[1:]))))
    if not isinstance(y, np.ndarray):
        hint = " (a missing `return`?)" if y is None else ""
        return [Violation("forward-not-array", "", f"forward returned {_what(y)}{hint}; expected an array of "
                          f"shape {_shape(expected)}")]
    if y.shape != expected:
        return [Violation("forward-shape", "", f"forward returned shape {_shape(y.shape)}, but output_shape"
                          f"{_shape(x.shape[1:])} says {_shape(expected[1:])} per example: expected "
                          f"{_shape(expected)}")]
    if not np.issubdtype(y.dtype, np.floating):
        return [Violation("forward-dtype", "", f"forward returned dtype {y.dtype}; expected floating point "
                          f"({x.dtype}, the input's)")]
    if np.isfinite(x).all() and not np.isfinite(y).all():
        return [Violation("forward-nonfinite", "", f"forward returned {_nonfinite(y)} for a finite input")]
    return []


def backward_violations(layer: Layer, x_shape: Sequence[int], dout: np.ndarray, dx: Any,
                        sentinels: dict[str, np.ndarray]) -> list[Violation]:
    """What is wrong with dx = layer.backward(dout) and the grads it set (`sentinels`: the NaN arrays put into
    `grads` before the call)."""
    out: list[Violation] = []
    x_shape = tuple(int(s) for s in x_shape)
    if dx is None:
        if layer.needs_input_grad:
            out.append(Violation("backward-none", "", f"backward returned None; expected δx of shape "
                                 f"{_shape(x_shape)} (the input's shape; None is allowed only when "
                                 "needs_input_grad is False) — a missing `return`?"))
    elif not isinstance(dx, np.ndarray):
        out.append(Violation("backward-not-array", "", f"backward returned {_what(dx)}; expected δx, an array of "
                             f"shape {_shape(x_shape)}"))
    elif dx.shape != x_shape:
        out.append(Violation("backward-shape", "", f"backward returned δx of shape {_shape(dx.shape)}; expected "
                             f"{_shape(x_shape)}, the input's shape ({extra_axes(dx.shape, x_shape, x_shape[0])})"))
    elif np.isfinite(dout).all() and not np.isfinite(dx).all():
        out.append(Violation("backward-nonfinite", "", f"backward returned δx with {_nonfinite(dx)} for a finite δy"))
    params, grads = layer.params, layer.grads
    names = ", ".join(repr(k) for k in params) or "none"
    for k in grads:
        if k not in params:
            out.append(Violation("grad-unknown-key", k, f"backward set grads[{k!r}], which is not a parameter "
                                 f"(parameters: {names}); a misspelt key?"))
    for k, p in params.items():
        g = grads.get(k)
        sentinel = sentinels.get(k)
        if g is None:
            out.append(Violation("grad-missing", k, f"backward removed grads[{k!r}]; expected an array of shape "
                                 f"{_shape(p.shape)}"))
            continue
        if g is sentinel or (isinstance(g, np.ndarray) and g.shape == p.shape and np.isnan(g).all()
                             and np.isfinite(dout).all()):
            out.append(Violation("grad-never-set", k, f"backward never set grads[{k!r}] (assign "
                                 f"self.grads[{k!r}] = …, the gradient of parameter {k!r} {_shape(p.shape)})"))
            continue
        if not isinstance(g, np.ndarray):
            out.append(Violation("grad-not-array", k, f"backward set grads[{k!r}] to {_what(g)}; expected an array "
                                 f"of shape {_shape(p.shape)}"))
            continue
        if g.shape != p.shape:
            out.append(Violation("grad-shape", k, f"backward set grads[{k!r}] of shape {_shape(g.shape)}; the "
                                 f"parameter is {_shape(p.shape)}: {extra_axes(g.shape, p.shape, x_shape[0])}"))
            continue
        if g.dtype != p.dtype:
            out.append(Violation("grad-dtype", k, f"backward set grads[{k!r}] of dtype {g.dtype}; the parameter is "
                                 f"{p.dtype}"))
            continue
        if np.isfinite(dout).all() and not np.isfinite(g).all():
            out.append(Violation("grad-nonfinite", k, f"backward set grads[{k!r}] with {_nonfinite(g)} for a "
                                 "finite δy"))
    return out


def raise_first(layer: Layer, method: str, violations: list[Violation]) -> None:
    """Raise the first violation (`method` is the one that broke it); a misspelt key is said with the key it
    should have been."""
    if not violations:
        return
    first = violations[0]
    never = [v.key for v in violations if v.kind == "grad-never-set"]
    if first.kind == "grad-unknown-key" and never:
        raise LayerContractError(
            f"layer {label(layer)}: {method} set grads[{first.key!r}], which is not a parameter, and never set "
            f"grads[{never[0]!r}]: a misspelt key? (parameters: {', '.join(repr(k) for k in layer.params)})")
    raise LayerContractError(f"layer {label(layer)}: {first.message}")


def forward(layer: Layer, x: np.ndarray) -> np.ndarray:
    """`layer.forward(x)`, checked against the contract the first time (see the module docstring)."""
    if not due(layer, _DONE_FW):
        return layer.forward(x)
    check_constructed(layer)
    y = layer.forward(x)
    raise_first(layer, "forward", forward_violations(layer, x, y))
    layer.__dict__[_X_SHAPE] = tuple(x.shape)
    layer.__dict__[_DONE_FW] = True
    return y


def arm(layer: Layer) -> dict[str, np.ndarray]:
    """Put a NaN array into `grads[k]` for every parameter before a checked backward; returns them."""
    sentinels = {k: np.full(p.shape, np.nan, dtype=p.dtype) for k, p in layer.params.items()}
    for k, s in sentinels.items():
        s.flags.writeable = False  # `grads[k] += …` then stops at once (see `backward`)
        layer.grads[k] = s
    return sentinels


def backward(layer: Layer, dout: np.ndarray, x_shape: Sequence[int] | None = None,
             collect: list[Violation] | None = None) -> Any:
    """`layer.backward(dout)`, checked the first time. `collect`: gradient-level violations (grads never set,
    of the wrong shape, …) are appended there instead of raised (gradcheck diagnoses them per tensor)."""
    if not due(layer, _DONE_BW) and collect is None:
        return layer.backward(dout)
    check_constructed(layer)
    shape = x_shape if x_shape is not None else layer.__dict__.get(_X_SHAPE)
    sentinels = arm(layer)
    try:
        dx = layer.backward(dout)
    except ValueError as e:
        if "read-only" not in str(e) or not sentinels:
            raise
        keys = ", ".join(f"grads[{k!r}]" for k in sentinels)
        raise LayerContractError(
            f"layer {label(layer)}: backward writes into {keys} in place (`+=` or `[...] =`) instead of assigning "
            f"a new array; grads are not zeroed between steps, so assign: self.grads[key] = …"
        ) from None
    if shape is None:  # pragma: no cover - forward always runs first through `forward` above
        shape = (dout.shape[0], *(np.shape(dx)[1:]))
    found = backward_violations(layer, shape, dout, dx, sentinels)
    if collect is not None:
        collect.extend(v for v in found if v.key)
        found = [v for v in found if not v.key]
    raise_first(layer, "backward", found)
    if not collect:
        layer.__dict__[_DONE_BW] = True
    return dx
