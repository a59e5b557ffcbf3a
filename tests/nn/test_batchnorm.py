"""Batch normalisation against naive loops of docs/derivations.md#batch-normalisation (the three-path backward
written out step by step, not the compact formula the layer uses), finite differences, running statistics, modes,
checkpoints and config errors; `bias: false` on conv and linear layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnncli import engine
from cnncli.config import build_config, load_config
from cnncli.engine import engine_for
from cnncli.host.errors import ConfigError
from cnncli.nn.gradcheck import gradcheck
from cnncli.nn.layers import BatchNorm
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import apply_params, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-5


def _channels(x: np.ndarray) -> list[np.ndarray]:
    """The values of each channel as a flat list: images (N, C, H, W) or vectors (N, D)."""
    return [x[:, c].reshape(-1) for c in range(x.shape[1])]


def _naive_forward(x, gamma, beta):
    """Per channel: μ, σ² (biased), x̂, y = γ x̂ + β, written as loops over the channel's M values."""
    y = np.empty_like(x)
    stats = []
    for c, values in enumerate(_channels(x)):
        m = len(values)
        mu = sum(values) / m
        var = sum((v - mu) ** 2 for v in values) / m
        xhat = [(v - mu) / np.sqrt(var + EPS) for v in values]
        y[:, c] = (gamma[c] * np.array(xhat) + beta[c]).reshape(y[:, c].shape)
        stats.append((mu, var, m))
    return y, stats


def _naive_backward(x, gamma, dy):
    """The three paths: δx̂ = δy·γ; δσ² = Σ δx̂·(x−μ)·(−½)(σ²+ε)^(−3/2); δμ = −Σ δx̂/√(σ²+ε) + δσ²·Σ −2(x−μ)/M;
    δx = δx̂/√(σ²+ε) + δσ²·2(x−μ)/M + δμ/M; δγ = Σ δy·x̂; δβ = Σ δy."""
    dx = np.empty_like(x)
    dgamma, dbeta = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for c, (values, dvals) in enumerate(zip(_channels(x), _channels(dy), strict=True)):
        m = len(values)
        mu = values.mean()
        var = ((values - mu) ** 2).mean()
        std = np.sqrt(var + EPS)
        dxhat = dvals * gamma[c]
        dvar = float(np.sum(dxhat * (values - mu))) * -0.5 * (var + EPS) ** -1.5
        dmu = -float(np.sum(dxhat)) / std + dvar * float(np.sum(-2 * (values - mu))) / m
        d = dxhat / std + dvar * 2 * (values - mu) / m + dmu / m
        dx[:, c] = d.reshape(dx[:, c].shape)
        dgamma[c] = float(np.sum(dvals * (values - mu) / std))
        dbeta[c] = float(np.sum(dvals))
    return dx, dgamma, dbeta


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5), (2, 2, 1, 1)])
def test_training_forward_backward_and_running_statistics_equal_the_naive_loops(shape) -> None:
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape) * 3 + 1
    layer = BatchNorm(momentum=0.1, eps=EPS)
    layer.build(shape[1:], rng, np.float64)
    layer.params["gamma"][...] = rng.uniform(0.5, 2, shape[1])
    layer.params["beta"][...] = rng.standard_normal(shape[1])
    y = layer.forward(x)
    want, stats = _naive_forward(x, layer.params["gamma"], layer.params["beta"])
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    # running statistics: r ← 0.9 r + 0.1 · batch value, the variance unbiased (M / (M − 1))
    mus = np.array([s[0] for s in stats])
    vars_unbiased = np.array([s[1] * s[2] / (s[2] - 1) for s in stats])
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * mus, rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * vars_unbiased, rtol=1e-12)
    dy = rng.standard_normal(shape)
    dx = layer.backward(dy)
    want_dx, want_dg, want_db = _naive_backward(x, layer.params["gamma"], dy)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(layer.grads["gamma"], want_dg, rtol=1e-10)
    np.testing.assert_allclose(layer.grads["beta"], want_db, rtol=1e-10)


def test_evaluation_mode_uses_the_running_statistics() -> None:
    rng = np.random.default_rng(3)
    layer = BatchNorm()
    layer.build((2, 3, 3), rng, np.float64)
    layer.buffers["running_mean"][...] = [1.0, -2.0]
    layer.buffers["running_var"][...] = [4.0, 0.25]
    layer.params["gamma"][...] = [2.0, 3.0]
    layer.params["beta"][...] = [0.5, -1.0]
    x = rng.standard_normal((3, 2, 3, 3))
    layer.eval()
    y = layer.forward(x)
    np.testing.assert_allclose(y[:, 0], 2.0 * (x[:, 0] - 1.0) / np.sqrt(4.0 + EPS) + 0.5)
    np.testing.assert_allclose(y[:, 1], 3.0 * (x[:, 1] + 2.0) / np.sqrt(0.25 + EPS) - 1.0)
    assert layer.buffers["running_mean"].tolist() == [1.0, -2.0]  # evaluation never moves them
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(layer.backward(dy)[:, 1], 3.0 * dy[:, 1] / np.sqrt(0.25 + EPS))


BN_NET = [{"type": "conv", "out_channels": 3, "kernel_size": 3, "padding": 1, "bias": False},
          {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "kernel_size": 2},
          {"type": "flatten"}, {"type": "batchnorm", "eps": 1e-3}, {"type": "linear", "out_features": 4}]


def _model(layers, shape=(2, 6, 6), dtype=np.float64):
    return build_model(build_config({"model": {"input_shape": list(shape), "layers": layers}}).model, dtype=dtype)


def test_gradcheck_in_training_mode_over_a_batch_is_below_1e_7() -> None:
    model = _model(BN_NET)
    before = {k: v.copy() for k, v in model.named_buffers().items()}
    results = gradcheck(model, batch=5, max_entries=40, eps=3e-4)
    assert {r.name for r in results} >= {"bn1.gamma", "bn1.beta", "bn2.gamma", "bn2.beta", "conv1.W", "X"}
    assert "conv1.b" not in {r.name for r in results}  # bias: false
    assert max(r.max_rel_error for r in results) <= 1e-7, [(r.name, r.max_rel_error) for r in results]
    for k, v in model.named_buffers().items():  # the perturbed passes left the running statistics alone
        np.testing.assert_array_equal(v, before[k].astype(v.dtype))


def test_engine_equals_reference_with_batchnorm_in_both_modes() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((90, 2, 6, 6)), rng.integers(0, 4, 90)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 3e-4)):
        fast, ref = _model(BN_NET, dtype=dtype), _model(BN_NET, dtype=dtype)
        lf, zf = engine.loss_and_grads(fast, x.astype(dtype), y)
        lr, zr = ref.loss_and_grads(x.astype(dtype), y)
        assert lf == pytest.approx(lr, rel=tol)
        for k, g in ref.named_grads().items():
            np.testing.assert_allclose(fast.named_grads()[k], g, rtol=tol, atol=tol * float(np.abs(g).max()))
        for k, b in ref.named_buffers().items():
            np.testing.assert_allclose(fast.named_buffers()[k], b, rtol=tol, atol=tol)
        z_fast, z_ref = engine.predict(fast, x.astype(dtype)), ref.predict(x.astype(dtype))
        np.testing.assert_allclose(z_fast, z_ref, rtol=tol, atol=tol)


def test_buffers_in_checkpoints_and_no_weight_decay_on_gamma_beta(tmp_path: Path) -> None:
    cfg = build_config({"model": {"input_shape": [2, 6, 6], "layers": BN_NET}})
    model = build_model(cfg.model)
    x = np.random.default_rng(1).standard_normal((8, 2, 6, 6)).astype(np.float32)
    engine.loss_and_grads(model, x, np.arange(8) % 4)
    assert model.decayed() == {"conv1.W", "fc1.W"}
    path = save_checkpoint(tmp_path / "bn.npz", model, cfg)
    with np.load(path, allow_pickle=False) as npz:
        assert {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn1.gamma", "bn1.beta"} <= set(npz.files)
    fresh = build_model(cfg.model, seed=9)
    apply_params(load_checkpoint(path), fresh, path)
    for k, v in model.named_buffers().items():
        np.testing.assert_array_equal(fresh.named_buffers()[k], v)
    assert np.abs(model.named_buffers()["bn1.running_mean"]).max() > 0  # the training pass moved them


def test_a_batch_of_one_vector_in_training_mode_is_a_one_line_error() -> None:
    model = _model([{"type": "flatten"}, {"type": "batchnorm"}, {"type": "linear", "out_features": 2}], (1, 2, 2))
    with pytest.raises(ConfigError, match=r"bn1: batch-norm in training mode needs more than one value"):
        engine.loss_and_grads(model, np.ones((1, 1, 2, 2)), np.array([0]))
    engine.predict(model, np.ones((1, 1, 2, 2)))  # evaluation mode: fine


def test_the_deep_config_builds_with_the_expected_parameters() -> None:
    cfg = load_config(ROOT / "configs" / "cifar-deep.yaml")
    model = build_model(cfg.model)
    assert model.output_shape == (10,)
    shapes = {k: v.shape for k, v in model.named_params().items()}
    assert shapes["conv1.W"] == (32, 3, 3, 3) and "conv1.b" not in shapes
    assert shapes["fc1.W"] == (10, 2048)
    assert set(model.named_buffers()) == {f"bn{i}.{k}" for i in range(1, 5) for k in ("running_mean", "running_var")}


# conv → BN → ReLU → pool (one engine stage, windows tiling S), a conv with a bias whose BN has a pool that does
# not tile its 3×3 map and a ReLU after the pool, and a batch-norm of its own after a pool
IMAGE_BN_NET = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
                {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "kernel_size": 2},
                {"type": "conv", "out_channels": 3, "kernel_size": 3, "padding": 1},
                {"type": "batchnorm", "momentum": 0.3}, {"type": "maxpool", "kernel_size": 2, "stride": 1},
                {"type": "relu"}, {"type": "batchnorm"}, {"type": "relu"}, {"type": "flatten"},
                {"type": "linear", "out_features": 4}]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batch_statistics_shared_across_worker_threads_equal_the_whole_batch_reference(threads: int) -> None:
    # the engine splits the batch between workers and adds up their per-channel partial sums: the batch's μ, σ²,
    # δx, δγ, δβ and running statistics must be the per-layer path's (one array, one pass) to float64 rounding
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((37, 2, 6, 6)), rng.integers(0, 4, 37)
    fast, ref = _model(IMAGE_BN_NET), _model(IMAGE_BN_NET)
    engine_for(fast).threads = threads
    assert engine_for(fast).worker_count(37) == threads and not engine_for(fast).whole_batch()
    for _ in range(2):  # the second step starts from running statistics the first one moved
        lf, _ = engine.loss_and_grads(fast, x, y)
        lr, _ = ref.loss_and_grads(x, y)
        assert lf == pytest.approx(lr, rel=1e-12)
        for k, g in ref.named_grads().items():
            np.testing.assert_allclose(fast.named_grads()[k], g, rtol=1e-10, atol=1e-12)  # δb ≈ 0 before a BN
        for k, b in ref.named_buffers().items():
            np.testing.assert_allclose(fast.named_buffers()[k], b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(engine.predict(fast, x), ref.predict(x), rtol=1e-10, atol=1e-12)


def test_a_worker_that_fails_between_the_shared_sums_stops_the_others_with_its_own_error() -> None:
    fast = _model(IMAGE_BN_NET)
    engine_for(fast).threads = 2
    stage = next(s for s in engine_for(fast).stages if getattr(s, "core", None) is not None)
    real = stage.forward

    def forward(buf, train):
        if buf.worker == 1:
            raise RuntimeError("worker 1 broke")
        real(buf, train)  # worker 0 then waits at the barrier for a partial sum that never comes

    stage.forward = forward
    x = np.random.default_rng(0).standard_normal((8, 2, 6, 6))
    with pytest.raises(RuntimeError, match="worker 1 broke"):
        engine.loss_and_grads(fast, x, np.arange(8) % 4)
    stage.forward = real
    engine.loss_and_grads(fast, x, np.arange(8) % 4)  # and the engine still works afterwards


def test_a_one_pixel_batch_of_one_is_refused_before_the_workers_start() -> None:
    model = _model([{"type": "batchnorm"}, {"type": "flatten"}, {"type": "linear", "out_features": 2}], (1, 1, 1))
    engine_for(model).threads = 2
    with pytest.raises(ConfigError, match=r"bn1: batch-norm in training mode needs more than one value"):
        engine.loss_and_grads(model, np.ones((1, 1, 1, 1)), np.array([0]))


def test_the_deep_config_resumed_mid_epoch_is_bit_identical(real_cifar_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # configs/cifar-deep.yaml itself (its layers, augmentation, Nesterov SGD, warm-up + cosine schedule, weight
    # decay), on a slice: the batch statistics shared between two worker threads and the running statistics in
    # the checkpoint must make the interrupted-and-resumed run land on the same bits as the uninterrupted one
    from helpers import StopAt, assert_same_training_state

    from cnncli.run.train import TrainingInterrupted, train

    monkeypatch.setenv("CNNCLI_THREADS", "2")

    cfg = load_config(ROOT / "configs" / "cifar-deep.yaml", overrides=[
        "data.limit=192", "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=64"])
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(cfg, whole, real_cifar_dir)
    with pytest.raises(TrainingInterrupted):
        train(cfg, split, real_cifar_dir, callbacks=StopAt((1, 2)))
    ck = load_checkpoint(split / "last.npz")
    assert 0 < ck.state["batch"] < 6, ck.state  # saved in the middle of an epoch (6 steps of 32)
    train(ck.config, split, real_cifar_dir, resume=ck, resume_path=split / "last.npz")
    assert_same_training_state(whole / "last.npz", split / "last.npz")
    with np.load(whole / "last.npz", allow_pickle=False) as npz:
        assert np.abs(npz["bn1.running_mean"]).max() > 0  # the running statistics moved and were compared
