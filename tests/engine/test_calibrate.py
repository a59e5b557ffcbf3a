"""The engine's micro-batch sizes fitted to the machine (cnncli/engine/calibrate.py): the choice, the cache,
resumed runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnncli.config import build_config
from cnncli.engine import calibrate, engine_for
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
         {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"}, {"type": "linear", "out_features": 3}]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNNCLI_TUNE", "1")
    return tmp_path / "cache" / "tune.json"


def _model(layers=SMALL, shape=(3, 8, 8)):
    return build_model(build_config({"model": {"input_shape": list(shape), "layers": layers}}).model)


def _fake_clock(monkeypatch: pytest.MonkeyPatch, model, best_train: int, best_eval: int) -> None:
    """Each timed call 'takes' longer the farther the engine's current size is from the given best one."""
    eng = engine_for(model)

    def fake(fn, calls):
        fn()
        if model.training:
            return 10.0 + abs(eng.train_micro_batch - best_train)
        return 5.0 + abs(eng.eval_micro_batch - best_eval)

    monkeypatch.setattr(calibrate, "_time", fake)


def test_the_fastest_candidates_are_chosen_applied_and_cached(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    model = _model()
    _fake_clock(monkeypatch, model, best_train=12, best_eval=50)
    t = calibrate.for_model(model, 64, 100)
    assert (t.train_micro_batch, t.eval_micro_batch, t.source) == (12, 50, "measured")
    assert set(t.train_ms) >= {8, 12, 16, 24, 32, 48, 64} and "fastest of" in t.why
    eng = engine_for(model)
    assert (eng.train_micro_batch, eng.eval_micro_batch) == (12, 50)
    assert cache.is_file()
    # the next run on this machine and network reads the cache: nothing measured
    monkeypatch.setattr(calibrate, "_time", lambda fn, calls: pytest.fail("measured again"))
    again = calibrate.for_model(_model(), 64, 100)
    assert (again.train_micro_batch, again.eval_micro_batch, again.source) == (12, 50, "cache")


def test_another_machine_or_network_or_batch_does_not_use_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    _fake_clock(monkeypatch, model, best_train=12, best_eval=50)
    calibrate.for_model(model, 64, 100)
    assert calibrate.cached(_model(), 64, 100) is not None
    assert calibrate.cached(_model(), 32, 100) is None  # another batch
    other = [dict(layer) for layer in SMALL]
    other[0]["out_channels"] = 5
    assert calibrate.cached(_model(other), 64, 100) is None  # another network shape
    monkeypatch.setattr(calibrate, "machine_key", lambda: "another machine")
    assert calibrate.cached(_model(), 64, 100) is None


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"m": 3}', b"\xff\xfe", b" " * (2 << 20)])
def test_a_damaged_cache_is_ignored_and_rewritten(content: bytes, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    model = _model()
    _fake_clock(monkeypatch, model, best_train=16, best_eval=20)
    assert calibrate.cached(model, 64, 100) is None
    t = calibrate.for_model(model, 64, 100)
    assert t.source == "measured"
    assert calibrate.cached(_model(), 64, 100).train_micro_batch == 16  # type: ignore[union-attr]
    assert not [p for p in cache.parent.iterdir() if p.name != "tune.json"], "no temporary file left"


def test_a_hand_edited_entry_with_bad_sizes_is_ignored(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    _fake_clock(monkeypatch, model, best_train=16, best_eval=20)
    calibrate.for_model(model, 64, 100)
    data = json.loads(cache.read_text())
    for entry in next(iter(data.values())).values():
        entry["train_micro_batch"] = -3
    cache.write_text(json.dumps(data))
    assert calibrate.cached(_model(), 64, 100) is None


def test_off_means_the_built_in_sizes_and_no_measurement(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("CNNCLI_TUNE", "0")
    monkeypatch.setattr(calibrate, "_time", lambda fn, calls: pytest.fail("measured"))
    t = calibrate.for_model(_model(), 64, 100)
    assert t.source == "default" and (t.train_micro_batch, t.eval_micro_batch) == (32, 20)
    assert not cache.exists()


def test_with_batch_norm_the_training_size_is_not_measured_and_the_model_is_left_as_it_was() -> None:
    layers = [SMALL[0], {"type": "batchnorm"}, *SMALL[1:]]
    model = _model(layers)
    params = {k: v.copy() for k, v in model.named_params().items()}
    buffers = {k: v.copy() for k, v in model.named_buffers().items()}
    t = calibrate.measure(model, 16, 20, rounds=1, seconds=0.01)
    assert t.train_ms == {} and "batch-norm" in t.why and t.eval_ms
    assert model.training
    for k, v in params.items():
        np.testing.assert_array_equal(model.named_params()[k], v)
    for k, v in buffers.items():
        np.testing.assert_array_equal(model.named_buffers()[k], v)


def test_a_resumed_run_keeps_the_sizes_it_trained_with(real_cifar_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the training micro-batch orders the sums of a batch's gradients: a run interrupted and resumed after the
    # cache changed must still use its own sizes, and so land on the uninterrupted run's bits
    from helpers import StopAt, assert_same_training_state

    from cnncli.run.train import TrainingInterrupted, train

    raw = {"seed": 1, "model": {"input_shape": [3, 32, 32], "layers": [
        {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
        {"type": "maxpool", "kernel_size": 4}, {"type": "flatten"}, {"type": "linear", "out_features": 10}]},
        "data": {"limit": 300, "val_size": 60}, "train": {"epochs": 2, "batch_size": 60, "eval_batch_size": 500,
                                                          "optimizer": {"type": "sgd", "lr": 0.05}}}
    cfg = build_config(raw, name="tuned")
    sizes = {"train": 7}

    def fake_measure(model, batch, eval_batch, **kw):
        return calibrate.Tuning(sizes["train"], 20, "measured", "test")

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(cfg, whole, real_cifar_dir)
    monkeypatch.setenv("CNNCLI_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(TrainingInterrupted):
        train(cfg, split, real_cifar_dir, callbacks=StopAt((1, 2)))
    ck = load_checkpoint(split / "last.npz")
    assert ck.state["engine"] == {"train_micro_batch": 7, "eval_micro_batch": 20}
    sizes["train"] = 13  # the machine's calibration has changed since
    (tmp_path / "other-cache" / "tune.json").unlink()
    train(ck.config, split, real_cifar_dir, resume=ck, resume_path=split / "last.npz")
    assert_same_training_state(whole / "last.npz", split / "last.npz")
    # and the sizes matter: 13 gives other bits than 7
    other = tmp_path / "other"
    train(cfg, other, real_cifar_dir)
    with np.load(whole / "last.npz") as a, np.load(other / "last.npz") as b:
        assert not np.array_equal(a["conv1.W"], b["conv1.W"])


def test_cnn_bench_tune_measures_says_why_and_the_next_bench_reads_the_cache(tmp_path: Path) -> None:
    env = {**os.environ, "CNNCLI_CACHE": str(tmp_path / "c"), "CNNCLI_TUNE": "1", "COLUMNS": "200"}
    cfg = tmp_path / "small.yaml"
    cfg.write_text(json.dumps({"model": {"input_shape": [3, 8, 8], "layers": SMALL}}))
    cmd = [str(Path(sys.executable).parent / "cnn"), "bench", "--config", str(cfg), "--steps", "1", "--repeats", "1",
           "--batch-size", "16", "--eval-batch-size", "20"]
    first = subprocess.run([*cmd, "--tune"], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "micro-batches: training" in first.stdout and "(measured now)" in first.stdout
    assert "micro-batch calibration" in first.stdout and "fastest of" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "measured on this machine" in second.stdout and "cnn bench --tune" in second.stdout
