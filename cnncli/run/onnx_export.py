"""ONNX export of a network: the library behind `cnn export CHECKPOINT --onnx FILE`.

The graph is built with `onnx.helper` from standard operators only (default domain, opset `OPSET`; no custom
operators), one rule per built-in layer type, and checked with `onnx.checker.check_model` before it is
written (atomically). Needs the onnx extra: ``pip install 'cnncli[onnx]'``.

The exported model takes raw pixels and folds the checkpoint's normalisation in:

- input ``pixels``: float32 (N, C, H, W), the image's pixels divided by 255 (values in [0, 1]), channels
  first as the network's input; N is free;
- ``Sub(mean)``, ``Div(std)`` per channel (``data.normalize`` of the checkpoint), then the layers;
- outputs ``logits``: float32 (N, K), the class scores z, and ``probabilities``: softmax(z) (N, K).

The class names, mean and std are also in the model's metadata (``classes``, ``normalize``, JSON text).

How each layer becomes ONNX (evaluation mode; shapes per example):

| layer | ONNX |
|---|---|
| conv | ``Conv`` (W (C_out, C_in, K, K) as is, b when the layer has one; strides, pads on every side) |
| relu, leakyrelu, tanh, sigmoid | ``Relu``, ``LeakyRelu`` (alpha = slope; equal at 0), ``Tanh``, ``Sigmoid`` |
| maxpool | ``MaxPool`` (no padding, floor: windows that do not fit are dropped, as ours) |
| avgpool | ``AveragePool`` with ``count_include_pad=1`` (the zero padding counts in the divisor K², as ours) |
| globalavgpool | ``GlobalAveragePool`` then ``Flatten`` (ours is already flat, (C,)) |
| flatten | ``Flatten(axis=1)``: C order, k = c·H·W + i·W + j, as ours |
| linear | ``Gemm(h, W, b, transB=1)``: W is stored (out, in), z = h·Wᵀ + b |
| batchnorm | ``BatchNormalization`` with the running mean and variance and the layer's ε (images and vectors) |
| dropout | nothing (the identity in evaluation mode) |
| residual | F's layers, the shortcut (identity, or the 1×1 strided projection ``Conv``), ``Add`` |

A layer without a rule (a type of your own, or a subclass of a built-in one, which may compute something
else) is an `ExportError` naming it. Parameters keep their checkpoint names as initializer names
(``conv1.W``, ``res1.shortcut.W``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.config import NormalizeConfig
from cnncli.host.atomic import atomic_write
from cnncli.host.errors import CnnError
from cnncli.host.version import __version__
from cnncli.nn.layer import Layer
from cnncli.nn.layers import (
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    LeakyReLU,
    Linear,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
)
from cnncli.nn.model import Sequential
from cnncli.nn.residual import Residual

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17: runtimes that know opset 17 read it
INSTALL_HINT = "ONNX export needs the onnx package: pip install 'cnncli[onnx]'"
INPUT, LOGITS, PROBABILITIES = "pixels", "logits", "probabilities"


class OnnxUnavailable(CnnError):
    """The onnx package is not installed (the message says how to install it)."""


class ExportError(CnnError):
    """A network that cannot be exported (a layer without an export rule); the message names the layer."""


def require_onnx() -> Any:
    """The `onnx` module; `OnnxUnavailable` (one line with the install command) when it is missing."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise OnnxUnavailable(INSTALL_HINT) from None
    return onnx


@dataclass(frozen=True)
class ExportInfo:
    """What `export_onnx` wrote."""

    path: Path
    opset: int
    input_shape: tuple[int, ...]  # (C, H, W) of one image
    classes: tuple[str, ...]
    nodes: int  # operators in the graph
    bytes: int


class _Graph:
    """Nodes and initializers being collected; every value gets a fresh name."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        self._count[hint] = self._count.get(hint, 0) + 1
        return f"{hint}_{self._count[hint]}"

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer of float32 `value` under `name` (a checkpoint key, or a fresh name)."""
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


Rule = Callable[[_Graph, Layer, str, str, str], str]  # (graph, layer, x, parameter prefix, where) -> output


def _conv(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, Conv2D)
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    inputs = [x, g.const(f"{prefix}W", layer.params["W"])]
    if "b" in layer.params:
        inputs.append(g.const(f"{prefix}b", layer.params["b"]))
    return g.op("Conv", inputs, prefix.rstrip(".") or "conv", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)


def _unary(op_type: str) -> Rule:
    def rule(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
        return g.op(op_type, [x], op_type.lower())

    return rule


def _leakyrelu(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, LeakyReLU)
    return g.op("LeakyRelu", [x], "leakyrelu", alpha=float(layer.slope))


def _maxpool(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, MaxPool2D)
    k, s = layer.kernel_size, layer.stride
    return g.op("MaxPool", [x], "maxpool", kernel_shape=[k, k], strides=[s, s], pads=[0] * 4, ceil_mode=0)


def _avgpool(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, AvgPool2D)
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    return g.op("AveragePool", [x], "avgpool", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                count_include_pad=1, ceil_mode=0)


def _globalavgpool(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    return g.op("Flatten", [g.op("GlobalAveragePool", [x], "globalavgpool")], "flatten", axis=1)


def _flatten(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    return g.op("Flatten", [x], "flatten", axis=1)


def _linear(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, Linear)
    inputs = [x, g.const(f"{prefix}W", layer.params["W"])]  # (out, in): transB
    if "b" in layer.params:
        inputs.append(g.const(f"{prefix}b", layer.params["b"]))
    return g.op("Gemm", inputs, prefix.rstrip(".") or "fc", transB=1)


def _batchnorm(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, BatchNorm)
    inputs = [x, *(g.const(f"{prefix}{k}", v) for k, v in (("gamma", layer.gamma()),
              ("beta", layer.params["beta"]), ("running_mean", layer.buffers["running_mean"]),
              ("running_var", layer.buffers["running_var"])))]
    return g.op("BatchNormalization", inputs, prefix.rstrip(".") or "bn", epsilon=float(layer.eps))


def _dropout(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    return x  # evaluation mode: y = x


def _residual(g: _Graph, layer: Layer, x: str, prefix: str, where: str) -> str:
    assert isinstance(layer, Residual)
    f = _layers(g, layer.children, x, prefix, f"{where}.layers")
    short = x if layer.shortcut is None else _conv(g, layer.shortcut, x, f"{prefix}shortcut.", where)
    return g.op("Add", [short, f], prefix.rstrip(".") or "residual")


RULES: dict[type, Rule] = {
    Conv2D: _conv, ReLU: _unary("Relu"), LeakyReLU: _leakyrelu, Tanh: _unary("Tanh"), Sigmoid: _unary("Sigmoid"),
    MaxPool2D: _maxpool, AvgPool2D: _avgpool, GlobalAvgPool2D: _globalavgpool, Flatten: _flatten, Linear: _linear,
    BatchNorm: _batchnorm, Dropout: _dropout, Residual: _residual,
}  # fmt: skip  # by exact class: a subclass of a built-in layer may compute something else


def _layers(g: _Graph, layers: list[Layer], x: str, prefix: str, path: str) -> str:
    for i, layer in enumerate(layers):  # every type has a rule: `check_exportable` ran first
        x = RULES[type(layer)](g, layer, x, f"{prefix}{layer.name}." if layer.name else prefix, f"{path}[{i}]")
    return x


def check_exportable(model: Sequential) -> None:
    """ExportError naming the first layer (nested ones too) that has no export rule; needs no onnx."""

    def walk(layers: list[Layer], path: str) -> None:
        for i, layer in enumerate(layers):
            if type(layer) not in RULES:
                raise ExportError(
                    f"{path}[{i}] ({layer.name or layer.kind}): layer type {layer.kind!r} ({type(layer).__name__}) "
                    "has no ONNX export rule; only the built-in layer types export"
                )
            if isinstance(layer, Residual):
                walk(layer.children, f"{path}[{i}].layers")

    walk(model.layers, "model.layers")


def build_onnx(model: Sequential, normalize: NormalizeConfig, classes: tuple[str, ...] = (), opset: int = OPSET) -> Any:
    """The `onnx.ModelProto` of `model` (evaluation mode) with `normalize` folded in, checked by the checker.

    Input ``pixels`` float32 (N, C, H, W) in [0, 1]; outputs ``logits`` and ``probabilities`` (N, K).
    """
    onnx = require_onnx()
    check_exportable(model)
    helper = onnx.helper
    c = model.input_shape[0]
    k = model.output_shape[0]
    classes = tuple(classes) if classes else tuple(str(i) for i in range(k))
    mean = np.asarray(normalize.mean, np.float32).reshape(1, c, 1, 1)
    std = np.asarray(normalize.std, np.float32).reshape(1, c, 1, 1)
    g = _Graph(onnx)
    x = g.op("Sub", [INPUT, g.const("normalize.mean", mean)], "normalize")
    x = g.op("Div", [x, g.const("normalize.std", std)], "normalize")
    x = _layers(g, model.layers, x, "", "model.layers")
    g.nodes.append(helper.make_node("Identity", [x], [LOGITS], name=LOGITS))
    g.nodes.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], name=PROBABILITIES, axis=1))
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "cnncli",
        [helper.make_tensor_value_info(INPUT, float32, ["N", *model.input_shape])],
        [helper.make_tensor_value_info(LOGITS, float32, ["N", k]),
         helper.make_tensor_value_info(PROBABILITIES, float32, ["N", k])],
        initializer=g.initializers,
        doc_string=f"pixels: float32 (N, {', '.join(map(str, model.input_shape))}) in [0, 1] (pixel / 255), "
                   "normalisation included; logits, probabilities: (N, classes)",
    )
    proto = helper.make_model(graph, producer_name="cnncli", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = IR_VERSION
    helper.set_model_props(proto, {
        "classes": json.dumps(list(classes)),
        "normalize": json.dumps({"mean": list(normalize.mean), "std": list(normalize.std)}),
        "input": "pixels / 255, float32 (N, C, H, W); mean/std normalisation is part of the graph",
    })
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(
    model: Sequential, normalize: NormalizeConfig, path: Path, classes: tuple[str, ...] = (), opset: int = OPSET
) -> ExportInfo:
    """Build (`build_onnx`) and write the ONNX file atomically (temp file + rename): `path` is either the old
    file or the whole new one."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; name the ONNX file to write, e.g. {path / 'model.onnx'}")
    proto = build_onnx(model, normalize, classes, opset)
    data = proto.SerializeToString()
    try:
        with atomic_write(path) as f:
            f.write(data)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    names = json.loads(next(p.value for p in proto.metadata_props if p.key == "classes"))
    return ExportInfo(path, opset, tuple(model.input_shape), tuple(names), len(proto.graph.node), len(data))
