"""The layers of issue 10 beside batch-norm: global average pooling, dropout, leaky ReLU, tanh, sigmoid and the
residual block, each against naive loops written straight from the sums of docs/derivations.md (not from
cnncli/nn/layers.py), the docs' worked examples, float64 finite differences (≤ 1e-7), the engine against the
per-layer reference on networks that mix every layer type (training and evaluation mode), checkpoints, and the
one-line config errors.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from cnncli import engine
from cnncli.config import apply_overrides, build_config
from cnncli.engine import engine_for
from cnncli.host.errors import ConfigError
from cnncli.nn.gradcheck import gradcheck
from cnncli.nn.layers import Dropout, GlobalAvgPool2D, LeakyReLU, Sigmoid, Tanh
from cnncli.nn.model import build_model
from cnncli.nn.residual import Residual
from cnncli.run.checkpoint import apply_params, load_checkpoint, save_checkpoint
from cnncli.run.optim import make_optimizer


def _cfg(input_shape, layers, seed=0):
    return build_config({"seed": seed, "model": {"input_shape": list(input_shape), "layers": layers}})


def _model(input_shape, layers, seed=0, dtype=np.float64):
    return build_model(_cfg(input_shape, layers, seed).model, seed=seed, dtype=dtype)


# ------------------------------------------------------------------------------- naive loops from the docs


def _each(shape):
    """Every index of an array of `shape`, in C order."""
    return np.ndindex(*shape)


def test_global_average_pooling_equals_the_naive_sum_and_the_docs_example() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5))
    layer = GlobalAvgPool2D()
    g = layer.forward(x)
    want = np.zeros((2, 3))
    for n, c in _each((2, 3)):  # g[n,c] = 1/(HW) Σ_{i,j} x[n,c,i,j]
        want[n, c] = sum(x[n, c, i, j] for i in range(4) for j in range(5)) / 20
    np.testing.assert_allclose(g, want, rtol=1e-13)
    dg = rng.standard_normal((2, 3))
    dx = layer.backward(dg)
    want_dx = np.zeros_like(x)
    for n, c, i, j in _each(x.shape):  # δx[n,c,i,j] = δg[n,c] / (HW)
        want_dx[n, c, i, j] = dg[n, c] / 20
    np.testing.assert_allclose(dx, want_dx, rtol=1e-13)
    # docs: a 3×3 map 1…9 has mean 5; with δg = 1 each entry gets 1/9
    nine = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    assert layer.forward(nine)[0, 0] == 5.0
    np.testing.assert_allclose(layer.backward(np.ones((1, 1))), np.full((1, 1, 3, 3), 1 / 9))
    assert layer.output_shape((16, 8, 8)) == (16,) and layer.macs((16, 8, 8)) == 16 * 64


def test_dropout_is_the_docs_scaling_with_a_bernoulli_mask_and_the_identity_in_evaluation() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 5, 5))
    layer = Dropout(p=0.3)
    layer.set_step((7, 1, 2, 0))
    y = layer.forward(x)
    m = layer.piece()
    assert m is not None and m.dtype == bool and m.shape == x.shape
    want = np.zeros_like(x)
    for idx in _each(x.shape):  # y = x · m / (1 − p)
        want[idx] = x[idx] * m[idx] / (1 - 0.3)
    np.testing.assert_allclose(y, want, rtol=1e-15)
    dy = rng.standard_normal(x.shape)
    want_dx = np.zeros_like(x)
    for idx in _each(x.shape):  # δx = δy · m / (1 − p)
        want_dx[idx] = dy[idx] * m[idx] / (1 - 0.3)
    np.testing.assert_allclose(layer.backward(dy), want_dx, rtol=1e-15)
    # docs' example: p = 0.5, x = (1, 2, 3, 4), m = (1, 0, 1, 1) -> y = (2, 0, 6, 8), δx = (2, 0, 2, 2)
    half = Dropout(p=0.5)
    out, crossed = half.forward_on_piece(np.array([[1.0, 2, 3, 4]]), np.array([[True, False, True, True]]))
    assert out.tolist() == [[2, 0, 6, 8]] and not crossed
    assert half.backward(np.ones((1, 4))).tolist() == [[2, 0, 2, 2]]
    layer.eval()
    assert layer.forward(x) is x and layer.piece() is None and layer.backward(dy) is dy and not layer.couples_batch()


def test_the_dropout_mask_keeps_1_minus_p_and_is_a_function_of_the_step_alone() -> None:
    layer = Dropout(p=0.25)
    layer.set_step((0, 3, 5, 2))
    big = layer.mask_for((200, 1000))
    kept = big.mean()
    assert abs(kept - 0.75) < 4 * math.sqrt(0.75 * 0.25 / big.size)  # Bernoulli(1 − p), four standard errors
    x = np.ones((6, 50))
    a = layer.forward(x)
    assert np.array_equal(layer.forward(x), a), "the same step gives the same mask"
    twin = copy.copy(layer)  # the engine's per-worker copies share the key: a later set_step reaches them
    layer.set_step((0, 3, 6, 2))
    b = layer.forward(x)
    assert not np.array_equal(a, b), "the next batch draws another mask"
    assert np.array_equal(twin.forward(x), b)
    layer.set_step((1, 3, 5, 2))
    assert not np.array_equal(layer.forward(x), a), "another seed draws another mask"
    assert Dropout(p=0.0).forward(x).tolist() == x.tolist()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(p=1.0)


def test_model_set_step_gives_each_dropout_its_own_key_from_seed_epoch_batch_and_position() -> None:
    layers = [{"type": "dropout"}, {"type": "residual", "layers": [{"type": "relu"}, {"type": "dropout"}]},
              {"type": "flatten"}, {"type": "linear", "out_features": 2}]
    model = _model((4, 3, 3), layers)
    model.set_step(11, 2, 9)
    top, block = model.layers[0], model.layers[1]
    assert top._key[0] == (11, 2, 9, 0)
    assert block.children[1]._key[0] == (11, 2, 9, 1, 1)  # block at index 1, its layer 1
    x = np.ones((3, 4, 3, 3))
    assert not np.array_equal(top.forward(x), block.children[1].forward(x)), "two dropouts, two masks"


def test_leaky_relu_equals_the_naive_rule_and_the_docs_example() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 5))
    x[0, 0, :3] = 0.0  # the kink: slope α at exactly 0
    layer = LeakyReLU(slope=0.2)
    y = layer.forward(x)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    for idx in _each(x.shape):  # y = x·1(x > 0) + αx·1(x ≤ 0); δx = δy·(1(x > 0) + α·1(x ≤ 0))
        v = x[idx]
        assert y[idx] == (v if v > 0 else 0.2 * v)
        assert dx[idx] == pytest.approx(dy[idx] * (1.0 if v > 0 else 0.2), rel=1e-15)
    docs = LeakyReLU(slope=0.1)
    out = docs.forward(np.array([[-2.0, -0.5, 0.0, 1.5]]))
    np.testing.assert_allclose(out, [[-0.2, -0.05, 0.0, 1.5]], rtol=1e-15)
    np.testing.assert_allclose(docs.backward(np.ones((1, 4))), [[0.1, 0.1, 0.1, 1.0]], rtol=1e-15)
    mask = docs.piece()
    moved, crossed = docs.forward_on_piece(np.array([[-2.0, 0.5, 0.0, 1.5]]), mask)
    assert crossed and moved[0, 1] == pytest.approx(0.05), "held on the old piece: slope α at the crossed entry"


def test_tanh_and_sigmoid_equal_math_and_the_docs_slopes() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4)) * 3
    dy = rng.standard_normal(x.shape)
    t, s = Tanh(), Sigmoid()
    yt, ys = t.forward(x), s.forward(x)
    dxt, dxs = t.backward(dy), s.backward(dy)
    for idx in _each(x.shape):
        v = float(x[idx])
        assert yt[idx] == pytest.approx(math.tanh(v), rel=1e-14)
        assert dxt[idx] == pytest.approx(dy[idx] * (1 - math.tanh(v) ** 2), rel=1e-12, abs=1e-15)
        sig = 1 / (1 + math.exp(-v))
        assert ys[idx] == pytest.approx(sig, rel=1e-14)
        assert dxs[idx] == pytest.approx(dy[idx] * math.exp(-v) / (1 + math.exp(-v)) ** 2, rel=1e-12)
    # the docs' slopes: tanh 0.786 at 0.5, 0.0707 at 2; sigmoid 1/4 at 0, 0.105 at 2, 0.0066 at 5
    t.forward(np.array([[0.5, 2.0]]))
    np.testing.assert_allclose(t.backward(np.ones((1, 2))), [[0.786, 0.0707]], rtol=2e-3)
    s.forward(np.array([[0.0, 2.0, 5.0]]))
    np.testing.assert_allclose(s.backward(np.ones((1, 3))), [[0.25, 0.105, 0.0066]], rtol=1e-2)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # stable: e^(−|x|) never overflows
        far = s.forward(np.array([[-800.0, 800.0]]))
    assert far.tolist() == [[0.0, 1.0]]
    assert t.piece() is None and s.piece() is None  # smooth


# ------------------------------------------------------------------------------------ the residual block


def _conv_naive(x, w, stride, pad):
    """S[n,c,i,j] = Σ_{c',u,v} W[c,c',u,v] · X[n,c', s·i+u−pad, s·j+v−pad] (zeros outside), no bias."""
    n, c_in, h, wd = x.shape
    c_out, _, k, _ = w.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, c_out, ho, wo))
    for b, c, i, j in _each(out.shape):
        total = 0.0
        for cp, u, v in _each((c_in, k, k)):
            r, q = stride * i + u - pad, stride * j + v - pad
            if 0 <= r < h and 0 <= q < wd:
                total += w[c, cp, u, v] * x[b, cp, r, q]
        out[b, c, i, j] = total
    return out


def _conv_naive_backward(x, w, ds, stride, pad):
    """δW[c,c',u,v] = Σ_{n,i,j} δS[n,c,i,j] X[n,c',s·i+u−pad, s·j+v−pad]; δX the same sum scattered back."""
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    k = w.shape[2]
    for b, c, i, j in _each(ds.shape):
        for cp, u, v in _each((x.shape[1], k, k)):
            r, q = stride * i + u - pad, stride * j + v - pad
            if 0 <= r < x.shape[2] and 0 <= q < x.shape[3]:
                dw[c, cp, u, v] += ds[b, c, i, j] * x[b, cp, r, q]
                dx[b, cp, r, q] += w[c, cp, u, v] * ds[b, c, i, j]
    return dx, dw


@pytest.mark.parametrize("projection", [False, True])
def test_residual_block_is_x_plus_F_and_its_backward_sums_both_paths(projection: bool) -> None:
    """F = conv 3×3 (pad 1, stride s) → relu, by naive loops; the shortcut x, or the 1×1 conv of stride s."""
    stride, c_out = (2, 3) if projection else (1, 2)
    layers = [{"type": "residual", "projection": projection, "layers": [
        {"type": "conv", "out_channels": c_out, "kernel_size": 3, "padding": 1, "stride": stride, "bias": False},
        {"type": "relu"}]}, {"type": "flatten"}, {"type": "linear", "out_features": 2}]
    model = _model((2, 5, 5), layers)
    model.set_input_grad(True)  # a first layer skips δX otherwise
    block = model.layers[0]
    assert isinstance(block, Residual) and block.name == "res1"
    assert set(block.params) == ({"conv1.W", "shortcut.W"} if projection else {"conv1.W"})
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 5, 5))
    w = block.params["conv1.W"]
    s = _conv_naive(x, w, stride, 1)
    f = s * (s > 0)
    short = _conv_naive(x, block.params["shortcut.W"], stride, 0) if projection else x
    y = block.forward(x)
    np.testing.assert_allclose(y, short + f, rtol=1e-12, atol=1e-13)
    dy = rng.standard_normal(y.shape)
    dx = block.backward(dy)
    ds = dy * (s > 0)
    dx_f, dw = _conv_naive_backward(x, w, ds, stride, 1)
    if projection:
        dx_short, dw_short = _conv_naive_backward(x, block.params["shortcut.W"], dy, stride, 0)
        np.testing.assert_allclose(block.grads["shortcut.W"], dw_short, rtol=1e-12, atol=1e-13)
    else:
        dx_short = dy
    np.testing.assert_allclose(dx, dx_short + dx_f, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(block.grads["conv1.W"], dw, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(block.paths[0], dx_short, rtol=1e-12, atol=1e-13)  # what cnn trace shows
    np.testing.assert_allclose(block.paths[1], dx_f, rtol=1e-12, atol=1e-13)
    # summary: parameters and multiply-adds of the children and the projection, counted here
    ho = (5 + 2 - 3) // stride + 1
    macs = c_out * ho * ho * 2 * 9 + (c_out * ho * ho * 2 if projection else 0)
    row = model.summary()[0]
    assert (row.params, row.macs, row.output_shape) == (c_out * 2 * 9 + (c_out * 2 if projection else 0), macs,
                                                         (c_out, ho, ho))


def test_residual_state_is_the_childrens_live_arrays_through_astype_and_the_optimizer() -> None:
    layers = [{"type": "residual", "layers": [{"type": "conv", "out_channels": 2, "kernel_size": 3, "padding": 1},
                                              {"type": "batchnorm"}, {"type": "relu"}]},
              {"type": "flatten"}, {"type": "linear", "out_features": 3}]
    model = _model((2, 4, 4), layers, dtype=np.float32)
    block = model.layers[0]
    conv, bn = block.children[0], block.children[1]
    assert set(model.named_params()) == {"res1.conv1.W", "res1.conv1.b", "res1.bn1.gamma", "res1.bn1.beta",
                                         "fc1.W", "fc1.b"}
    assert set(model.named_buffers()) == {"res1.bn1.running_mean", "res1.bn1.running_var"}
    assert model.decayed() == {"res1.conv1.W", "fc1.W"}  # γ, β and biases are not decayed
    model.astype(np.float64)
    assert conv.params["W"].dtype == np.float64 and bn.buffers["running_var"].dtype == np.float64
    assert model.named_params()["res1.conv1.W"] is conv.params["W"]
    assert model.named_buffers()["res1.bn1.running_mean"] is bn.buffers["running_mean"]
    params = model.named_params()
    opt = make_optimizer(params, _cfg((2, 4, 4), layers).train.optimizer, model.decayed())
    before = conv.params["W"].copy()
    engine.loss_and_grads(model, np.random.default_rng(0).standard_normal((6, 2, 4, 4)), np.arange(6) % 3)
    assert model.named_grads()["res1.conv1.W"] is conv.grads["W"]
    opt.step(params, model.named_grads(), 0.1)
    assert not np.array_equal(conv.params["W"], before), "the optimizer moved the child's own array"
    model.eval()
    assert not conv.training and not bn.training and not block.couples_batch()
    model.train()
    assert bn.training and block.couples_batch(), "batch-norm in training couples the batch"


def test_residual_piece_holds_the_masks_inside_the_block() -> None:
    block = _model((1, 1, 4), [{"type": "residual", "layers": [{"type": "relu"}]}, {"type": "flatten"},
                               {"type": "linear", "out_features": 2}]).layers[0]
    x = np.array([[[[1.0, -1.0, 2.0, -3.0]]]])
    np.testing.assert_array_equal(block.forward(x), [[[[2.0, -1.0, 4.0, -3.0]]]])  # x + relu(x)
    piece = block.piece()
    assert isinstance(piece, list) and piece[0].tolist() == [[[[True, False, True, False]]]]
    flipped = np.array([[[[1.0, 0.5, 2.0, -3.0]]]])
    out, crossed = block.forward_on_piece(flipped, piece)
    assert crossed and out[0, 0, 0, 1] == 0.5, "the old mask stops relu(0.5): only the shortcut passes"
    smooth = _model((1, 1, 4), [{"type": "residual", "layers": [{"type": "tanh"}]}, {"type": "flatten"},
                                {"type": "linear", "out_features": 2}]).layers[0]
    smooth.forward(x)
    assert smooth.piece() is None


# -------------------------------------------------------------------------------------- whole networks

ALL_A = [  # conv, batchnorm, relu, maxpool, residual (projection), leakyrelu, dropout, avgpool, tanh, flatten,
    # linear, sigmoid
    {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "kernel_size": 2},
    {"type": "residual", "projection": True, "layers": [
        {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1, "stride": 2, "bias": False},
        {"type": "batchnorm"}, {"type": "leakyrelu", "slope": 0.1},
        {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}]},
    {"type": "dropout", "p": 0.3}, {"type": "avgpool", "kernel_size": 2}, {"type": "tanh"},
    {"type": "flatten"}, {"type": "linear", "out_features": 8}, {"type": "sigmoid"},
    {"type": "linear", "out_features": 5},
]
ALL_B = [  # nested residuals, dropout inside a block, globalavgpool, batch-norm of vectors
    {"type": "conv", "out_channels": 3, "kernel_size": 3, "padding": 1}, {"type": "leakyrelu"},
    {"type": "residual", "layers": [
        {"type": "residual", "layers": [{"type": "conv", "out_channels": 3, "kernel_size": 3, "padding": 1},
                                        {"type": "relu"}]},
        {"type": "dropout", "p": 0.2}, {"type": "conv", "out_channels": 3, "kernel_size": 1, "bias": False},
        {"type": "batchnorm"}]},
    {"type": "sigmoid"}, {"type": "maxpool", "kernel_size": 2}, {"type": "globalavgpool"},
    {"type": "batchnorm"}, {"type": "tanh"}, {"type": "dropout", "p": 0.5}, {"type": "linear", "out_features": 5},
]


@pytest.mark.parametrize("layers", [ALL_A, ALL_B], ids=["A", "B"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_of_networks_mixing_every_layer_is_below_1e_7(layers, mode: str) -> None:
    model = _model((2, 8, 8), layers)
    getattr(model, mode)()
    # (a conv bias right before a batch-norm in training has gradient 0: its relative error would be noise, so
    # the convs before a batch-norm have bias: false, as they should)
    # at the initial parameters (initial_params=True): the bound 1e-7 is for this fixed point; drawn at random,
    # an entry of |δ| ≈ 2e-7 lands at 4e-7 from the difference's rounding, still far below the default tol 1e-6
    results = gradcheck(model, batch=4, max_entries=25, initial_params=True)
    names = {r.name for r in results}
    if layers is ALL_A:
        assert {"res1.conv1.W", "res1.bn1.gamma", "res1.conv2.b", "res1.shortcut.W", "bn1.beta", "fc2.W"} <= names
    else:
        assert {"res1.res1.conv1.W", "res1.conv1.W", "res1.bn1.gamma", "bn1.gamma", "X"} <= names
    assert max(r.max_rel_error for r in results) <= 1e-7, [(r.name, r.max_rel_error) for r in results]
    x = np.random.default_rng(0).standard_normal((4, 2, 8, 8))
    train_z = model.train().forward(x)
    assert not np.allclose(train_z, model.eval().forward(x)), "dropout (and batch-norm) act in training only"


def _same(fast, ref, x, y, tol):
    lf, zf = engine.loss_and_grads(fast, x, y)
    lr, zr = engine.loss_and_grads(ref, x, y)
    assert lf == pytest.approx(lr, rel=tol)
    np.testing.assert_allclose(zf, zr, rtol=tol, atol=tol)
    gf, gr = fast.named_grads(), ref.named_grads()
    assert gf.keys() == gr.keys()
    scale = max(float(np.abs(g).max()) for g in gr.values())  # (a bias before batch-norm has gradient ~1e-17)
    for k, g in gr.items():
        np.testing.assert_allclose(gf[k], g, rtol=tol, atol=tol * scale, err_msg=k)
    for k, b in ref.named_buffers().items():
        np.testing.assert_allclose(fast.named_buffers()[k], b, rtol=tol, atol=tol, err_msg=k)
    np.testing.assert_allclose(engine.predict(fast, x), engine.predict(ref, x), rtol=tol, atol=tol)


@pytest.mark.parametrize("layers", [ALL_A, ALL_B], ids=["A", "B"])
def test_the_engine_equals_the_reference_in_training_and_evaluation_mode(layers) -> None:
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((70, 2, 8, 8)), rng.integers(0, 5, 70)  # 70 images: 3 micro-batches in eval
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 3e-4)):
        for mode in ("train", "eval"):
            fast, ref = _model((2, 8, 8), layers, dtype=dtype), _model((2, 8, 8), layers, dtype=dtype)
            for m in (fast, ref):
                getattr(m, mode)()
                m.set_step(3, 1, 4)
            engine_for(fast).threads = 2
            _same(fast, ref, x.astype(dtype), y, tol)
            assert engine_for(fast).whole_batch() == (mode == "train")


def test_the_dropout_masks_do_not_depend_on_micro_batches_or_threads() -> None:
    layers = [{"type": "conv", "out_channels": 3, "kernel_size": 3}, {"type": "relu"}, {"type": "dropout"},
              {"type": "flatten"}, {"type": "linear", "out_features": 4}]
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((50, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, 50)
    runs = []
    for threads, micro in ((1, 32), (2, 7), (2, 50)):
        model = _model((1, 6, 6), layers, dtype=np.float32)
        engine_for(model).threads = threads
        engine_for(model).train_micro_batch = micro
        model.set_step(0, 2, 3)
        runs.append((engine.loss_and_grads(model, x, y)[0], model.named_grads()["conv1.W"].copy()))
    for loss, g in runs[1:]:
        assert loss == runs[0][0] and np.array_equal(g, runs[0][1])


def test_checkpoint_round_trip_of_residual_parameters_and_the_batchnorm_buffers_inside(tmp_path: Path) -> None:
    cfg = _cfg((2, 6, 6), ALL_A)
    model = build_model(cfg.model)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((10, 2, 6, 6)).astype(np.float32)
    engine.loss_and_grads(model, x, np.arange(10) % 5)  # moves the running statistics
    path = save_checkpoint(tmp_path / "res.npz", model, cfg)
    with np.load(path, allow_pickle=False) as npz:
        assert {"res1.conv1.W", "res1.shortcut.W", "res1.conv2.b", "res1.bn1.running_mean",
                "res1.bn1.running_var", "bn1.running_mean"} <= set(npz.files)
        assert np.abs(npz["res1.bn1.running_mean"]).max() > 0
    assert load_checkpoint(path).config == cfg, "the nested layer lists survive the checkpoint's JSON config"
    fresh = build_model(cfg.model, seed=4)
    assert not np.array_equal(fresh.named_params()["res1.conv1.W"], model.named_params()["res1.conv1.W"])
    apply_params(load_checkpoint(path), fresh, path)
    for k, v in {**model.named_params(), **model.named_buffers()}.items():
        got = {**fresh.named_params(), **fresh.named_buffers()}[k]
        np.testing.assert_array_equal(got, v, err_msg=k)
    np.testing.assert_array_equal(engine.predict(fresh, x), engine.predict(model, x))


# ------------------------------------------------------------------------------------------ config errors


def _error(input_shape, layers) -> str:
    with pytest.raises(ConfigError) as info:
        _model(input_shape, layers)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_config_errors_name_the_block_the_layer_and_both_shapes() -> None:
    conv = {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1, "stride": 2}
    tail = [{"type": "flatten"}, {"type": "linear"}]
    msg = _error((4, 8, 8), [{"type": "relu"}, {"type": "residual", "layers": [conv]}, *tail])
    assert msg.startswith("model.layers[1] (res1): ")
    assert "4×8×8" in msg and "8×4×4" in msg and "projection: true" in msg
    msg = _error((4, 8, 8), [{"type": "flatten"}, {"type": "residual", "projection": True,
                                                   "layers": [{"type": "linear", "out_features": 3}]}, *tail])
    assert msg.startswith("model.layers[1] (res1): ") and "256" in msg and "3" in msg and "images" in msg
    msg = _error((4, 8, 8), [{"type": "residual", "name": "block", "layers": []}, *tail])
    assert msg.startswith("model.layers[0] (block): ") and "at least one layer" in msg
    # a layer inside a block that does not fit: its full path
    msg = _error((4, 8, 8), [{"type": "residual", "layers": [{"type": "relu"}, {"type": "residual", "layers": [
        {"type": "linear"}]}]}, *tail])
    assert msg.startswith("model.layers[0].layers[1].layers[0] (fc1): a linear layer needs a flat input")
    msg = _error((4, 8, 8), [{"type": "residual", "layers": [{"type": "relu"}, {"type": "conv", "kernal_size": 3}]}])
    assert msg.startswith("model.layers[0].layers[1].kernal_size: unknown key; did you mean")


def test_set_reaches_the_layers_inside_a_block() -> None:
    raw = apply_overrides({"model": {"input_shape": [2, 6, 6], "layers": ALL_A}},
                          ["model.layers[4].layers[0].out_channels=7", "model.layers[4].layers[3].out_channels=7"])
    model = build_model(build_config(raw).model)
    assert model.named_params()["res1.shortcut.W"].shape == (7, 4, 1, 1)


def test_dropout_p_outside_0_1_and_global_pooling_of_a_vector_are_one_line_errors() -> None:
    tail = [{"type": "flatten"}, {"type": "linear"}]
    assert _error((3, 4, 4), [{"type": "dropout", "p": 1}, *tail]) == "model.layers[0].p: must be less than 1, got 1.0"
    msg = _error((3, 4, 4), [{"type": "dropout", "p": -0.1}, *tail])
    assert msg == "model.layers[0].p: must be at least 0, got -0.1"
    msg = _error((3, 4, 4), [{"type": "flatten"}, {"type": "globalavgpool"}, {"type": "linear"}])
    assert msg.startswith("model.layers[1] (globalavgpool): global average pooling needs an image") and "(48,)" in msg
    msg = _error((3, 4, 4), [{"type": "leakyrelu", "slope": 1}, *tail])
    assert msg.startswith("model.layers[0].slope: must be less than 1")
