"""A kit for teachers (`cnn lab new TYPE`, `cnn lab check FILE …`): a layer whose backward pass students write,
and the grading of what they hand in.

`new_lab(kind, folder)` writes three files: `<kind>_layer.py` (a subclass of cnncli's own layer of that type:
the forward pass given, the backward left to write — signature, shapes, the notation of docs/derivations.md,
`raise NotImplementedError`), `lab.yaml` (a small network that uses it) and `README.md` for the students.

`grade(file)` loads a student's file in a registry of its own (forty files may all define `labconv`) and
scores it: the forward against cnncli's layer on random inputs with the same parameters, the layer contract,
the one-layer backward check (cnncli/nn/layercheck.py: random parameters, inputs and upstream gradients,
several shapes, both modes) per tensor, and the whole-network gradcheck of the lab's network. An exception
raised in the student's code does not stop the grading: it is recorded against the item with the line it
came from.

Library code: returns data, never prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.host.errors import CnnError, ConfigError
from cnncli.nn import registry


@dataclass(frozen=True)
class Kind:
    """One lab: the built-in class it subclasses, its config options in the lab network, the notation."""

    base: str  # class name in cnncli.layers
    type_name: str  # the built-in's type
    options: str  # YAML flow mapping of the lab layer's options in lab.yaml
    before: str  # layers before it in lab.yaml
    after: str  # layers after it
    shapes: str  # the backward's docstring: shapes and what to set
    keeps: str  # what forward keeps for the backward


KINDS: dict[str, Kind] = {
    "conv": Kind(
        "Conv2D", "conv", "{out_channels: 4, kernel_size: 3, padding: 1}", "", "relu, maxpool",
        "δS (N, C_out, H', W') -> δX (N, C_in, H, W). Set self.grads['W'] (C_out, C_in, K, K) and "
        "self.grads['b'] (C_out,) (when the layer has a bias: 'b' in self.params).\n"
        "        S[n, c, i, j] = Σ_{c', u, v} W[c, c', u, v] · X[n, c', s·i + u − pad, s·j + v − pad] + b[c]",
        "self.x (the input X), self.params['W'], self.params.get('b'), self.kernel_size (K), self.stride (s), "
        "self.padding (pad)"),
    "maxpool": Kind(
        "MaxPool2D", "maxpool", "{kernel_size: 2}", "conv, relu", "",
        "δP (N, C, H', W') -> δA (N, C, H, W).\n"
        "        P[n, c, i, j] = max over the window (u, v) of A[n, c, s·i + u, s·j + v]",
        "self.x (the input A), self.y (the output P), self.kernel_size (K), self.stride (s)"),
    "avgpool": Kind(
        "AvgPool2D", "avgpool", "{kernel_size: 2}", "conv, relu", "",
        "δP (N, C, H', W') -> δA (N, C, H, W).\n"
        "        P[n, c, i, j] = (1/K²) Σ_{u, v} A[n, c, s·i + u − pad, s·j + v − pad] (padding zeros count)",
        "self.x (the input A), self.kernel_size (K), self.stride (s), self.padding (pad)"),
    "linear": Kind(
        "Linear", "linear", "{out_features: 10}", "conv, relu, maxpool, flatten", "",
        "δz (N, out) -> δh (N, in). Set self.grads['W'] (out, in) and self.grads['b'] (out,).\n"
        "        z[n, i] = Σ_k W[i, k] · h[n, k] + b[i]",
        "self.x (the input h), self.params['W'], self.params['b']"),
    "batchnorm": Kind(
        "BatchNorm", "batchnorm", "{}", "conv", "relu, maxpool",
        "δY (N, C, H, W) -> δX (N, C, H, W). Set self.grads['gamma'] (C,) and self.grads['beta'] (C,).\n"
        "        Y = γ · x̂ + β, x̂ = (X − μ) / √(σ² + ε), μ and σ² over (n, i, j) in training mode (the batch),\n"
        "        the running statistics self.buffers['running_mean'], ['running_var'] in evaluation mode\n"
        "        (self.training says which: your backward must handle both)",
        "self.x (the input X), self.params['gamma'], self.params['beta'], self.eps (ε), self.training, "
        "self.buffers"),
    "relu": Kind(
        "ReLU", "relu", "{}", "conv", "maxpool",
        "δA (N, …) -> δS (N, …), the same shape.\n        A = max(0, S)", "self.x (the input S)"),
    "leakyrelu": Kind(
        "LeakyReLU", "leakyrelu", "{slope: 0.1}", "conv", "maxpool",
        "δA (N, …) -> δS (N, …), the same shape.\n        A = S where S > 0, else slope · S",
        "self.x (the input S), self.slope"),
    "tanh": Kind(
        "Tanh", "tanh", "{}", "conv", "maxpool",
        "δA (N, …) -> δS (N, …), the same shape.\n        A = tanh(S)", "self.x (the input S), self.y (A)"),
    "sigmoid": Kind(
        "Sigmoid", "sigmoid", "{}", "conv", "maxpool",
        "δA (N, …) -> δS (N, …), the same shape.\n        A = σ(S) = 1 / (1 + e^(−S))",
        "self.x (the input S), self.y (A)"),
}
ALIASES = {"softmax-ce": "the softmax and cross-entropy loss is not a layer in cnncli (every network ends in it); "
           "its gradient δz = (p − y)/N is derived in docs/derivations.md#softmax-and-cross-entropy"}


def lab_type(kind: str) -> str:
    return f"lab{kind}"


def class_name(kind: str) -> str:
    return f"Lab{KINDS[kind].base}"


def check_kind(kind: str) -> Kind:
    if kind in ALIASES:
        raise ConfigError(f"lab {kind!r}: {ALIASES[kind]}; labs exist for {', '.join(KINDS)}")
    if kind not in KINDS:
        raise ConfigError(f"lab type {kind!r}: not one of {', '.join(KINDS)}")
    return KINDS[kind]


def layer_source(kind: str) -> str:
    k = check_kind(kind)
    from cnncli.nn.registry import LAYER_TYPES

    anchor = LAYER_TYPES[k.type_name].doc
    shapes = k.shapes.replace(". Set ", ".\n        Set ")
    keeps = textwrap.fill(f"Available: {k.keeps}.", 110, subsequent_indent=" " * 8)
    return f'''"""Lab: the backward pass of {k.base} ({k.type_name}). Write `backward` below; the forward pass is given.

Check it at any time (every command needs --layers with this file):

    cnn gradcheck --layer {lab_type(kind)} --config lab.yaml --layers {kind}_layer.py   # this layer alone
    cnn gradcheck --config lab.yaml --layers {kind}_layer.py                    # the whole network
    cnn lab check {kind}_layer.py                                               # the grade

Notation and the forward pass: docs/derivations.md#{anchor} (δ[·] = ∂L/∂(·), L the batch's mean loss).
"""

from __future__ import annotations

import numpy as np

from cnncli.nn.layers import {k.base}


class {class_name(kind)}({k.base}):
    """cnncli's {k.base}, with a backward pass of your own."""

    type_name = "{lab_type(kind)}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The given forward pass ({k.base}.forward in cnncli/layers.py); keeps its input and output for you."""
        y = super().forward(x)
        self.x, self.y = x, y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """{shapes}

        {keeps}
        δ of the output (dout) already carries the 1/N of the mean loss: sum over the batch, do not average.
        Assign each gradient (self.grads[key] = …), never add to it; return an array of the input's shape.
        """
        raise NotImplementedError("{class_name(kind)}.backward: not written yet")
'''


def config_source(kind: str) -> str:
    k = check_kind(kind)
    simple = {"relu": "{type: relu}", "maxpool": "{type: maxpool, kernel_size: 2}", "flatten": "{type: flatten}",
              "conv": "{type: conv, out_channels: 4, kernel_size: 3, padding: 1"
                      + (", bias: false}" if kind == "batchnorm" else "}")}
    layers = [simple[s.strip()] for s in k.before.split(",") if s.strip()]
    options = k.options.strip("{}")
    layers.append(f"{{type: {lab_type(kind)}{', ' + options if options else ''}}}")
    layers += [simple[s.strip()] for s in k.after.split(",") if s.strip()]
    if kind != "linear":
        layers += [simple["flatten"], "{type: linear, out_features: 10}"]
    body = "\n".join(f"    - {entry}" for entry in layers)
    return (f"# The lab network for {kind}_layer.py: every command that reads it needs --layers {kind}_layer.py\n"
            f"seed: 0\nmodel:\n  input_shape: [3, 8, 8]\n  layers:\n{body}\n"
            "train:\n  epochs: 1\n")


def readme_source(kind: str) -> str:
    k = check_kind(kind)
    return f"""# Lab: backpropagation through {k.base} ({k.type_name})

Open `{kind}_layer.py` and write `{class_name(kind)}.backward`. The forward pass is given (it is cnncli's own);
the docstring says the shapes, what to set and what the forward keeps for you. Derive the gradients on paper
first, in the notation of docs/derivations.md.

Check your work as often as you like:

```sh
cnn gradcheck --layer {lab_type(kind)} --config lab.yaml --layers {kind}_layer.py
cnn gradcheck --config lab.yaml --layers {kind}_layer.py
cnn lab check {kind}_layer.py
```

The first checks your layer alone, on random inputs, random upstream gradients and random parameters, for
several shapes and in both modes; when it fails it says how (a flipped sign, a constant factor such as 1/N,
a missing sum over the batch, a gradient never set, wrong at a few entries and where). The second checks the
whole network of lab.yaml. The third is what your grade is made of.
"""


def new_lab(kind: str, folder: Path) -> list[Path]:
    """Write the lab's three files into `folder` (created; files already there are not overwritten:
    ConfigError naming the first)."""
    from cnncli.host.atomic import atomic_write

    check_kind(kind)
    files = {folder / f"{kind}_layer.py": layer_source(kind), folder / "lab.yaml": config_source(kind),
             folder / "README.md": readme_source(kind)}
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"lab new: {folder} exists and is not a folder")
    for path in files:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"lab new: {path} already exists; choose another --out folder")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        with atomic_write(path, binary=False) as f:
            f.write(text)
    return list(files)


# ------------------------------------------------------------------------------------------------ grading


@dataclass(frozen=True)
class Item:
    """One graded item: its name, points earned of the maximum, and what was found."""

    name: str
    points: float
    max_points: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.points == self.max_points


@dataclass(frozen=True)
class Grade:
    file: str
    layer: str  # the lab type found in the file ('' when none)
    reference: str  # cnncli's type it is compared with
    items: list[Item]

    @property
    def score(self) -> float:
        return sum(i.points for i in self.items)

    @property
    def max_score(self) -> float:
        return sum(i.max_points for i in self.items)

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "layer": self.layer, "reference": self.reference, "score": self.score,
                "max_score": self.max_score, "passed": self.score == self.max_score,
                "items": [{"name": i.name, "points": i.points, "max_points": i.max_points, "passed": i.passed,
                           "detail": i.detail} for i in self.items]}


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Layer types registered inside the block vanish after it (each student's file has its own)."""
    saved = (dict(registry.LAYER_TYPES), dict(registry._SOURCES), dict(registry._LOADED))
    try:
        yield
    finally:
        for table, old in zip((registry.LAYER_TYPES, registry._SOURCES, registry._LOADED), saved, strict=True):
            table.clear()
            table.update(old)


def _raised(e: BaseException, file: Path) -> str:
    """'ValueError: … (line 42 of alice.py)': an exception from a student's code, with their line."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).name == file.name:
            where = f" (line {frame.lineno} of {file.name}: {frame.line})"
    if isinstance(e, NotImplementedError):
        return f"not written yet{where}"
    return f"{type(e).__name__}: {e}{where}"


def _reference_type(cls: type) -> str:
    for base in cls.__mro__[1:]:
        if base.__module__ == "cnncli.nn.layers" and getattr(base, "type_name", ""):
            return base.type_name
    return ""


def grade(file: Path, seed: int = 0, tol: float = 1e-6) -> Grade:
    """Score one student's file (see the module docstring). Points: forward 1, contract 1, δx 2, each
    parameter's gradient 1, the whole network 1."""
    from cnncli.config import build_config
    from cnncli.nn.contracts import LayerContractError
    from cnncli.nn.gradcheck import gradcheck_report
    from cnncli.nn.layercheck import _fitting, _maker, check_layer
    from cnncli.nn.model import build_model

    with isolated_registry():
        try:
            names = registry.load_layer_file(file)
        except ConfigError as e:
            raise ConfigError(str(e).replace("--layers ", "lab check ", 1)) from None
        labs = [n for n in names if _reference_type(registry.LAYER_TYPES[n])]
        if not labs:
            raise ConfigError(f"lab check {file}: defines no subclass of a cnncli layer (made by cnn lab new)")
        name = labs[0]
        cls = registry.LAYER_TYPES[name]
        ref_type = _reference_type(cls)
        kind = name.removeprefix("lab") if name.removeprefix("lab") in KINDS else ref_type
        items: list[Item] = []
        cfg = build_config(_yaml(config_source(kind).replace(f"type: {lab_type(kind)}", f"type: {name}")))
        opts = next(o for o in cfg.model.layers if o.type == name)
        ref_opts = registry.LAYER_TYPES[ref_type].Options(**{
            f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "type"}, type=ref_type)
        make, make_ref = _maker(opts), _maker(ref_opts)
        shapes = _fitting(make, None)

        # 1. forward against cnncli's own layer, the same random parameters
        try:
            worst = 0.0
            rng = np.random.default_rng(seed)
            for shape in shapes:
                for training in (True, False):
                    mine, ref = make(shape), make_ref(shape)
                    for k in ref.params:
                        ref.params[k] = mine.params[k] = rng.standard_normal(ref.params[k].shape)
                    mine.train(training)
                    ref.train(training)
                    x = rng.standard_normal((3, *shape))
                    y, y_ref = np.asarray(mine.forward(x)), ref.forward(x)
                    if y.shape != y_ref.shape:
                        raise ValueError(f"output shape {y.shape}, cnncli's {y_ref.shape}")
                    worst = max(worst, float(np.max(np.abs(y - y_ref)) / max(1.0, float(np.max(np.abs(y_ref))))))
            items.append(Item("forward = cnncli's " + ref_type, 1.0 if worst <= 1e-10 else 0.0, 1.0,
                              f"largest difference {worst:.1e} (relative to the output's size)"))
        except Exception as e:  # noqa: BLE001 - the student's code: recorded, the grading goes on
            items.append(Item("forward = cnncli's " + ref_type, 0.0, 1.0, _raised(e, file)))

        # 2./3. the contract and the one-layer check
        params = list(make(shapes[0]).params)
        tensors = ["δx", *params]
        try:
            report = check_layer(make, shapes, seed=seed, tol=tol)
            items.append(Item("contract (shapes, grads, finite)", 1.0, 1.0, "every call kept the contract"))
            for t in tensors:
                failed = [r for r in report.results if r.name == t and not r.passed]
                runs = [r for r in report.results if r.name == t]
                worth = 2.0 if t == "δx" else 1.0
                if failed:
                    detail = f"{len(failed)} of {len(runs)} runs fail; first ({failed[0].case.text()}): " \
                             f"{failed[0].diagnosis.text}"
                else:
                    detail = f"all {len(runs)} runs pass (worst rel. error {max(r.max_rel_error for r in runs):.1e})"
                items.append(Item(f"{t} alone" if t == "δx" else f"grads[{t!r}] alone", 0.0 if failed else worth,
                                  worth, detail))
        except LayerContractError as e:
            items.append(Item("contract (shapes, grads, finite)", 0.0, 1.0, str(e)))
            items += [Item(f"{t} alone" if t == "δx" else f"grads[{t!r}] alone", 0.0, 2.0 if t == "δx" else 1.0,
                           "not checked: the contract is broken") for t in tensors]
        except Exception as e:  # noqa: BLE001 - the student's code
            detail = _raised(e, file)
            items.append(Item("contract (shapes, grads, finite)", 0.0, 1.0, detail))
            items += [Item(f"{t} alone" if t == "δx" else f"grads[{t!r}] alone", 0.0, 2.0 if t == "δx" else 1.0,
                           detail) for t in tensors]

        # 4. the whole network
        try:
            net = gradcheck_report(build_model(cfg.model, seed=seed), seed=seed, tol=tol, max_entries=60)
            bad = [t.name for t in net.tensors if not t.passed]
            at = net.at_fault
            detail = "every tensor passes" if not bad else f"{', '.join(bad)} fail" + (
                f"; layer at fault: {at.name}" if at is not None else "")
            items.append(Item("whole-network gradcheck", 0.0 if bad else 1.0, 1.0, detail))
        except CnnError as e:
            items.append(Item("whole-network gradcheck", 0.0, 1.0, str(e)))
        except Exception as e:  # noqa: BLE001 - the student's code
            items.append(Item("whole-network gradcheck", 0.0, 1.0, _raised(e, file)))
    return Grade(str(file), name, ref_type, items)


def resolve(spec: str, config: Any | None) -> tuple[Callable[[tuple[int, ...]], Any], list[tuple[int, ...]], str]:
    """`--layer SPEC`: a layer of `config` (a loaded Config) by name or type, or a type with options
    ('conv out_channels=4 kernel_size=3'). Returns (make(shape), the input shapes to check, a title).
    ConfigError naming what was given when it is neither."""
    import yaml

    from cnncli.config import build_config
    from cnncli.nn.layercheck import _fitting, _maker
    from cnncli.nn.model import build_model
    from cnncli.nn.registry import LAYER_TYPES

    tokens = spec.split()
    if not tokens:
        raise ConfigError("--layer: empty; give a layer's name (conv1) or a type with options ('conv kernel_size=3')")
    known: list[str] = []
    if config is not None and len(tokens) == 1:
        model = build_model(config.model, seed=config.seed)
        shape = tuple(model.input_shape)
        for layer, opts in zip(model.layers, config.model.layers, strict=True):
            known.append(layer.name or opts.type)
            if tokens[0] in (layer.name, opts.type):
                make = _maker(opts)
                return make, _fitting(make, shape), f"{layer.name or opts.type} of the config, input {shape}"
            shape = tuple(layer.output_shape(shape))
    if tokens[0] in LAYER_TYPES:
        entry: dict[str, Any] = {"type": tokens[0]}
        for t in tokens[1:]:
            key, eq, value = t.partition("=")
            if not eq:
                raise ConfigError(f"--layer {spec!r}: {t!r} is not key=value")
            entry[key] = yaml.safe_load(value)
        cfg = build_config({"model": {"input_shape": [3, 5, 7], "layers": [entry]}}, name="--layer")
        make = _maker(cfg.model.layers[0])
        shapes = _fitting(make, None)
        if not shapes:
            raise ConfigError(f"--layer {spec!r}: fits none of the inputs tried (3×5×7, 2×6×6, 7)")
        return make, shapes, f"type {spec}"
    where = f"; the config's layers: {', '.join(known)}" if known else ""
    raise ConfigError(f"--layer {tokens[0]!r}: neither a layer of the config nor a layer type "
                      f"({', '.join(LAYER_TYPES)}){where}")


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)
