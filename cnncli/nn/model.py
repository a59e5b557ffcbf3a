"""A `Sequential` network built from the config's layer list, every shape inferred from the input shape.

This is the reference network: `forward` and `backward` run the classes of `cnncli/nn/layers.py` one after
another, as docs/derivations.md derives them, and `cnncli/nn/gradcheck.py` inspects exactly this path. The fused
engine (`cnncli/engine/`) takes a `Sequential` and computes the same functions to float32 rounding several times
faster (`engine.loss_and_grads(model, x, y)`, `engine.predict(model, x)`); nothing here knows about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnncli.host.errors import ConfigError
from cnncli.nn import contracts
from cnncli.nn.build import NestedLayerError, build_layers, param_budget
from cnncli.nn.layer import Layer, Shape
from cnncli.nn.layers import softmax_cross_entropy


@dataclass(frozen=True)
class LayerInfo:
    """One row of `cnn summary`: a layer, its output shape per example, parameters and multiply-adds."""

    index: int
    name: str
    description: str
    output_shape: Shape
    params: int
    macs: int
    buffers: int = 0


class Sequential:
    """Layers applied in order. Parameters are addressed as '<layer>.<param>' ('conv1.W', 'fc1.b')."""

    def __init__(self, layers: list[Layer], input_shape: Shape) -> None:
        self.layers = layers
        self.input_shape = tuple(input_shape)

    # ---- parameters -------------------------------------------------------------------------------
    def param_layers(self) -> Iterator[Layer]:
        return (layer for layer in self.layers if layer.params)

    def named_params(self) -> dict[str, np.ndarray]:
        """{'conv1.W': (16, 3, 3, 3), 'conv1.b': (16,), 'fc1.W': (10, 4096), ...}, the live arrays."""
        return {f"{layer.name}.{k}": v for layer in self.param_layers() for k, v in layer.params.items()}

    def named_grads(self) -> dict[str, np.ndarray]:
        """Gradients of the last backward pass, same keys as `named_params`."""
        return {f"{layer.name}.{k}": v for layer in self.param_layers() for k, v in layer.grads.items()}

    def named_buffers(self) -> dict[str, np.ndarray]:
        """Non-trainable state by '<layer>.<buffer>' ('bn1.running_mean'), the live arrays; saved in checkpoints."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.buffers.items()}

    def decayed(self) -> set[str]:
        """Names of the parameters weight decay applies to (each layer's `decay` keys: 'conv1.W', 'fc1.W')."""
        return {f"{layer.name}.{k}" for layer in self.param_layers() for k in layer.params if k in layer.decay}

    def load_buffers(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy arrays (same keys and shapes as `named_buffers`) into the model, keeping their dtype."""
        for layer in self.layers:
            for k, v in layer.buffers.items():
                v[...] = arrays[f"{layer.name}.{k}"]

    # ---- mode ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Sequential:
        """Training mode (batch statistics, dropout on) for every layer; `eval()` for evaluation mode."""
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self) -> Sequential:
        return self.train(False)

    def set_step(self, seed: int, epoch: int, batch: int) -> None:
        """Tell the layers which training step comes next (the run's seed, the 0-based epoch and batch), for
        layers that draw random numbers per step (dropout's mask): each layer with a `set_step(key)` hook gets
        key = (seed, epoch, batch, its index), so its draws depend on the position in the run alone (a resumed
        run repeats them) and not on the engine's micro-batches or threads."""
        for i, layer in enumerate(self.layers):
            hook = getattr(layer, "set_step", None)
            if hook is not None:
                hook((seed, epoch, batch, i))

    @property
    def training(self) -> bool:
        return all(layer.training for layer in self.layers)

    def load_params(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy arrays (same keys and shapes as `named_params`) into the model, keeping its dtype."""
        for layer in self.param_layers():
            for k, v in layer.params.items():
                v[...] = arrays[f"{layer.name}.{k}"]

    def astype(self, dtype: type) -> Sequential:
        """Convert every parameter (and gradient buffer) to `dtype` in place; returns self."""
        for layer in self.layers:
            for k in layer.params:
                layer.params[k] = layer.params[k].astype(dtype)
                layer.grads[k] = np.zeros_like(layer.params[k])
            for k in layer.buffers:
                layer.buffers[k] = layer.buffers[k].astype(dtype)
        return self

    @property
    def dtype(self) -> np.dtype:
        arrays = list(self.named_params().values()) or [np.zeros(0, np.float32)]
        return arrays[0].dtype

    # ---- passes -----------------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """X (N, *input_shape) -> logits z (N, classes)."""
        for layer in self.layers:
            x = contracts.forward(layer, x)  # the layer contract, checked on a user layer's first call
        return x

    def backward(self, dz: np.ndarray) -> np.ndarray | None:
        """δz (N, classes) -> δX (N, *input_shape), or None when the first layer skips it; fills grads."""
        d: np.ndarray | None = dz
        for layer in reversed(self.layers):
            assert d is not None
            d = contracts.backward(layer, d)
        return d

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> tuple[float, np.ndarray]:
        """One training pass layer by layer: forward, mean softmax cross-entropy (label smoothing ε = `smoothing`),
        backward; fills `named_grads()`.

        x (N, *input_shape), y (N,) integer labels -> (loss, logits z (N, classes)).
        """
        z = self.forward(x)
        loss, dz, _ = softmax_cross_entropy(z, y, smoothing)
        self.backward(dz)
        return loss, z

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Inference layer by layer in evaluation mode: X (N, *input_shape) -> logits z (N, classes). Each
        layer's mode is restored afterwards."""
        with self.evaluating():
            return self.forward(x)

    @contextmanager
    def evaluating(self) -> Iterator[Sequential]:
        """Every layer in evaluation mode inside the block; each layer's own mode is restored after it (also
        when the block raises)."""
        modes = [layer.training for layer in self.layers]
        self.eval()
        try:
            yield self
        finally:
            for layer, mode in zip(self.layers, modes, strict=True):
                layer.train(mode)

    def set_input_grad(self, needed: bool) -> None:
        """Whether the first layer computes δX (gradcheck wants it; training does not)."""
        self.layers[0].needs_input_grad = needed

    # ---- description ------------------------------------------------------------------------------
    def summary(self) -> list[LayerInfo]:
        rows, shape = [], self.input_shape
        for i, layer in enumerate(self.layers):
            out = layer.output_shape(shape)
            n_params = sum(int(v.size) for v in layer.params.values())
            n_buffers = sum(int(v.size) for v in layer.buffers.values())
            macs = layer.macs(shape)
            rows.append(LayerInfo(i, layer.name or layer.kind, layer.describe(), out, n_params, macs, n_buffers))
            shape = out
        return rows

    @property
    def output_shape(self) -> Shape:
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape


def build_model(cfg: Any, seed: int = 0, dtype: type = np.float32) -> Sequential:
    """Build the network of `cfg` (a `ModelConfig`: its `layers` and `input_shape`), inferring each layer's
    input size; parameters initialised from `seed`.

    Each entry's layer class comes from the registry (`cnncli/nn/registry.py`) by its `type`. Layers with
    parameters or buffers are named `<prefix><k>` (conv1, conv2, fc1, …) unless the config names them.
    Raises ConfigError naming the layer (`model.layers[i]`) when a layer does not fit its input.
    """
    rng = np.random.default_rng(seed)
    try:
        with param_budget(np.dtype(dtype).itemsize):
            layers, shape = build_layers(cfg.layers, tuple(cfg.input_shape), rng, dtype)
    except NestedLayerError as e:
        raise ConfigError(str(e)) from None
    if len(shape) != 1:
        raise ConfigError(
            f"model.layers: the network must end in a linear layer giving class scores, "
            f"but its output has shape {'×'.join(map(str, shape))}"
        )
    model = Sequential(layers, cfg.input_shape)
    model.set_input_grad(False)
    return model
