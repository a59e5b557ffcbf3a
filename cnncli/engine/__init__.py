"""The fused execution engine: the part a learner can skip. It takes a `Sequential` of `cnncli/nn/` and computes
the same functions as its per-layer path, several times faster (batch-minor tensors, fused conv → ReLU → pool
stages, blocked products, worker threads); `tests/engine/test_speed_equivalence.py` holds it to the reference.
`executor` holds the engine, `calibrate` measures the micro-batch sizes it uses on this machine.

    from cnncli import engine
    loss, z = engine.loss_and_grads(model, x, y)   # as model.loss_and_grads(x, y), fused; fills model's grads
    z = engine.predict(model, x)                   # as model.predict(x), fused
    engine.engine_for(model).threads = 2           # the model's engine: threads, micro-batch sizes, profile
"""

from __future__ import annotations

import weakref

import numpy as np

from cnncli.engine.executor import EVAL_MICRO_BATCH, TRAIN_MICRO_BATCH, Engine
from cnncli.nn.model import Sequential

__all__ = ["EVAL_MICRO_BATCH", "TRAIN_MICRO_BATCH", "Engine", "engine_for", "loss_and_grads", "predict"]

_ENGINES: weakref.WeakKeyDictionary[Sequential, Engine] = weakref.WeakKeyDictionary()


def engine_for(model: Sequential) -> Engine:
    """The engine of `model`: built on first use and kept while the model lives, built again when the model's
    list of layers or input shape changes. Its settings (`threads`, `train_micro_batch`, `eval_micro_batch`)
    stay with it."""
    key = (tuple(map(id, model.layers)), tuple(model.input_shape))
    eng = _ENGINES.get(model)
    if eng is None or eng.key != key:
        eng = Engine(model.layers, model.input_shape)
        _ENGINES[model] = eng
    return eng


def loss_and_grads(model: Sequential, x: np.ndarray, y: np.ndarray, smoothing: float = 0.0
                   ) -> tuple[float, np.ndarray]:
    """One training pass of `model` through the engine: x (N, *input_shape), y (N,) -> (mean loss, logits z
    (N, classes)); the gradients land in the model's layers' `grads`, as `model.loss_and_grads` puts them.
    `smoothing`: label smoothing ε of the cross-entropy's target (docs/derivations.md#label-smoothing)."""
    return engine_for(model).loss_and_grads(x, y, smoothing)


def predict(model: Sequential, x: np.ndarray) -> np.ndarray:
    """Inference of `model` in evaluation mode through the engine: X (N, *input_shape) -> logits z (N, classes),
    keeping nothing for a backward pass. Each layer's mode is restored afterwards."""
    with model.evaluating():
        return engine_for(model).predict(x)
