"""Backpropagation checks for a notebook: each one call, returning data (docs/python-api.md#checking-gradients).

- `network(config, seed=0, layers=())`: a config's network (a YAML path or a dict), float64, ready to check;
- `gradcheck(model, …)`: every parameter gradient and δX against finite differences, with the diagnosis
  and the layer at fault (`cnncli.gradcheck.Report`);
- `check_layer(layer, input_shape=None, …)`: one layer alone — a layer instance, or a type with options
  ('conv out_channels=4 kernel_size=3'), random parameters, inputs and upstream gradients
  (`cnncli.layercheck.LayerReport`);
- `forward_backward(model, x, y)`: the reference path on arrays: loss, logits, every gradient, δX;
- `trace(model, x, label)`: one image through the network in the article's notation (`cnncli.trace.Trace`).

Library code: returns data, never prints.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.host.errors import ConfigError


@dataclass(frozen=True)
class Pass:
    """`forward_backward`'s answer: the batch's mean loss, the logits z (N, K), each parameter's gradient by
    '<layer>.<key>' (each of its parameter's shape) and δX (N, *input_shape)."""

    loss: float
    logits: np.ndarray
    grads: dict[str, np.ndarray]
    dx: np.ndarray


def network(config: str | Path | dict, seed: int = 0, layers: Sequence[str | Path] = (),
            dtype: type = np.float64) -> Any:
    """The `Sequential` network a config describes (a YAML path, a built-in name or a dict), parameters drawn
    from `seed`, in `dtype` (float64: what the checks want). `layers`: files of your own layer classes."""
    from cnncli.config import build_config, load_config
    from cnncli.nn.model import build_model
    from cnncli.nn.registry import load_layer_file

    for f in layers:
        load_layer_file(f)
    cfg = build_config(config) if isinstance(config, dict) else load_config(config)
    return build_model(cfg.model, seed=seed, dtype=dtype)


def gradcheck(model: Any, **options: Any) -> Any:
    """`cnncli.gradcheck.gradcheck_report(model, **options)`: batch=4, eps=1e-3, tol=1e-6, seed=0,
    max_entries=200, x (N, *input_shape) and y (N,) optional, initial_params=False. Returns a Report:
    `.passed`, `.tensors` (one TensorCheck per tensor: `.status`, `.diagnosis`, `.worst`, …), `.at_fault`."""
    from cnncli.nn.gradcheck import gradcheck_report

    return gradcheck_report(model, **options)


def check_layer(layer: Any, input_shape: Sequence[int] | None = None, seed: int = 0, tol: float = 1e-6,
                eps: float = 1e-3) -> Any:
    """One layer alone (`cnn gradcheck --layer`): `layer` a type with options ('conv out_channels=4') — then
    several input shapes are tried, or `input_shape` (one example's, e.g. (3, 5, 7)) if given — or a layer
    instance built for `input_shape` (required then; copied for every case, its parameters redrawn). Returns
    a LayerReport: `.passed`, `.results` (per case and tensor: `.diagnosis`, `.worst`)."""
    from cnncli.nn.layercheck import check_layer as run
    from cnncli.run.lab import resolve

    if isinstance(layer, str):
        make, shapes, _ = resolve(layer, None)
        if input_shape is not None:
            shapes = [tuple(int(s) for s in input_shape)]
    else:
        if input_shape is None:
            raise ConfigError("check_layer: a layer instance needs input_shape, one example's shape it was built for")
        template = layer

        def make(shape: tuple[int, ...]) -> Any:
            return copy.deepcopy(template)

        shapes = [tuple(int(s) for s in input_shape)]
    return run(make, shapes, seed=seed, eps=eps, tol=tol)


def forward_backward(model: Any, x: np.ndarray, y: np.ndarray) -> Pass:
    """One pass through the per-layer reference path (each layer's own forward and backward, in the model's
    dtype and current mode): x (N, *input_shape), y (N,) integer labels -> Pass(loss, logits (N, K),
    grads {'conv1.W': (C_out, C_in, K, K), …}, dx (N, *input_shape)). The layer contract is checked."""
    from cnncli.nn.layers import softmax_cross_entropy

    x = np.asarray(x, dtype=model.dtype)
    first = model.layers[0].needs_input_grad
    model.set_input_grad(True)
    try:
        z = model.forward(x)
        loss, dz, _ = softmax_cross_entropy(z, np.asarray(y))
        dx = model.backward(dz)
    finally:
        model.set_input_grad(first)
    return Pass(float(loss), z, {k: np.array(v) for k, v in model.named_grads().items()}, np.asarray(dx))


def trace(model: Any, x: np.ndarray, label: int, **options: Any) -> Any:
    """`cnncli.trace.trace`: one image x (*input_shape) with its label through the network, every tensor
    under its name in the article's notation, each gradient checked (`.passed`, `t['dW1'].value`, …)."""
    from cnncli.nn.trace import trace as run

    return run(model, np.asarray(x), int(label), **options)
