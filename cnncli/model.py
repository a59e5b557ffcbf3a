"""A `Sequential` network built from the config's layer list, every shape inferred from the input shape.

Two ways to run it: the per-layer path (`Sequential.forward` / `backward`, the classes of `cnncli/layers.py`
one after another — the reference, and what `cnncli/gradcheck.py` inspects) and the fused `Engine` of
`cnncli/engine.py` (run by `Sequential.loss_and_grads` and `Sequential.predict`), which computes the same
functions to float32 rounding several times faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cnncli.config import ConvSpec, FlattenSpec, LinearSpec, MaxPoolSpec, ModelConfig, ReluSpec
from cnncli.engine import Engine
from cnncli.errors import ConfigError
from cnncli.layers import Conv2D, Flatten, Layer, Linear, MaxPool2D, ReLU, Shape, softmax_cross_entropy


@dataclass(frozen=True)
class LayerInfo:
    """One row of `cnn summary`: a layer, its output shape per example, parameters and multiply-adds."""

    index: int
    name: str
    description: str
    output_shape: Shape
    params: int
    macs: int


class Sequential:
    """Layers applied in order. Parameters are addressed as '<layer>.<param>' ('conv1.W', 'fc1.b')."""

    def __init__(self, layers: list[Layer], input_shape: Shape) -> None:
        self.layers = layers
        self.input_shape = tuple(input_shape)
        # loss_and_grads / predict through the fused `Engine` (True) or the per-layer reference path (False).
        self.fast = True
        self.threads: int | None = None  # the engine's worker threads; None: `default_threads()`
        self._engine: Engine | None = None

    # ---- parameters -------------------------------------------------------------------------------
    def param_layers(self) -> Iterator[Layer]:
        return (layer for layer in self.layers if layer.params)

    def named_params(self) -> dict[str, np.ndarray]:
        """{'conv1.W': (16, 3, 3, 3), 'conv1.b': (16,), 'fc1.W': (10, 4096), ...}, the live arrays."""
        return {f"{layer.name}.{k}": v for layer in self.param_layers() for k, v in layer.params.items()}

    def named_grads(self) -> dict[str, np.ndarray]:
        """Gradients of the last backward pass, same keys as `named_params`."""
        return {f"{layer.name}.{k}": v for layer in self.param_layers() for k, v in layer.grads.items()}

    def load_params(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy arrays (same keys and shapes as `named_params`) into the model, keeping its dtype."""
        for layer in self.param_layers():
            for k, v in layer.params.items():
                v[...] = arrays[f"{layer.name}.{k}"]

    def astype(self, dtype: type) -> Sequential:
        """Convert every parameter (and gradient buffer) to `dtype` in place; returns self."""
        for layer in self.param_layers():
            for k in layer.params:
                layer.params[k] = layer.params[k].astype(dtype)
                layer.grads[k] = np.zeros_like(layer.params[k])
        return self

    @property
    def dtype(self) -> np.dtype:
        return next(iter(self.named_params().values())).dtype

    # ---- passes -----------------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """X (N, *input_shape) -> logits z (N, classes)."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dz: np.ndarray) -> np.ndarray | None:
        """δz (N, classes) -> δX (N, *input_shape), or None when the first layer skips it; fills grads."""
        d: np.ndarray | None = dz
        for layer in reversed(self.layers):
            assert d is not None
            d = layer.backward(d)
        return d

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """One training pass: forward, mean softmax cross-entropy, backward; fills `named_grads()`.

        x (N, *input_shape), y (N,) integer labels -> (loss, logits z (N, classes)). Runs the fused `Engine`
        (`self.fast`), else the per-layer path; both give the same numbers to float32 rounding.
        """
        if self.fast:
            return self.engine().loss_and_grads(x, y)
        z = self.forward(x)
        loss, dz, _ = softmax_cross_entropy(z, y)
        self.backward(dz)
        return loss, z

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Inference: X (N, *input_shape) -> logits z (N, classes), keeping nothing for a backward pass.

        The fused `Engine` when `self.fast`, else `forward`; the same numbers to float32 rounding.
        """
        if self.fast:
            return self.engine().predict(x)
        return self.forward(x)

    def engine(self) -> Engine:
        """The fused execution engine of this network (built on first use, rebuilt if `layers` changes)."""
        if self._engine is None or self._engine.key != (tuple(map(id, self.layers)), self.input_shape):
            self._engine = Engine(self.layers, self.input_shape)
        self._engine.threads = self.threads
        return self._engine

    def set_input_grad(self, needed: bool) -> None:
        """Whether the first layer computes δX (gradcheck wants it; training does not)."""
        first = self.layers[0]
        if hasattr(first, "needs_input_grad"):
            first.needs_input_grad = needed

    # ---- description ------------------------------------------------------------------------------
    def summary(self) -> list[LayerInfo]:
        rows, shape = [], self.input_shape
        for i, layer in enumerate(self.layers):
            out = layer.output_shape(shape)
            n_params = sum(int(v.size) for v in layer.params.values())
            macs = layer.macs(shape)
            rows.append(LayerInfo(i, layer.name or layer.kind, layer.describe(), out, n_params, macs))
            shape = out
        return rows

    @property
    def output_shape(self) -> Shape:
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape


def build_model(cfg: ModelConfig, seed: int = 0, dtype: type = np.float32) -> Sequential:
    """Build the network of `cfg`, inferring each layer's input size; He-normal weights from `seed`.

    Raises ConfigError naming the layer (`model.layers[i]`) when a layer does not fit its input.
    """
    rng = np.random.default_rng(seed)
    shape: Shape = tuple(cfg.input_shape)
    layers: list[Layer] = []
    counts = {"conv": 0, "linear": 0}
    names: set[str] = set()
    for i, spec in enumerate(cfg.layers):
        path = f"model.layers[{i}]"
        layer: Layer
        if isinstance(spec, ConvSpec):
            counts["conv"] += 1
            name = spec.name or f"conv{counts['conv']}"
            if len(shape) != 3:
                raise ConfigError(f"{path} ({name}): conv needs an image input (C, H, W), got {shape}")
            layer = Conv2D(shape[0], spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                           name=name, rng=rng, dtype=dtype)
        elif isinstance(spec, LinearSpec):
            counts["linear"] += 1
            name = spec.name or f"fc{counts['linear']}"
            if len(shape) != 1:
                raise ConfigError(
                    f"{path} ({name}): a linear layer needs a flat input but gets shape "
                    f"{'×'.join(map(str, shape))}; put a flatten layer before it"
                )
            layer = Linear(shape[0], spec.out_features, name=name, rng=rng, dtype=dtype)
        elif isinstance(spec, ReluSpec):
            layer = ReLU()
        elif isinstance(spec, MaxPoolSpec):
            if len(shape) != 3:
                raise ConfigError(f"{path} (maxpool): needs an image input (C, H, W), got {shape}")
            layer = MaxPool2D(spec.kernel_size, spec.stride)
        elif isinstance(spec, FlattenSpec):
            layer = Flatten()
        else:  # pragma: no cover - the config schema admits no other type
            raise TypeError(f"unknown layer spec {spec!r}")
        if layer.params:
            if layer.name in names:
                raise ConfigError(f"{path}.name: {layer.name!r} is already used by an earlier layer")
            names.add(layer.name)
        try:
            shape = layer.output_shape(shape)
        except ValueError as e:
            label = f"{path} ({layer.name})" if layer.name else f"{path} ({layer.kind})"
            raise ConfigError(f"{label}: {e}") from None
        layers.append(layer)
    if len(shape) != 1:
        raise ConfigError(
            f"model.layers: the network must end in a linear layer giving class scores, "
            f"but its output has shape {'×'.join(map(str, shape))}"
        )
    model = Sequential(layers, cfg.input_shape)
    model.set_input_grad(False)
    return model
