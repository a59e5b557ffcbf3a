"""GELU inside the engine's conv and batch-norm stages (`executor._gelu`), against the per-layer reference.

The reference is `GELU.forward` / `GELU.backward` (tests/nn/test_airbench_layers.py checks them against
`math.erf` and finite differences) inside `Sequential.forward` → `softmax_cross_entropy` → `backward`. The
fused stages must give the same loss, logits and gradients in every place a GELU can follow a conv or a
batch-norm (conv → GELU, conv → pool → GELU, conv → batch-norm → GELU, conv → batch-norm → pool → GELU,
pool → batch-norm → GELU, linear → batch-norm → GELU), in training and evaluation mode, in float64 and float32,
with the conv products in blocks of rows and the GELU in slabs smaller than a row; and a GELU where the engine
cannot fuse it (after a ReLU, after another GELU, after a linear layer) still runs its own, and a GELU before
a pool ends the conv's stage.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnncli import engine
from cnncli.config import build_config
from cnncli.engine import engine_for, executor
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import Sequential, build_model

GELU, BN, FLAT = {"type": "gelu"}, {"type": "batchnorm"}, {"type": "flatten"}


def _conv(c: int, k: int, p: int = 0, bias: bool = True) -> dict:
    return {"type": "conv", "out_channels": c, "kernel_size": k, "padding": p, "bias": bias}


def _pool(k: int) -> dict:
    return {"type": "maxpool", "kernel_size": k}


NETS: dict[str, tuple[list[int], list[dict]]] = {
    # every fused place: conv(+b) → GELU; conv → pool → BN → GELU (a batch-norm stage); conv → BN → GELU;
    # conv → BN → pool → GELU; conv → pool → GELU; linear → BN → GELU on vectors
    "fused": ([3, 12, 12], [
        _conv(4, 2), GELU,  # 12 → 11
        _conv(6, 3, 1, bias=False), _pool(2), BN, GELU,  # → 5
        _conv(6, 3, 1, bias=False), BN, GELU,
        _conv(5, 3, 1, bias=False), BN, _pool(2), GELU,  # → 2
        _conv(4, 1), _pool(2), GELU,  # → 1
        FLAT, {"type": "linear", "out_features": 6}, BN, GELU, {"type": "linear", "out_features": 3},
    ]),
    # a GELU before a pool (it ends the conv's stage; the pool is a stage of its own), and the places the engine
    # leaves a GELU to its own forward/backward: after a ReLU, after a GELU, after a linear layer
    "unfused": ([2, 9, 9], [
        _conv(3, 3, 1), GELU, _pool(2), _conv(4, 3, 1), {"type": "relu"}, GELU, GELU, FLAT,
        {"type": "linear", "out_features": 5}, GELU, {"type": "linear", "out_features": 3},
    ]),
}


BEFORE_BN = frozenset({"fc1.b"})  # "fused": the linear layer before the batch-norm on vectors keeps its bias


def _model(which: str, dtype: type = np.float64) -> Sequential:
    shape, layers = NETS[which]
    model = build_model(build_config({"model": {"input_shape": shape, "layers": layers}}).model, seed=0, dtype=dtype)
    rng = np.random.default_rng(3)
    for name, p in model.named_params().items():
        if name.endswith(".b") or name.endswith(".beta"):
            p[...] = 0.3 * rng.standard_normal(p.shape)  # GELU's kink region moves: biases must really be added
        elif name.endswith(".gamma"):
            p[...] = rng.uniform(0.5, 1.5, p.shape)
    for name, b in model.named_buffers().items():  # running statistics other than (0, 1)
        b[...] = rng.uniform(0.5, 2.0, b.shape) if name.endswith("var") else 0.3 * rng.standard_normal(b.shape)
    return model


def _passes(model: Sequential, n: int, dtype: type, threads: int = 2) -> tuple[tuple, tuple, np.ndarray]:
    """(reference, engine) each (loss, logits, grads) for one training pass, and the engine's evaluation logits
    against the reference's in the last slot's check."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, *model.input_shape)).astype(dtype)
    y = rng.integers(0, model.output_shape[0], size=n)
    saved = {k: v.copy() for k, v in model.named_buffers().items()}
    z = model.forward(x)
    loss, dz, _ = softmax_cross_entropy(z, y)
    model.backward(dz)
    ref = (loss, z, {k: v.copy() for k, v in model.named_grads().items()})
    model.load_buffers(saved)
    engine_for(model).threads = threads
    loss, z = engine.loss_and_grads(model, x, y)
    got = (loss, z, {k: v.copy() for k, v in model.named_grads().items()})
    return ref, got, x


def _assert_close(ref: tuple, got: tuple, rtol: float, zero: frozenset[str] = frozenset()) -> None:
    """Loss, logits and every gradient within rtol of the largest entry; the gradients in `zero` (a bias right
    before a batch-norm using batch statistics: the mean takes it away) only rounding noise on both paths."""
    (l0, z0, g0), (l1, z1, g1) = ref, got
    assert l1 == pytest.approx(l0, rel=rtol, abs=rtol)
    np.testing.assert_allclose(z1, z0, rtol=0, atol=rtol * max(1.0, float(np.abs(z0).max())))
    assert g1.keys() == g0.keys()
    for k in g0:
        if k in zero:
            w = float(np.abs(g0[k.replace(".b", ".W")]).max())
            assert max(float(np.abs(g0[k]).max()), float(np.abs(g1[k]).max())) <= 1e-5 * w, k
            continue
        scale = max(float(np.abs(g0[k]).max()), 1e-30)
        err = float(np.abs(g1[k] - g0[k]).max()) / scale
        assert err <= rtol, f"{k}: max error {err:.3g} of its largest entry"


def _stage_of_each_gelu(model: Sequential) -> list[str]:
    stages = executor._plan(model.layers, model.input_shape)
    return [type(s).__name__ for s in stages for layer in s.layers if layer.type_name == "gelu"]


def test_gelus_after_a_conv_or_a_batchnorm_run_inside_that_stage() -> None:
    assert _stage_of_each_gelu(_model("fused")) == ["_ConvStage", "_BatchNormStage", "_ConvStage", "_ConvStage",
                                                    "_ConvStage", "_BatchNormStage"]
    # conv → GELU → pool: the GELU ends the conv's stage and the pool, which does not commute with it, follows
    assert _stage_of_each_gelu(_model("unfused")) == ["_ConvStage"] + ["_LayerStage"] * 3
    model = _model("unfused")
    assert [type(s).__name__ for s in executor._plan(model.layers, model.input_shape)][:2] == ["_ConvStage",
                                                                                               "_PoolStage"]


def test_the_airbench_network_has_no_gelu_left_to_run_on_its_own() -> None:
    from cnncli.config import load_config

    model = build_model(load_config("airbench94").model, seed=0)
    assert _stage_of_each_gelu(model) == ["_ConvStage"] + ["_BatchNormStage", "_ConvStage"] * 3


@pytest.mark.parametrize("which", list(NETS))
@pytest.mark.parametrize("mode", ["batch_statistics", "running_statistics"])
def test_engine_matches_reference_in_float64(which: str, mode: str) -> None:
    model = _model(which)
    if mode == "running_statistics":
        model.eval()
    engine_for(model).train_micro_batch = 4  # micro-batches of 4, 4, 3 on two threads
    ref, got, x = _passes(model, 11, np.float64)
    _assert_close(ref, got, rtol=1e-10, zero=BEFORE_BN if (which, mode) == ("fused", "batch_statistics") else
                  frozenset())
    model.eval()
    expected = model.forward(x)
    np.testing.assert_allclose(engine.predict(model, x), expected, rtol=0,
                               atol=1e-10 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("which", list(NETS))
def test_engine_matches_reference_in_float32(which: str) -> None:
    model = _model(which, np.float32)
    engine_for(model).train_micro_batch = 8
    ref, got, _ = _passes(model, 24, np.float32)
    _assert_close(ref, got, rtol=3e-5, zero=BEFORE_BN if which == "fused" else frozenset())


def test_slabs_smaller_than_a_row_and_products_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """GELU_BLOCK of 5 elements: one row [c, h] per slab (the rows are longer), written into the strided inside
    of the next conv's padded input; conv products in blocks of 3 output rows. (The other tests' small arrays
    take several whole channels per slab.)"""
    monkeypatch.setattr(executor, "GELU_BLOCK", 5)
    monkeypatch.setattr(executor, "CONV_BLOCK_ROWS", 3)
    model = _model("fused")
    engine_for(model).train_micro_batch = 4
    ref, got, _ = _passes(model, 9, np.float64)
    _assert_close(ref, got, rtol=1e-10, zero=BEFORE_BN)


def test_slabs_cover_every_element_once() -> None:
    cases = (((3, 7, 5, 2), 1), ((3, 7, 5, 2), 25), ((3, 7, 5, 2), 150), ((3, 7, 5, 2), 10**6), ((9, 4), 7),
             ((9, 4), 8), ((9, 4), 3))
    for shape, limit in cases:
        seen = np.zeros(shape, dtype=int)
        for at in executor._slabs(shape, limit):
            seen[at] += 1
        assert (seen == 1).all(), (shape, limit)
