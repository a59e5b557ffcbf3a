"""One image through the network, step by step, in the notation of docs/derivations.md (`cnn trace`).

For the article's network the walk is the forward pass

    X → S¹ (conv1, §convolution) → A¹ (§relu) → P¹ (§max-pooling) → h (§flatten) → z (§linear)
      → p → L (§softmax-and-cross-entropy)

and then backpropagation of δ[·] = ∂L/∂(·) in reverse:

    δz = p − y, δb_fc, δW_fc, δh, δP¹, δA¹, δS¹, δb¹, δW¹, δX.

Each step cites the section of docs/derivations.md that derives it (its anchor, the layer's `doc`).
`trace` runs the model's own layers on one image (their public `forward` / `backward`, in float64, in
evaluation mode), keeps every intermediate tensor under its symbol, and checks each gradient against finite
differences. Other configs are walked the same way, layer by layer: the k-th conv layer gives Sᵏ, the ReLU
after it Aᵏ, a max-pool after that Pᵏ (so for the diagram config, P¹ feeds conv2 and conv2 gives S², A²);
the flatten output is h, the network's output z; a single linear layer's parameters are W_fc, b_fc
(several: W_<name>, b_<name>, and the hidden ones' outputs zᵐ, aᵐ); the k-th batch-norm gives Yᵏ = γᵏ x̂ + βᵏ
(parameters γᵏ, βᵏ, checked too) and an activation after it Aᵏ (aᵐ for vectors); leaky ReLU, tanh and sigmoid
are named as ReLU; average pooling as max-pooling; global average pooling gives g; any other layer's output
(dropout, a residual block, a layer of your own) is its name ('swishb1', 'res1') or, unnamed, '<type><index>',
and its parameters '<key>_<name>' (β of swishb1: 'beta_swishb1'), printed, checked and saved like the
built-ins'. A layer whose class names no section of docs/derivations.md is cited by its docstring.

Shapes drop the batch axis: every tensor is one image's (S¹ 16×32×32, h 4096). For a batch of one the
mean loss is the image's loss, so δz = p − y.

Finite differences: for a gradient δT, a few entries t of T (the largest |δT| first, then random ones) are
stepped by ±ε, ±2ε, the rest of the network re-run from T, and the five-point centred difference
(`cnncli.nn.gradcheck.five_point`) compared with δT[t]. Each perturbed pass is evaluated on the unperturbed
pass's smooth piece (each layer's `piece()`, held by `forward_on_piece`; the same code as `cnn gradcheck`)
so that a kink of ReLU/max-pool never spoils a check; a step that would have crossed one is counted in
`FDCheck.kinks`. The changes of L are computed as changes (`loss_change`), not as differences of two
rounded losses, so tiny gradients of a confident or badly wrong prediction still check to ~1e-10.
Relative error is CS231n's (`cnncli.nn.diagnose.rel_error`).

Library code: returns data, never prints (the CLI renders it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnncli.host.blas import blas_threads
from cnncli.host.errors import ConfigError
from cnncli.nn import contracts
from cnncli.nn.diagnose import rel_error
from cnncli.nn.gradcheck import DEFAULT_EPS, DEFAULT_TOL, five_point, forward_on_pieces, pieces
from cnncli.nn.layer import Layer
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import Sequential

DEFAULT_CHECKS = 5  # entries checked per gradient: the largest |δ| first, then random ones
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


# --------------------------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class Symbol:
    """A tensor's name: `key` (ASCII, the `.npz` key), `text` (Unicode, the terminal), `tex` (matplotlib)."""

    key: str
    text: str
    tex: str

    def grad(self) -> Symbol:
        """δ of this tensor: key 'd' + key ('S1' -> 'dS1'), text 'δ' + text."""
        return Symbol("d" + self.key, "δ" + self.text, r"\delta " + self.tex)


def _sup(n: int) -> str:
    return str(n).translate(SUPERSCRIPT)


def _sym(base: str, n: int | None = None) -> Symbol:
    """'S', 1 -> S1 / S¹ / S^{1}; 'W_fc' -> W_fc / W_fc / W_{fc}."""
    if n is None:
        if "_" in base:
            head, tail = base.split("_", 1)
            tail_tex = tail.replace("_", r"\_")
            return Symbol(base, base, rf"{head}_{{\mathrm{{{tail_tex}}}}}")
        return Symbol(base, base, base)
    return Symbol(f"{base}{n}", f"{base}{_sup(n)}", f"{base}^{{{n}}}")


@dataclass(frozen=True)
class LayerNames:
    """The article's names around one layer: its output and its parameters ('W', 'b')."""

    output: Symbol
    params: dict[str, Symbol]


def _greek(key: str, text: str, tex: str, n: int) -> Symbol:
    """('gamma', 'γ', TeX gamma, 1) -> the key gamma1, the text γ¹ and the TeX gamma with superscript 1."""
    return Symbol(f"{key}{n}", f"{text}{_sup(n)}", f"{tex}^{{{n}}}")


ACTIVATIONS = ("relu", "leakyrelu", "tanh", "sigmoid")


def name_tensors(model: Sequential) -> list[LayerNames]:
    """Name every layer's output and parameters after the article (see the module docstring).

    Conv k: output Sᵏ, parameters Wᵏ, bᵏ. The k-th batch-norm: Yᵏ = γᵏ x̂ + βᵏ (docs/derivations.md's y), parameters
    γᵏ, βᵏ. An activation (relu, leakyrelu, tanh, sigmoid) after Sᵏ or after a batch-norm Yᵏ of images: Aᵏ.
    Max- or average pooling after Aᵏ, Sᵏ or Yᵏ: Pᵏ. Global average pooling: g. Flatten: h. The last layer's
    output: z. Linear: W_fc, b_fc when it is the only one, else W_<name>, b_<name>; a hidden linear layer
    (the m-th) gives zᵐ and an activation after it (or after a batch-norm of it) aᵐ. Anything else (dropout,
    residual, a user's layer): its name, else '<kind><layer index>'; its parameters '<key>_<name>'.
    """
    layers = model.layers
    n_linear = sum(layer.kind == "linear" for layer in layers)
    names: list[LayerNames] = []
    used: set[str] = {"X", "p", "L", "y"}
    conv = fc = bn = 0
    prev: tuple[str, int] = ("X", 0)  # (base symbol, number) of the previous output
    shape = tuple(model.input_shape)  # the input shape of layer i, per image

    def fresh(sym: Symbol, i: int, kind: str) -> Symbol:
        if sym.key in used:
            sym = Symbol(f"{kind}{i}", f"{kind}{i}", rf"\mathrm{{{kind}{i}}}")
        used.add(sym.key)
        return sym

    for i, layer in enumerate(layers):
        params: dict[str, Symbol] = {}
        base: tuple[str, int]
        if layer.kind == "conv":
            conv += 1
            base = ("S", conv)
            params = {k: _sym(k, conv) for k in layer.params}
        elif layer.kind == "batchnorm":
            bn += 1
            base = ("Y", bn)
            params = {"beta": _greek("beta", "β", r"\beta", bn), "gamma": _greek("gamma", "γ", r"\gamma", bn)}
        elif layer.kind in ACTIVATIONS and (prev[0] in ("S", "z") or (prev[0] == "Y" and prev[1] > 0)):
            base = ("A" if len(shape) == 3 else "a", prev[1])
        elif layer.kind == "maxpool" and prev[0] in ("S", "A"):
            base = ("P", prev[1])
        elif layer.kind in ("maxpool", "avgpool") and prev[0] in ("S", "A", "Y") and prev[1] > 0:
            base = ("P", prev[1])
        elif layer.kind == "globalavgpool":
            base = ("g", 0)
        elif layer.kind == "flatten":
            base = ("h", 0)
        elif layer.kind == "linear":
            fc += 1
            base = ("z", fc)
            tag = "fc" if n_linear == 1 else re.sub(r"[^0-9A-Za-z_]", "_", layer.name or f"fc{fc}")
            params = {k: _sym(f"{k}_{tag}") for k in layer.params}
            for k, p in params.items():
                if p.key in used:  # two names that differ only in non-ASCII characters
                    params[k] = _sym(f"{k}_{tag}_{i}")
        else:  # any other layer (dropout, a block, a layer of the user's): one name, its own if it has one
            tag = re.sub(r"[^0-9A-Za-z_]", "_", layer.name) if layer.name else ""
            base = (tag or f"{layer.kind}{i}", -1)
            params = {k: _sym(f"{re.sub(r'[^0-9A-Za-z]', '_', k)}_{tag or i}") for k in layer.params}
            for k, p in params.items():
                if p.key in used:
                    params[k] = _sym(f"{p.key}_{i}")
        if i == len(layers) - 1:
            base = ("z", 0)
        if base[1] > 0:
            sym = _sym(base[0], base[1])
        elif base[1] == 0:
            sym = _sym(base[0])
        else:
            sym = Symbol(base[0], base[0], rf"\mathrm{{{base[0]}}}")
        for p in params.values():
            used.add(p.key)
        sym = fresh(sym, i, layer.kind)
        names.append(LayerNames(sym, params))
        prev = base
        shape = tuple(layer.output_shape(shape))
    return names


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FDCheck:
    """A finite-difference check of a few entries of one gradient.

    `indices` (n, ndim) the entries checked (in the tensor's per-image shape); `analytic`, `numeric`,
    `errors` (n,) the backward pass's value, the five-point difference, their CS231n relative error.
    """

    indices: np.ndarray
    analytic: np.ndarray
    numeric: np.ndarray
    errors: np.ndarray
    kinks: int  # checked entries whose ±ε steps would cross a ReLU/pool kink (evaluated on the piece)
    eps: float
    tol: float

    @property
    def max_rel_error(self) -> float:
        return float(self.errors.max()) if len(self.errors) else 0.0

    @property
    def worst_index(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.indices[int(np.argmax(self.errors))]) if len(self.errors) else ()

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tol


@dataclass(frozen=True)
class Step:
    """One quantity of the walk: its symbol, where docs/derivations.md derives it, its value and what it tells.

    `value` is one image's tensor (no batch axis), float64. `section` is the docs section and the layer
    ('§convolution conv1'; see `citation`); `facts` are short telling observations; `check` is the
    finite-difference check of a gradient
    (None for forward quantities and parameters).
    """

    symbol: Symbol
    phase: str  # 'forward', 'backward' or 'parameter'
    section: str
    value: np.ndarray
    facts: tuple[str, ...] = ()
    check: FDCheck | None = None

    @property
    def key(self) -> str:
        return self.symbol.key

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def citation(self) -> str:
        """'docs/derivations.md#convolution (backward, conv1)', …: where the quantity is derived."""
        anchor, _, what = self.section.removeprefix("§").partition(" ")
        detail = f"({self.phase}{', ' + what if what else ''})"
        if anchor.startswith("?"):  # no section of docs/derivations.md derives it: say so, cite no dead link
            return f"layer type {anchor[1:]!r}: its class's own docstring{_first_line(anchor[1:])} {detail}"
        if "/" in anchor or anchor.endswith(".md"):  # a user's layer citing its own document
            return f"{anchor} {detail}"
        return f"{DOCS}#{anchor} {detail}"

    @property
    def section_label(self) -> str:
        """The section column of `cnn trace`: '§convolution conv1'; for a layer type no section of
        docs/derivations.md derives (a user's layer), the first words of its class docstring and the layer's
        name: '«y = x · σ(βx), β learned» swishb1' (the section key itself, '§?swishb swishb1', stays in --json)."""
        anchor, _, name = self.section.removeprefix("§").partition(" ")
        if not anchor.startswith("?"):
            return self.section
        words = _doc_words(anchor[1:])
        return f"{words} {name}".strip() if words else self.section

    @property
    def stats(self) -> tuple[float, float, float]:
        """(min, max, mean) of the tensor."""
        v = self.value
        return float(v.min()) + 0.0, float(v.max()) + 0.0, float(v.mean()) + 0.0  # + 0.0: no "-0"


@dataclass
class Trace:
    """The whole walk for one image: `steps` in the article's order (forward, then backward).

    `image` is the raw uint8 image (C, H, W) when known (for pictures), `label` the true class, `classes`
    the class names; `top` the classes by probability, (index, name, p), highest first.
    """

    steps: list[Step]
    label: int
    classes: tuple[str, ...]
    loss: float
    top: list[tuple[int, str, float]]
    eps: float
    tol: float
    image: np.ndarray | None = None
    layer_names: list[LayerNames] = field(default_factory=list)

    def __getitem__(self, key: str) -> Step:
        for s in self.steps:
            if s.key == key:
                return s
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return any(s.key == key for s in self.steps)

    @property
    def forward(self) -> list[Step]:
        return [s for s in self.steps if s.phase == "forward"]

    @property
    def backward(self) -> list[Step]:
        return [s for s in self.steps if s.phase == "backward"]

    @property
    def parameters(self) -> list[Step]:
        return [s for s in self.steps if s.phase == "parameter"]

    @property
    def checks(self) -> list[tuple[Step, FDCheck]]:
        return [(s, s.check) for s in self.steps if s.check is not None]

    @property
    def passed(self) -> bool:
        return all(c.passed for _, c in self.checks)

    @property
    def max_rel_error(self) -> float:
        return max((c.max_rel_error for _, c in self.checks), default=0.0)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor by its ASCII key, plus `y` (one-hot label, (K,)), `label` (0-d int), `classes` (K,) str.

        Plain numeric and fixed-width string arrays only: `np.savez` of this loads with allow_pickle=False.
        """
        out = {s.key: s.value for s in self.steps}
        y = np.zeros(len(self.classes))
        y[self.label] = 1.0
        out["y"] = y
        out["label"] = np.array(self.label, dtype=np.int64)
        out["classes"] = np.array(self.classes, dtype=str)
        if self.image is not None:
            out["image"] = self.image
        return out


# --------------------------------------------------------------------------------------------- pieces


def loss_change(z0: np.ndarray, z1: np.ndarray, label: int) -> float:
    """L(z1) − L(z0) for one image's logits (K,), L = −log softmax(z)[label], to full relative precision.

    With p = softmax(z0) and d_j = (z1_j − z0_j) − (z1_y − z0_y) (y = label), exactly
    L(z1) − L(z0) = log Σ_j p_j e^{d_j} = log1p(Σ_{j≠y} p_j · expm1(d_j)),
    so a change that a confident (p_y ≈ 1) or a badly wrong (L ≫ 1) image makes tiny keeps its digits; a
    difference of the two losses would drown it in the rounding of L itself. Used for finite differences.
    """
    z0 = np.asarray(z0, dtype=np.float64)
    d = (np.asarray(z1, dtype=np.float64) - z0) - (z1[label] - z0[label])
    m = z0.max()
    log_p = z0 - m - math.log(np.exp(z0 - m).sum())
    terms = np.exp(log_p) * np.expm1(d)
    terms[label] = 0.0
    return math.log1p(float(terms.sum()))


# --------------------------------------------------------------------------------------------- the walk


DOCS = "docs/derivations.md"


def _first_line(type_name: str) -> str:
    """' («y = x · σ(βx), …»)': the first line of a registered layer class's docstring, or ''."""
    from cnncli.nn.registry import LAYER_TYPES

    cls = LAYER_TYPES.get(type_name)
    doc = (cls.__doc__ or "").strip().splitlines() if cls is not None else []
    return f" («{doc[0].strip()}»)" if doc else " (no `doc` section)"


def _doc_words(type_name: str, width: int = 32) -> str:
    """'«y = x · σ(βx), β learned»': the first line of a registered layer class's docstring, cut to `width`
    characters, or '' when it has none."""
    from cnncli.nn.registry import LAYER_TYPES

    cls = LAYER_TYPES.get(type_name)
    doc = (cls.__doc__ or "").strip().splitlines() if cls is not None else []
    if not doc or not doc[0].strip():
        return ""
    line = doc[0].strip()
    return f"«{line if len(line) <= width else line[: width - 1] + '…'}»"


def _section(layer: Layer, index: int, backward: bool = False) -> str:
    """Where docs/derivations.md derives a layer (its `doc` anchor) and which layer: '§convolution conv1',
    '§relu', …; the forward pass and backpropagation of a layer share one section."""
    anchor = layer.doc or f"?{layer.kind}"  # "?": a layer type whose class names no section (a user's layer)
    return f"§{anchor} {layer.name}".rstrip() if layer.name else f"§{anchor}"


def _pick(a: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of ≤ n entries of `a`: the largest |a| first (half, rounded up), then random others."""
    if a.size <= n:
        return np.arange(a.size)
    order = np.argsort(-np.abs(a).reshape(-1), kind="stable")
    top = order[: (n + 1) // 2]
    rest = rng.choice(order[(n + 1) // 2 :], size=n - len(top), replace=False)
    return np.concatenate([top, np.sort(rest)])


def trace(model: Sequential, x: np.ndarray, label: int, classes: tuple[str, ...] | None = None, **options: Any
          ) -> Trace:
    """Walk one image forward and backward through `model`, in float64, and check every gradient (see
    `_trace` for the options); BLAS runs on one thread, which is fastest for one image's small products."""
    with blas_threads(1):
        return _trace(model, x, label, classes, **options)


def _trace(
    model: Sequential,
    x: np.ndarray,
    label: int,
    classes: tuple[str, ...] | None = None,
    *,
    checks: int = DEFAULT_CHECKS,
    eps: float = DEFAULT_EPS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    image: np.ndarray | None = None,
) -> Trace:
    """Walk one image forward and backward through `model`, in float64, and check every gradient.

    x (C, H, W): the normalised image X; label: its class (y = onehot(label));
    classes: class names (default '0', '1', …); image: the raw uint8 pixels (C, H, W), kept for pictures.
    `checks` entries of each gradient are compared with the five-point difference of step `eps` (pass:
    relative error ≤ `tol`); `seed` picks the random entries.

    The model is converted to float64 and set to evaluation mode in place (its parameters keep their values).
    """
    model.astype(np.float64)
    model.eval()  # evaluation mode, as cnn eval and predict see the network (running statistics, no dropout)
    model.set_input_grad(True)
    layers = model.layers
    names = name_tensors(model)
    n_classes = int(model.output_shape[0])
    classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(n_classes))
    if len(classes) != n_classes:
        raise ConfigError(f"the model gives {n_classes} class scores but there are {len(classes)} class names")
    if not 0 <= label < n_classes:
        raise ConfigError(f"label {label} is outside 0..{n_classes - 1}")
    rng = np.random.default_rng(seed)

    # ---- forward: acts[i] is the input of layer i, acts[-1] the logits z; all (1, ...) float64 copies.
    acts = [np.array(x, dtype=np.float64).reshape(1, *model.input_shape)]
    for layer in layers:
        acts.append(np.array(contracts.forward(layer, acts[-1]), dtype=np.float64, copy=True))
    y = np.array([label])
    loss, dz, p = softmax_cross_entropy(acts[-1], y)
    piece = pieces(layers)  # the smooth piece of this pass: ReLU masks, pool arg-maxes (Layer.piece)

    # ---- backward: deltas[i] = ∂L/∂acts[i]; grads[i] = layer i's parameter gradients.
    deltas: list[np.ndarray | None] = [None] * len(acts)
    deltas[-1] = dz.copy()
    grads: list[dict[str, np.ndarray]] = [{} for _ in layers]
    for i in reversed(range(len(layers))):
        d = contracts.backward(layers[i], deltas[i + 1])
        if d is None:  # pragma: no cover - set_input_grad(True) asks every layer for its input gradient
            raise RuntimeError(f"layer {i} ({layers[i].kind}) gave no input gradient")
        deltas[i] = np.array(d, dtype=np.float64, copy=True)
        grads[i] = {k: np.array(v, dtype=np.float64, copy=True) for k, v in layers[i].grads.items()}

    def logits_from(start: int, a: np.ndarray) -> tuple[np.ndarray, bool]:
        """z (K,) when layer `start` gets input `a`, on the piece; and whether the true pass would leave it."""
        z, crossed = forward_on_pieces(layers[start:], a, piece[start:])
        return z[0], crossed

    # z of the unperturbed pass along each path, computed before any parameter is touched
    base_z = [np.array(logits_from(start, acts[start])[0], copy=True) for start in range(len(acts))]

    def loss_from(start: int, a: np.ndarray) -> tuple[float, bool]:
        """L − L₀ when layer `start` gets input `a` (L₀: the same path with this pass's own input)."""
        z, crossed = logits_from(start, a)
        return loss_change(base_z[start], z, label), crossed

    def fd_check(analytic: np.ndarray, perturbed_loss: Callable[[int, float], tuple[float, bool]]) -> FDCheck:
        flat = _pick(analytic, checks, rng)
        numeric = np.empty(len(flat))
        kinks = 0
        for n, f in enumerate(flat):
            # from L(θ + kε) − L(θ), k = 2, 1, −1, −2, each computed as a change (see `loss_change`)
            numeric[n], crossed = five_point(lambda step, f=int(f): perturbed_loss(f, step), eps)
            kinks += crossed
        a = analytic.reshape(-1)[flat]
        idx = np.array(np.unravel_index(flat, analytic.shape), dtype=np.int64).T.reshape(len(flat), analytic.ndim)
        return FDCheck(idx, a, numeric, rel_error(a, numeric), int(kinks), eps, tol)

    def check_activation(i: int) -> FDCheck:
        base = acts[i]

        def perturbed(f: int, step: float) -> tuple[float, bool]:
            a = base.copy()
            a.reshape(-1)[f] += step
            return loss_from(i, a)

        return fd_check(deltas[i][0], perturbed)  # type: ignore[index]

    def check_param(i: int, k: str) -> FDCheck:
        arr = layers[i].params[k]

        def perturbed(f: int, step: float) -> tuple[float, bool]:
            view = arr.reshape(-1)
            old = view[f]
            view[f] = old + step
            try:
                return loss_from(i, acts[i])
            finally:
                view[f] = old

        return fd_check(grads[i][k], perturbed)

    # ---- the forward steps
    steps: list[Step] = [Step(_sym("X"), "forward", "§notation-and-shapes input", acts[0][0], _facts_x(acts[0][0]))]
    for i, layer in enumerate(layers):
        sym = names[i].output
        value = acts[i + 1][0]
        facts = _forward_facts(layer, sym, names[i - 1].output if i else _sym("X"), acts[i][0], value, classes)
        steps.append(Step(sym, "forward", _section(layer, i), value, facts))
    probs = p[0]
    ranked = [int(c) for c in np.argsort(-probs, kind="stable")]
    top = [(c, classes[c], float(probs[c])) for c in ranked]
    steps.append(
        Step(_sym("p"), "forward", "§softmax-and-cross-entropy p", probs.copy(), _facts_p(top, label, classes))
    )
    steps.append(
        Step(_sym("L"), "forward", "§softmax-and-cross-entropy L", np.array(loss),
             (f"−log p[{classes[label]}] = {loss:.4g}",))
    )
    # ---- parameters (for the notebook; not part of the walk's table)
    for i, layer in enumerate(layers):
        for k, sym in names[i].params.items():
            steps.append(Step(sym, "parameter", _section(layer, i), layer.params[k].copy()))

    # ---- the backward steps, in the article's order: δz, then per layer (reverse) δb, δW, δ(input)
    dz_sym = names[-1].output.grad()
    steps.append(
        Step(dz_sym, "backward", "§softmax-and-cross-entropy δz", deltas[-1][0],
             _facts_dz(deltas[-1][0], label, classes), check_activation(len(layers)))
    )
    for i in reversed(range(len(layers))):
        layer = layers[i]
        into = names[i - 1].output if i else _sym("X")
        section = _section(layer, i, backward=True)
        for k in ("b", "W"):
            if k in names[i].params:
                sym = names[i].params[k].grad()
                steps.append(
                    Step(sym, "backward", section, grads[i][k], _param_grad_facts(layer, k, sym, names, i),
                         check_param(i, k))
                )
        for k in names[i].params:
            if k not in ("b", "W"):  # batch-norm's β, γ
                sym = names[i].params[k].grad()
                steps.append(Step(sym, "backward", section, grads[i][k], _param_grad_facts(layer, k, sym, names, i),
                                  check_param(i, k)))
        facts = _backward_facts(layer, into, names[i].output, acts[i][0], deltas[i][0], deltas[i + 1][0],  # type: ignore[index]
                                names[i].params.get("W"))
        steps.append(Step(into.grad(), "backward", section, deltas[i][0], facts, check_activation(i)))  # type: ignore[index]

    model.set_input_grad(False)
    return Trace(steps, int(label), classes, float(loss), top, eps, tol,
                 None if image is None else np.asarray(image), names)


# --------------------------------------------------------------------------------------------- facts


def _pct(part: int | float, whole: int | float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def _facts_x(x: np.ndarray) -> tuple[str, ...]:
    return ("the image, normalised by data.normalize: (pixel/255 − mean) / std per channel",)


def _forward_facts(
    layer: Layer, sym: Symbol, into: Symbol, a_in: np.ndarray, a_out: np.ndarray, classes: tuple[str, ...]
) -> tuple[str, ...]:
    kind = layer.kind
    if kind == "conv":
        w = layer.params["W"]
        s, pad = layer.stride, layer.padding  # type: ignore[attr-defined]
        return (f"{w.shape[0]} filters {_shape(w.shape[1:])} over {into.text}, stride {s}, pad {pad}; "
                f"{_pct(int((a_out > 0).sum()), a_out.size)} positive",)
    if kind == "relu":
        zeros = int((a_out == 0).sum())
        return (f"max(0, {into.text}): {zeros:,} of {a_out.size:,} zeros ({_pct(zeros, a_out.size)})",)
    if kind == "maxpool":
        k = layer.kernel_size  # type: ignore[attr-defined]
        return (f"max of each {k}×{k} window: {_shape(a_in.shape[1:])} → {_shape(a_out.shape[1:])} per channel; "
                f"{_pct(int((a_out == 0).sum()), a_out.size)} zeros",)
    if kind == "flatten":
        return (f"{into.text} {_shape(a_in.shape)} read in C order: {a_out.size:,} values",)
    if kind == "linear":
        facts = [f"W {_shape(layer.params['W'].shape)} · {into.text} + b"]
        if a_out.ndim == 1 and len(a_out) == len(classes):
            c = int(np.argmax(a_out))
            facts.append(f"largest: {classes[c]} ({a_out[c]:.3g})")
        return ("; ".join(facts),)
    if kind == "batchnorm":
        return _batchnorm_facts(layer, sym, into, a_in)
    if kind == "leakyrelu":
        neg = int((a_in <= 0).sum())
        return (f"{into.text} where {into.text} > 0, α·{into.text} elsewhere (α = {layer.slope:g}): "  # type: ignore[attr-defined]
                f"{neg:,} of {a_out.size:,} scaled by α ({_pct(neg, a_out.size)})",)
    if kind == "tanh":
        sat = int((np.abs(a_out) > 0.99).sum())
        return (f"tanh({into.text}) in (−1, 1): {sat:,} of {a_out.size:,} saturated (|·| > 0.99, slope 1 − y² < 0.02)",)
    if kind == "sigmoid":
        sat = int(((a_out < 0.01) | (a_out > 0.99)).sum())
        return (f"σ({into.text}) in (0, 1): {sat:,} of {a_out.size:,} saturated (below 0.01 or above 0.99)",)
    if kind == "dropout":
        p = layer.p  # type: ignore[attr-defined]
        return (f"evaluation mode: the identity, {sym.text} = {into.text} (in training each unit is dropped with "
                f"p = {p:g} and the rest scaled by 1/(1 − p) = {1 / (1 - p):.4g})",)
    if kind == "avgpool":
        k = layer.kernel_size  # type: ignore[attr-defined]
        return (f"mean of each {k}×{k} window: {_shape(a_in.shape[1:])} → {_shape(a_out.shape[1:])} per channel",)
    if kind == "globalavgpool":
        return (f"mean of each channel over its {_shape(a_in.shape[1:])} = {a_in[0].size:,} positions: "
                f"{a_out.size} values",)
    if kind == "residual":
        return _residual_forward_facts(layer, sym, into, a_in, a_out)
    return ()


def _range(v: np.ndarray) -> str:
    return f"{float(v.min()):.3g} … {float(v.max()):.3g}"


def _batchnorm_facts(layer: Layer, sym: Symbol, into: Symbol, a_in: np.ndarray) -> tuple[str, ...]:
    """μ, σ², x̂, γ, β of a batch-norm in evaluation mode (the running statistics), over one image."""
    mu, var = layer.buffers["running_mean"], layer.buffers["running_var"]
    eps = layer.eps  # type: ignore[attr-defined]
    shape = (-1,) + (1,) * (a_in.ndim - 1)
    xhat = (a_in - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    c = len(mu)
    facts = [f"evaluation mode: μ, σ² are the running estimates of {c} channel{'s' if c > 1 else ''}: "
             f"μ {_range(mu)}, σ² {_range(var)}"]
    if a_in.ndim == 3:
        axes = (1, 2)
        m_mean, m_var = float(xhat.mean(axis=axes).mean()), float(xhat.var(axis=axes).mean())
        facts.append(f"x̂ = ({into.text} − μ)/√(σ² + ε): over this image's positions mean {m_mean:.3g}, variance "
                     f"{m_var:.3g} (channel average; over a training batch exactly 0 and 1)")
    else:
        facts.append(f"x̂ = ({into.text} − μ)/√(σ² + ε): mean {float(xhat.mean()):.3g}, variance "
                     f"{float(xhat.var()):.3g} over the {c} features (over a training batch each is exactly 0 and 1)")
    facts.append(f"{sym.text} = γ x̂ + β: γ {_range(layer.params['gamma'])}, β {_range(layer.params['beta'])}")
    return tuple(facts)


def _residual_forward_facts(layer: Layer, sym: Symbol, into: Symbol, a_in: np.ndarray, a_out: np.ndarray
                            ) -> tuple[str, ...]:
    inner = " → ".join(c.name or c.kind for c in layer.children)  # type: ignore[attr-defined]
    proj = layer.shortcut  # type: ignore[attr-defined]
    if proj is None:
        ratio = _norm_ratio(a_out - a_in, a_in)
        return (f"{sym.text} = {into.text} + F({into.text}), F: {inner}; ‖F({into.text})‖/‖{into.text}‖ = {ratio}",)
    return (f"{sym.text} = Proj({into.text}) + F({into.text}), F: {inner}; Proj: 1×1 conv, stride {proj.stride}, "
            f"{_shape(a_in.shape)} → {_shape(a_out.shape)}",)


def _facts_p(top: list[tuple[int, str, float]], label: int, classes: tuple[str, ...]) -> tuple[str, ...]:
    best = ", ".join(f"{name} {prob:.3f}" for _, name, prob in top[:3])
    rank = next(r for r, (c, _, _) in enumerate(top) if c == label) + 1
    p_true = next(prob for c, _, prob in top if c == label)
    return (f"top: {best}", f"true label: {classes[label]} (p = {p_true:.3f}, rank {rank})")


def _facts_dz(dz: np.ndarray, label: int, classes: tuple[str, ...]) -> tuple[str, ...]:
    return (f"p − y: negative only at the true class {classes[label]} ({dz[label]:.3g}); sums to 0",)


def _param_grad_facts(layer: Layer, k: str, sym: Symbol, names: list[LayerNames], i: int) -> tuple[str, ...]:
    out = names[i].output.grad().text
    into = (names[i - 1].output if i else _sym("X")).text
    if layer.kind == "linear":
        return (f"= {out}",) if k == "b" else (f"{out} ⊗ {into}: outer product (rank 1)",)
    if layer.kind == "conv":
        if k == "b":
            return (f"Σ over positions of {out}, per channel",)
        return (f"Σ over positions of {out} × the {into} patch under the filter",)
    if layer.kind == "batchnorm":
        times = "" if k == "beta" else " · x̂"
        if _is_image(layer):
            return (f"Σ over positions of {out}{times}, per channel",)
        return (f"= {out}{times} (one image: no sum over a batch)",)
    return ()


def _is_image(layer: Layer) -> bool:
    """Whether a batch-norm's last pass normalised images (N, C, H, W) rather than vectors."""
    x = getattr(layer, "_xhat", None)
    return x is not None and x.ndim == 4


def _backward_facts(
    layer: Layer, into: Symbol, out: Symbol, a_in: np.ndarray, d_in: np.ndarray, d_out: np.ndarray,
    w_sym: Symbol | None,
) -> tuple[str, ...]:
    kind = layer.kind
    nnz = int(np.count_nonzero(d_in))
    if kind == "linear":
        w = w_sym.text if w_sym else "W"
        return (f"{w}ᵀ · {out.grad().text}: the error spread back over {d_in.size:,} inputs",)
    if kind == "flatten":
        return (f"{out.grad().text} reshaped back to {_shape(d_in.shape)} (inverse of the flatten)",)
    if kind == "maxpool":
        windows = d_out.size
        live = int(np.count_nonzero(d_out))
        k = layer.kernel_size  # type: ignore[attr-defined]
        return (f"{nnz:,} of {d_in.size:,} non-zero: one per {k}×{k} pooling window ({live:,} of {windows:,} "
                f"windows have {out.grad().text} ≠ 0), at the window's arg-max; the other {k * k - 1} get 0",)
    if kind == "relu":
        blocked = int(np.count_nonzero(d_out * (a_in <= 0)))
        return (f"{out.grad().text} · 1({into.text} > 0): {nnz:,} non-zero; {blocked:,} gradients stopped "
                f"where {into.text} ≤ 0",)
    if kind == "conv":
        w = w_sym.text if w_sym else "W"
        pad, stride = layer.padding, layer.stride  # type: ignore[attr-defined]
        if stride == 1:
            return (f"Σ_c,u,v {w}[c,c′,u,v] · {out.grad().text}[c, x−u+{pad}, y−v+{pad}]: every filter sends the "
                    f"error back to the {into.text} entries it read",)
        return (f"every filter of {w} sends the error back to the {into.text} entries it read (stride {stride})",)
    if kind == "batchnorm":
        d_in_t, d_out_t = into.grad().text, out.grad().text
        return (f"evaluation mode: a fixed affine map per channel, {d_in_t} = γ · {d_out_t}/√(σ² + ε) (training "
                f"adds the paths through μ and σ²); ‖{d_in_t}‖/‖{d_out_t}‖ = {_norm_ratio(d_in, d_out)}",)
    if kind == "leakyrelu":
        scaled = int(np.count_nonzero(d_out * (a_in <= 0)))
        return (f"{out.grad().text} · (1({into.text} > 0) + α·1({into.text} ≤ 0)): {scaled:,} gradients scaled by "
                f"α = {layer.slope:g} where {into.text} ≤ 0, none stopped",)  # type: ignore[attr-defined]
    if kind in ("tanh", "sigmoid"):
        local = "1 − y²" if kind == "tanh" else "y(1 − y) ≤ ¼"
        return (f"{out.grad().text} ⊙ ({local}): ‖{into.grad().text}‖/‖{out.grad().text}‖ = "
                f"{_norm_ratio(d_in, d_out)}, the gradient shrinks by this factor through the layer",)
    if kind == "dropout":
        return (f"evaluation mode: {into.grad().text} = {out.grad().text} (training: δ ⊙ m/(1 − p), 0 where dropped)",)
    if kind == "avgpool":
        k = layer.kernel_size  # type: ignore[attr-defined]
        return (f"each window's {out.grad().text}/{k * k} spread over its {k}×{k} inputs",)
    if kind == "globalavgpool":
        hw = a_in[0].size
        return (f"{out.grad().text}[c]/{hw} at every one of the {_shape(a_in.shape[1:])} positions of channel c",)
    if kind == "residual":
        return _residual_backward_facts(layer, into, out, d_in)
    return ()


def _norm_ratio(a: np.ndarray, b: np.ndarray) -> str:
    nb = float(np.linalg.norm(b))
    return f"{float(np.linalg.norm(a)) / nb:.3g}" if nb else "—"


def _residual_backward_facts(layer: Layer, into: Symbol, out: Symbol, d_in: np.ndarray) -> tuple[str, ...]:
    """δ of the block's input = the shortcut path + the F path (docs/derivations.md#residual-block)."""
    paths = getattr(layer, "paths", None)
    d_in_t, d_out_t = into.grad().text, out.grad().text
    if paths is None:  # pragma: no cover - trace asks every layer for its input gradient
        return ()
    short, f_path = (np.asarray(p, dtype=np.float64)[0] for p in paths)
    via = d_out_t if layer.shortcut is None else f"Projᵀ {d_out_t}"  # type: ignore[attr-defined]
    return (f"{d_in_t} = {via} (shortcut) + Fᵀ {d_out_t} (through F): ‖shortcut‖ = "
            f"{float(np.linalg.norm(short)):.3g}, ‖F path‖ = {float(np.linalg.norm(f_path)):.3g}, "
            f"‖{d_in_t}‖ = {float(np.linalg.norm(d_in)):.3g}",)


# --------------------------------------------------------------------------------------------- the image


def pick_image(x: np.ndarray, y: np.ndarray, index: int, split: str) -> tuple[np.ndarray, int]:
    """Image `index` of a split: x (N, C, H, W), y (N,) -> (image (C, H, W), label). ConfigError when out of range."""
    n = len(x)
    if not 0 <= index < n:
        raise ConfigError(f"--index: must be in 0..{n - 1} for the {split} split ({n:,} images), got {index}")
    return x[index], int(y[index])
