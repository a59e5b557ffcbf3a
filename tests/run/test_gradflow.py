"""Gradient flow without TensorBoard (cnncli/run/gradflow.py, the engine's ReLU watch, `cnn train`, `cnn plot`).

Checked against numbers computed here: dead units against each ReLU's output on the per-layer path (the
classes of cnncli/nn/layers.py, not the engine), with channels and features killed on purpose; gradient norms,
update ratios and losses against norms of the gradients and parameter copies taken here; training with the
recording on gives bit-identical checkpoints to training with it off; a resumed run keeps every epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import StopAt, assert_same_training_state

from cnncli import engine
from cnncli.config import build_config, load_config
from cnncli.nn.model import build_model
from cnncli.run.gradflow import FILE, FlowFileError, FlowRecorder, read_flow, sample_steps
from cnncli.run.train import TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"


def _model():
    cfg = build_config({"model": {"input_shape": [3, 8, 8], "layers": [
        {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "conv", "out_channels": 5, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "out_features": 7},
        {"type": "relu"},
        {"type": "linear", "out_features": 4},
    ]}})
    model = build_model(cfg.model, seed=0)
    p = model.named_params()
    p["conv1.b"][[1, 4]] = -100.0  # these channels of A¹ never fire
    p["fc1.b"][[2]] = -100.0  # nor this feature of a¹
    return model


def _relu_peaks(model, xs) -> list[np.ndarray]:
    """Per ReLU layer: the max of each unit (channel or feature) over the batches, on the per-layer path."""
    peaks: list[np.ndarray | None] = [None] * len(model.layers)
    model.train()
    for x in xs:
        a = x
        for i, layer in enumerate(model.layers):
            a = layer.forward(a)
            if layer.kind == "relu":
                m = a.max(axis=tuple(k for k in range(a.ndim) if k != 1))
                peaks[i] = m if peaks[i] is None else np.maximum(peaks[i], m)
    return [p for p in peaks if p is not None]


def test_recorder_against_numbers_taken_here() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(20, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    ys = [rng.integers(0, 4, size=20) for _ in range(3)]
    rec = FlowRecorder(model, steps_per_epoch=3, points=50)
    rec.start_epoch(1)
    norms: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    losses = []
    for b, (x, y) in enumerate(zip(xs, ys, strict=True)):
        loss, _ = engine.loss_and_grads(model, x, y)
        rec.before_step(b)
        before = {k: v.copy() for k, v in model.named_params().items()}
        for k, g in model.named_grads().items():
            norms.setdefault(k, []).append(float(np.sqrt((g.astype(np.float64) ** 2).sum())))
            model.named_params()[k][...] -= 0.1 * g  # the update
        for k, v in model.named_params().items():
            base = np.sqrt((before[k].astype(np.float64) ** 2).sum())
            if base > 0:  # biases start at 0: no ratio for that step
                ratios.setdefault(k, []).append(float(np.sqrt(((v - before[k]).astype(np.float64) ** 2).sum()) / base))
        rec.after_step(b, b + 1, loss)
        losses.append(loss)
    r = rec.end_epoch()
    assert r.steps == 3 and r.loss_steps == [(1, losses[0]), (2, losses[1]), (3, losses[2])]
    assert len(ratios["conv2.b"]) == 2 and len(ratios["conv1.b"]) == len(ratios["conv2.W"]) == 3
    for k in norms:
        assert r.params[k]["grad_norm"] == pytest.approx(np.mean(norms[k]), rel=1e-5)
        assert r.params[k]["update_ratio"] == pytest.approx(np.mean(ratios[k]), rel=1e-4)
    assert math.isnan(FlowRecorder(model, 3).end_epoch().params["conv1.W"]["update_ratio"])  # no step sampled yet

    # dead units: the engine's watch against the per-layer forward on the same batches (same weights as
    # during the steps? no: compare with the weights of each step, so replay the steps on a fresh model)
    fresh = _model()
    peaks = []
    rec2 = FlowRecorder(fresh, steps_per_epoch=3)
    rec2.start_epoch(1)
    for b, (x, y) in enumerate(zip(xs, ys, strict=True)):
        peaks.append(_relu_peaks(fresh, [x]))
        engine.loss_and_grads(fresh, x, y)
        rec2.before_step(b)
        for k, g in fresh.named_grads().items():
            fresh.named_params()[k][...] -= 0.1 * g
        rec2.after_step(b, b + 1, 0.0)
    r2 = rec2.end_epoch()
    expected = [np.maximum.reduce([p[j] for p in peaks]) for j in range(3)]
    assert list(r2.dead) == ["A¹", "A²", "a¹"]
    for (name, d), peak in zip(r2.dead.items(), expected, strict=True):
        assert d["units"] == peak.size
        assert d["dead"] == int((peak <= 0).sum()), name
    assert r2.dead["A¹"]["dead"] >= 2 and r2.dead["a¹"]["dead"] >= 1  # the killed ones, at least
    assert rec2.end_epoch().dead == {}  # read once: the next epoch starts afresh


def test_overflowing_norms_are_recorded_quietly() -> None:
    """A diverging run's weights overflow float32 norms: no RuntimeWarning may reach stderr (the CLI's one error
    line is the only output), the record holds inf and is written as null."""
    import warnings

    from cnncli.run.gradflow import to_json

    model = _model()
    rec = FlowRecorder(model, steps_per_epoch=1)
    rec.start_epoch(1)
    x = np.ones((4, 3, 8, 8), np.float32)
    engine.loss_and_grads(model, x, np.zeros(4, int))
    rec.before_step(0)
    for g in model.named_grads().values():
        g[...] = 3e38  # the next dot product overflows
    model.named_params()["fc2.W"][...] = 3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.after_step(0, 1, 1.0)
        r = rec.end_epoch()
    assert math.isinf(r.params["fc2.W"]["grad_norm"])
    assert json.loads(to_json([r]))["epochs"][0]["params"]["fc2.W"]["grad_norm"] is None


def test_sample_steps_are_bounded_and_spread() -> None:
    assert sample_steps(7, 50) == set(range(7))
    s = sample_steps(391, 50)
    assert len(s) == 50 and min(s) == 0 and max(s) == 390


def test_recording_changes_no_bit_and_survives_a_resume(real_cifar_dir: Path, tmp_path: Path) -> None:
    base = ["data.limit=1500", "data.val_size=200", "train.epochs=2"]
    off, on, split = tmp_path / "off", tmp_path / "on", tmp_path / "split"
    train(load_config(SEED, [*base, "train.gradflow=false"]), off, real_cifar_dir)
    cfg = load_config(SEED, base)
    train(cfg, on, real_cifar_dir)
    assert not (off / FILE).exists()
    assert_same_training_state(off / "last.npz", on / "last.npz")
    whole = read_flow(on)
    assert [r.epoch for r in whole] == [1, 2] and all(r.steps == r.steps_per_epoch == 11 for r in whole)
    assert [s for r in whole for s, _ in r.loss_steps] == list(range(1, 23))  # 11 steps ≤ 50: every one

    with pytest.raises(TrainingInterrupted):
        train(cfg, split, real_cifar_dir, callbacks=StopAt((2, 4)))
    from cnncli.run.checkpoint import load_checkpoint

    ck = load_checkpoint(split / "last.npz")
    train(ck.config, split, real_cifar_dir, resume=ck, resume_path=split / "last.npz")
    assert_same_training_state(on / "last.npz", split / "last.npz")
    resumed = read_flow(split)
    assert [(r.epoch, r.steps) for r in resumed] == [(1, 11), (2, 7)]  # epoch 2: the 7 steps after the resume
    assert resumed[0].params["fc1.W"] == whole[0].params["fc1.W"]


@pytest.mark.parametrize(("text", "needle"), [
    ("{", "cannot read"),
    ('{"format": 2, "epochs": []}', "format"),
    ('{"format": 1, "epochs": [{"epoch": 1, "steps": 1, "steps_per_epoch": 1, "params": {"w": {"grad_norm": "x"}},'
     ' "dead": {}, "loss_steps": []}]}', "grad_norm"),
    ('{"format": 1, "epochs": []}', "no epoch"),
])
def test_a_bad_gradflow_file_is_named(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / FILE).write_text(text)
    with pytest.raises(FlowFileError, match=needle) as e:
        read_flow(tmp_path)
    assert str(tmp_path / FILE) in str(e.value) and "\n" not in str(e.value)


def test_cli_plot_draws_gradient_flow(real_cifar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from clihelp import ok
    from typer.testing import CliRunner

    from cnncli.cli.app import app

    run = tmp_path / "run"
    train(load_config(SEED, ["data.limit=1500", "data.val_size=200", "train.epochs=2"]), run, real_cifar_dir)
    doc = json.loads(ok(CliRunner().invoke(app, ["plot", str(run), "--no-confusion", "--json"])))
    assert str(run / "gradflow.png") in doc["wrote"]
    assert (run / "gradflow.png").read_bytes().startswith(b"\x89PNG")
