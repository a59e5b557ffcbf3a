"""The fused engine (`engine.loss_and_grads(model, …)`, `engine.predict`) against the per-layer reference path.

The reference is `Sequential.forward` → `softmax_cross_entropy` → `Sequential.backward`, the classes of
`cnncli/nn/layers.py` that `tests/nn/test_layers.py` checks against naive loops. The engine must give the same loss,
logits and every gradient:

* in float64, to ~1e-12 (only the order of the sums differs);
* in float32, to float32 rounding;
* exactly, on inputs built so that every value is a small integer (then no sum rounds, whatever its order),
  full of max-pool ties and ReLU zeros: the engine must route ties as MaxPool2D does (first offset);

and the micro-batched, multi-threaded step must be bit-identical from run to run and whatever the number
of threads or the micro-batch split (to rounding for the split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnncli import engine
from cnncli.config import build_config, load_config
from cnncli.engine import engine_for, executor
from cnncli.host.blas import blas_info
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import Sequential, build_model

ROOT = Path(__file__).resolve().parents[2]

CONV = "conv"


def _conv(c: int, k: int, s: int = 1, p: int = 0) -> dict:
    return {"type": CONV, "out_channels": c, "kernel_size": k, "stride": s, "padding": p}


RELU, FLAT = {"type": "relu"}, {"type": "flatten"}


def _pool(k: int, s: int | None = None) -> dict:
    return {"type": "maxpool", "kernel_size": k, **({"stride": s} if s else {})}


def _fc(n: int) -> dict:
    return {"type": "linear", "out_features": n}


# Each: input shape and layers; between them they reach every code path of the engine.
CONFIGS: dict[str, tuple[list[int], list[dict]]] = {
    # conv stride 2 with padding, overlapping pool (3, stride 1), conv stride 3 needing δX, two linear layers
    "strided_overlap": (
        [3, 17, 13],
        [_conv(5, 5, 2, 2), RELU, _pool(3, 1), _conv(7, 2, 3), RELU, FLAT, _fc(12), RELU, _fc(4)],
    ),
    # odd sizes: the pool drops a row and a column; no ReLU; grey non-square input
    "odd_sizes_no_relu": ([1, 9, 20], [_conv(2, 3), _pool(2), FLAT, _fc(3)]),
    # no pooling at all; a ReLU after the flatten; stride-2 conv needing δX
    "no_pool": ([3, 12, 11], [_conv(4, 3, 1, 1), RELU, _conv(6, 3, 2, 0), FLAT, RELU, _fc(8), RELU, _fc(5)]),
    # stride-1 conv with pool needing δX (the correlation δX) in both window layouts, pool stride > kernel;
    # the first two convs have few input channels: one product per pool window (patches), the second needing δX
    "pitch_paths": (
        [2, 15, 14],
        [_conv(3, 3, 1, 1), RELU, _pool(2), _conv(4, 3, 1, 1), _pool(2, 3), RELU, _conv(3, 2, 1, 1), _pool(3, 2),
         RELU, FLAT, _fc(6)],
    ),
    # stride-2 conv with non-overlapping pool needing δX (the scatter δX, window-ordered columns)
    "strided_blocked": ([2, 16, 16], [_conv(3, 3), RELU, _pool(2), _conv(4, 3, 2, 1), RELU, _pool(2), FLAT, _fc(3)]),
    # layers with nothing to fuse with: a ReLU first, a pool after a pool, ReLU before and after a pool
    "unfused": ([2, 12, 12], [RELU, _conv(3, 3), _pool(2, 1), RELU, _pool(2), RELU, FLAT, _fc(4)]),
    # a pool first, and a network that ends in a flatten (the conv gives the class scores)
    "pool_first_conv_last": ([3, 10, 10], [_pool(2), _conv(4, 3, 1, 1), RELU, _conv(2, 5), FLAT]),
    # stride 1 with padding ≥ K needing δX (the scatter δX; the correlation needs p ≤ K − 1), and p = 0
    "wide_padding": ([2, 7, 7], [_conv(3, 3, 1, 1), RELU, _conv(4, 2, 1, 2), RELU, _pool(2), _conv(3, 2), FLAT,
                                 _fc(3)]),
    # a plain MLP: flatten first, then a ReLU with nothing before it
    "mlp": ([2, 5, 4], [FLAT, RELU, _fc(7), RELU, RELU, _fc(3)]),
}
SHIPPED = {"seed": ROOT / "configs" / "seed.yaml", "diagram": ROOT / "configs" / "seed-diagram.yaml"}
ALL = [*SHIPPED, *CONFIGS]


def _model(which: str, dtype: type = np.float32, seed: int = 0) -> Sequential:
    if which in SHIPPED:
        cfg = load_config(SHIPPED[which]).model
    else:
        shape, layers = CONFIGS[which]
        cfg = build_config({"model": {"input_shape": shape, "layers": layers}}).model
    model = build_model(cfg, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_params().items():  # non-zero biases: the engine adds them after the pool
        if name.endswith(".b"):
            p[...] = 0.1 * rng.standard_normal(p.shape)
    return model


def _batch(model: Sequential, n: int, dtype: type = np.float32, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *model.input_shape)).astype(dtype)
    y = rng.integers(0, model.output_shape[0], size=n)
    return x, y


def _reference(model: Sequential, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, dict]:
    z = model.forward(x)
    loss, dz, _ = softmax_cross_entropy(z, y)
    model.backward(dz)
    return loss, z, {k: v.copy() for k, v in model.named_grads().items()}


def _fast(model: Sequential, x: np.ndarray, y: np.ndarray, threads: int | None = None,
          micro_batch: int | None = None) -> tuple[float, np.ndarray, dict]:
    engine_for(model).threads = threads
    if micro_batch is not None:
        engine_for(model).train_micro_batch = micro_batch
    loss, z = engine.loss_and_grads(model, x, y)
    return loss, z, {k: v.copy() for k, v in model.named_grads().items()}


def _assert_close(ref: tuple, got: tuple, rtol: float) -> None:
    """Loss relative; logits and each gradient relative to the tensor's largest entry (sums of many terms)."""
    (l0, z0, g0), (l1, z1, g1) = ref, got
    assert l1 == pytest.approx(l0, rel=rtol, abs=rtol)
    assert z1.shape == z0.shape and z1.dtype == z0.dtype
    np.testing.assert_allclose(z1, z0, rtol=0, atol=rtol * max(1.0, float(np.abs(z0).max())))
    assert g1.keys() == g0.keys()
    for k in g0:
        assert g1[k].shape == g0[k].shape and g1[k].dtype == g0[k].dtype, k
        scale = max(float(np.abs(g0[k]).max()), 1e-30)
        err = float(np.abs(g1[k] - g0[k]).max()) / scale
        assert err <= rtol, f"{k}: max error {err:.3g} of its largest entry"


@pytest.mark.parametrize("which", ALL)
def test_engine_matches_reference_in_float64(which: str) -> None:
    model = _model(which, np.float64)
    x, y = _batch(model, 11, np.float64)
    engine_for(model).train_micro_batch = 4  # micro-batches of 4, 4, 3 on two threads
    _assert_close(_reference(model, x, y), _fast(model, x, y, threads=2), rtol=1e-10)


@pytest.mark.parametrize("which", ALL)
def test_engine_matches_reference_in_float32(which: str) -> None:
    model = _model(which)
    x, y = _batch(model, 24)
    ref = _reference(model, x, y)
    _assert_close(ref, _fast(model, x, y, threads=2, micro_batch=8), rtol=2e-5)
    scale = max(1.0, float(np.abs(ref[1]).max()))
    np.testing.assert_allclose(engine.predict(model, x), ref[1], rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("which", ALL)
def test_exact_on_integer_data_full_of_ties(which: str) -> None:
    """Pixels in {0, 1, 2}, weights in {−1, 0, 1}/8, biases in {−1, 0, 1}/4: every sum is exact in float64,
    so the two paths must agree exactly apart from the softmax, and ties (equal window entries, ReLU zeros)
    are everywhere. A tie routed to another offset would change δW and δX by whole units."""
    model = _model(which, np.float64)
    rng = np.random.default_rng(7)
    for name, p in model.named_params().items():
        p[...] = rng.integers(-1, 2, size=p.shape) / (4.0 if name.endswith(".b") else 8.0)
    x = rng.integers(0, 3, size=(9, *model.input_shape)).astype(np.float64)
    y = rng.integers(0, model.output_shape[0], size=9)
    engine_for(model).train_micro_batch = 4
    ref, got = _reference(model, x, y), _fast(model, x, y, threads=2)
    np.testing.assert_array_equal(got[1], ref[1])  # logits: exact
    _assert_close(ref, got, rtol=1e-12)


@pytest.mark.parametrize("which", ["seed", "diagram", "strided_overlap"])
def test_threaded_step_is_bit_identical_run_to_run_and_across_threads(which: str) -> None:
    model = _model(which)
    x, y = _batch(model, 70)  # micro-batches of 24, 23, 23
    engine_for(model).train_micro_batch = 24
    runs = [_fast(model, x, y, threads=t) for t in (2, 2, 1, 3)]
    exact = blas_info()["controllable"]  # BLAS one thread per worker: the same products whatever the split
    for loss, z, grads in runs[1:] if exact else runs[1:2]:
        assert loss == runs[0][0]
        np.testing.assert_array_equal(z, runs[0][1])
        for k in grads:
            np.testing.assert_array_equal(grads[k], runs[0][2][k], err_msg=k)
    _assert_close(runs[0], runs[2], rtol=2e-5)  # single thread, to rounding in any case


@pytest.mark.parametrize("which", ["seed", "pitch_paths"])
def test_micro_batch_split_changes_only_rounding(which: str) -> None:
    model = _model(which)
    x, y = _batch(model, 30)
    whole = _fast(model, x, y, threads=1, micro_batch=30)
    for mb in (1, 7, 16):
        _assert_close(whole, _fast(model, x, y, threads=2, micro_batch=mb), rtol=2e-5)


def test_training_steps_are_deterministic_and_follow_the_reference() -> None:
    """Three SGD steps: two fresh fast runs end bit-identical; the reference run ends within rounding."""
    from cnncli.run.optim import make_optimizer

    cfg = load_config(SHIPPED["diagram"])

    def train(fast: bool) -> dict[str, np.ndarray]:
        model = build_model(cfg.model, seed=3)
        params = model.named_params()
        opt = make_optimizer(params, cfg.train.optimizer)
        for step in range(3):
            x, y = _batch(model, 40, seed=step)
            if fast:
                engine.loss_and_grads(model, x, y)
            else:
                model.loss_and_grads(x, y)
            opt.step(params, model.named_grads(), 0.05)
        return {k: v.copy() for k, v in params.items()}

    a, b, ref = train(True), train(True), train(False)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_allclose(a[k], ref[k], rtol=0, atol=1e-5 * float(np.abs(ref[k]).max()), err_msg=k)


def test_engine_follows_parameter_changes_dtype_and_layers() -> None:
    model = _model("seed")
    x, y = _batch(model, 8)
    engine.loss_and_grads(model, x, y)
    other = _model("seed", seed=5)
    model.load_params(other.named_params())  # in place: the engine reads the live arrays
    _assert_close(_reference(other, x, y), _fast(model, x, y), rtol=2e-5)
    model.astype(np.float64)  # new arrays and dtype: the engine's buffers follow
    loss, z = engine.loss_and_grads(model, x.astype(np.float64), y)
    assert z.dtype == np.float64 and model.named_grads()["conv1.W"].dtype == np.float64
    model.layers = model.layers[3:]  # a different network (flatten → fc1 needs 4096 inputs)
    model.input_shape = (16, 16, 16)
    h = np.random.default_rng(0).standard_normal((5, 16, 16, 16))
    np.testing.assert_allclose(engine.predict(model, h), model.forward(h), rtol=1e-12, atol=1e-12)


def test_plain_layer_state_still_works_for_gradcheck() -> None:
    """`forward` stays the per-layer path: ReLU._mask and MaxPool2D._argmax are set as gradcheck expects."""
    from cnncli.nn.layers import MaxPool2D, ReLU

    model = _model("seed")
    x, y = _batch(model, 3)
    engine.loss_and_grads(model, x, y)
    model.forward(x)
    relu = next(layer for layer in model.layers if isinstance(layer, ReLU))
    pool = next(layer for layer in model.layers if isinstance(layer, MaxPool2D))
    assert relu._mask is not None and relu._mask.shape == (3, 16, 32, 32) and relu._mask.dtype == bool
    assert pool._argmax is not None and pool._argmax.shape == (3, 16, 16, 16) and pool._argmax.dtype == np.uint8


def test_the_models_own_passes_are_the_per_layer_reference_exactly() -> None:
    model = _model("seed")
    x, y = _batch(model, 5)
    loss, z = model.loss_and_grads(x, y)
    ref = _reference(_model("seed"), x, y)
    assert loss == ref[0]
    np.testing.assert_array_equal(z, ref[1])
    np.testing.assert_array_equal(model.predict(x), ref[1])


BN_CONV = [{**_conv(4, 3, 1, 1), "bias": False}, {"type": "batchnorm"}, RELU, _pool(2), _conv(5, 3, 1, 1),
           {"type": "batchnorm"}, RELU, FLAT, _fc(3)]  # conv2's bias: only its forward matters (δb is ~0)


@pytest.mark.parametrize("which", [*ALL, "batchnorm"])
def test_products_in_blocks_of_rows_match_the_reference(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped networks' small convs run as one product per micro-batch; bigger ones in blocks of a few
    output rows (engine.CONV_BLOCK_*). Blocks of 3 rows here: 8 output rows split 3, 3, 2, 7 split 3, 3, 1
    (two sizes of block buffers in evaluation), every window layout, the correlation and scatter δX,
    batch-norm folded into the conv for evaluation and batch statistics for training."""
    monkeypatch.setattr(executor, "CONV_BLOCK_ROWS", 3)
    if which == "batchnorm":
        cfg = build_config({"model": {"input_shape": [3, 8, 8], "layers": BN_CONV}}).model
        model = build_model(cfg, seed=0, dtype=np.float64)
        rng = np.random.default_rng(5)
        for name, b in model.named_buffers().items():  # running statistics other than (0, 1)
            b[...] = rng.uniform(0.5, 2.0, b.shape) if name.endswith("var") else rng.standard_normal(b.shape)
    else:
        model = _model(which, np.float64)
    x, y = _batch(model, 19, np.float64)
    engine_for(model).train_micro_batch = 8
    engine_for(model).eval_micro_batch = 8
    if which == "batchnorm":
        model.train()
    ref, got = _reference(model, x, y), _fast(model, x, y, threads=2)
    if which == "batchnorm":  # a bias before a batch-norm gets a zero gradient: both paths give rounding noise
        assert abs(ref[2].pop("conv2.b")).max() < 1e-12 and abs(got[2].pop("conv2.b")).max() < 1e-12
    _assert_close(ref, got, rtol=1e-10)
    model.eval()
    expected = model.forward(x)  # the per-layer path (running statistics in evaluation)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(engine.predict(model, x), expected, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("gammas", ["positive", "one_negative", "one_zero"])
@pytest.mark.parametrize("mode", ["batch_statistics", "running_statistics"])
def test_batchnorm_pooled_before_its_affine_map_matches_the_reference(gammas: str, mode: str) -> None:
    """With every γ > 0 a conv → batch-norm → ReLU → pool stage pools x − μ and maps only the pooled values
    (y rises with x − μ); a γ ≤ 0 anywhere takes the path through y. Random γ, β (β shifts the ReLU's kink,
    so the affine map must really be applied after the pool), both paths, both batch-norm modes."""
    cfg = build_config({"model": {"input_shape": [3, 8, 8], "layers": BN_CONV}}).model
    model = build_model(cfg, seed=0, dtype=np.float64)
    rng = np.random.default_rng(11)
    params = model.named_params()
    for name, v in params.items():
        if name.endswith("gamma"):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
            if gammas != "positive":
                v[1] = -v[1] if gammas == "one_negative" else 0.0
        elif name.endswith("beta"):
            v[...] = rng.standard_normal(v.shape)
    for name, b in model.named_buffers().items():
        b[...] = rng.uniform(0.5, 2.0, b.shape) if name.endswith("var") else 0.3 * rng.standard_normal(b.shape)
    if mode == "running_statistics":
        model.eval()
    x, y = _batch(model, 12, np.float64)
    saved = {k: v.copy() for k, v in model.named_buffers().items()}
    ref = _reference(model, x, y)
    model.load_buffers(saved)
    got = _fast(model, x, y, threads=2)
    if mode == "batch_statistics":  # a bias before a batch-norm: a zero gradient, rounding noise on both paths
        assert abs(ref[2].pop("conv2.b")).max() < 1e-12 and abs(got[2].pop("conv2.b")).max() < 1e-12
    _assert_close(ref, got, rtol=1e-10)


def test_every_option_of_a_layer_type_the_engine_computes_is_one_it_handles() -> None:
    """A fused layer type (and batch-norm) that gains an option the engine's stages do not know would be
    computed without it, silently: the engine lists what it handles, and the two lists must agree."""
    import dataclasses

    from cnncli.nn.layers import BatchNorm
    from cnncli.nn.layers_extra import GELU

    assert set(executor.HANDLED_OPTIONS) == {*executor._FUSED, BatchNorm, GELU}
    for cls, handled in executor.HANDLED_OPTIONS.items():
        declared = {f.name for f in dataclasses.fields(cls.Options)} - {"type", "name"}
        assert declared == handled, f"{cls.__name__}: options {sorted(declared ^ handled)} differ from the engine's"
