"""The training loop on the real CIFAR-10 (small slices): accuracy above chance, determinism, bit-for-bit resume
after a stop mid-epoch (Ctrl-C delivered from a callback) for SGD and Adam, divergence handling, and the run
folder (config.yaml, metrics.csv with the closed-form learning rates, last.npz, best.npz of the best epoch).
"""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import arrays as _arrays
from helpers import assert_same_training_state as _assert_same_training_state

from cnncli.config import load_config
from cnncli.host.errors import TrainingDiverged
from cnncli.run.checkpoint import load_checkpoint
from cnncli.run.train import Callbacks, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
DOCUMENTED_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


def _cfg(*overrides: str):
    return load_config(SEED, list(overrides))


class Recorder(Callbacks):
    """Records what the loop reports; raises Ctrl-C (a real SIGINT to this process) after chosen batches."""

    def __init__(self, interrupt_at: tuple[int, int] | None = None, times: int = 1) -> None:
        self.interrupt_at, self.times = interrupt_at, times
        self.info = None
        self.epoch = 0
        self.batches: list[tuple[int, int]] = []
        self.ends: list = []

    def on_start(self, info) -> None:
        self.info = info

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_batch: int) -> None:
        self.epoch = epoch

    def on_batch(self, batch: int, steps: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        self.batches.append((self.epoch, batch))
        if (self.epoch, batch) == self.interrupt_at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)

    def on_epoch_end(self, metrics, is_best: bool) -> None:
        self.ends.append((metrics, is_best))


# --------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run5k(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """5,000 images (500 held out), 2 epochs of the seed config (cosine, 1 warm-up epoch, base lr 0.01)."""
    cfg = _cfg("data.limit=5000", "data.val_size=500", "train.epochs=2")
    run = tmp_path_factory.mktemp("train") / "run5k"
    rec = Recorder()
    result = train(cfg, run, real_cifar_dir, callbacks=rec)
    return cfg, run, result, rec


def test_real_run_is_well_above_chance_on_the_test_set(run5k) -> None:
    _, _, result, _ = run5k
    assert result.test is not None and result.test.n == 10000
    assert int(result.test.confusion.sum()) == 10000
    assert result.test.accuracy > 0.25  # chance is 0.10
    assert result.history[-1].val_acc > 0.2


def test_run_info_and_steps(run5k) -> None:
    _, run, _, rec = run5k
    info = rec.info
    assert (info.n_train, info.n_val, info.n_test) == (4500, 500, 10000)
    assert info.steps_per_epoch == math.ceil(4500 / 128) == 36
    assert (info.start_epoch, info.start_batch, info.epochs) == (0, 0, 2)
    assert rec.batches == [(e, b) for e in (1, 2) for b in range(1, 37)]


def test_run_folder_contents(run5k) -> None:
    cfg, run, result, _ = run5k
    assert sorted(p.name for p in run.iterdir()) == [
        ".cnn-train.lock", "best.npz", "config.yaml", "gradflow.json", "last.npz", "metrics.csv", "run.json"
    ]
    assert load_config(run / "config.yaml") == cfg  # re-loadable, equal to the resolved config
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == DOCUMENTED_COLUMNS
        rows = list(reader)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r, m in zip(rows, result.history, strict=True):
        assert float(r["val_acc"]) == pytest.approx(m.val_acc, rel=1e-5)
        assert float(r["train_loss"]) == pytest.approx(m.train_loss, rel=1e-5)
        assert 0 < float(r["train_acc"]) <= 1 and float(r["seconds"]) > 0 and float(r["images_per_s"]) > 0
    # lr of each epoch's last step, by the closed form: 36 steps per epoch, warm-up = epoch 1 (step s gets
    # 0.01·(s+1)/36, so step 35 gets 0.01), then cosine over the 36 steps of epoch 2 (step 71: progress 35/36).
    assert float(rows[0]["lr"]) == pytest.approx(0.01, rel=1e-5)
    assert float(rows[1]["lr"]) == pytest.approx(0.005 * (1 + math.cos(math.pi * 35 / 36)), rel=1e-5)
    # last.npz: after the final epoch; best.npz: the epoch with the best val_acc in metrics.csv.
    last = load_checkpoint(run / "last.npz")
    assert (last.state["epoch"], last.state["batch"], last.state["step"]) == (2, 0, 72)
    best_epoch = 1 + int(np.argmax([float(r["val_acc"]) for r in rows]))
    best = load_checkpoint(run / "best.npz")
    assert best.state["epoch"] == best_epoch == result.best_epoch
    if best_epoch == 2:
        for k, v in last.params.items():
            assert np.array_equal(best.params[k], v)


def test_best_checkpoint_is_the_best_epoch_not_the_last(real_cifar_dir: Path, tmp_path: Path) -> None:
    """lr ×10 in epoch 2 (step schedule) ruins the network: best.npz must hold epoch 1's weights."""
    over = ["data.limit=2000", "data.val_size=500", "train.schedule={type: step, step_size: 1, gamma: 10.0}"]
    run2, run1 = tmp_path / "two", tmp_path / "one"
    result = train(_cfg(*over, "train.epochs=2"), run2, real_cifar_dir)
    with open(run2 / "metrics.csv", newline="", encoding="utf-8") as f:
        val = [float(r["val_acc"]) for r in csv.DictReader(f)]
    assert val[1] < val[0], "the setup must make epoch 1 the best"
    assert result.best_epoch == 1
    # The step schedule does not depend on the total: a 1-epoch run ends exactly at epoch 1 of the 2-epoch run.
    train(_cfg(*over, "train.epochs=1"), run1, real_cifar_dir)
    best, epoch1, last = _arrays(run2 / "best.npz"), _arrays(run1 / "last.npz"), _arrays(run2 / "last.npz")
    for k in ("conv1.W", "conv1.b", "fc1.W", "fc1.b"):
        assert np.array_equal(best[k], epoch1[k]), k
    assert not np.array_equal(best["fc1.W"], last["fc1.W"])
    assert json.loads(str(best["state"]))["epoch"] == 1


# ------------------------------------------------------------------------------------------ determinism


def test_same_config_and_seed_give_identical_weights(real_cifar_dir: Path, tmp_path: Path) -> None:
    over = ("data.limit=1000", "data.val_size=100", "train.epochs=1")
    train(_cfg(*over), tmp_path / "a", real_cifar_dir)
    train(_cfg(*over), tmp_path / "b", real_cifar_dir)
    _assert_same_training_state(tmp_path / "a" / "last.npz", tmp_path / "b" / "last.npz")
    train(_cfg(*over, "seed=1"), tmp_path / "c", real_cifar_dir)
    a, c = _arrays(tmp_path / "a" / "last.npz"), _arrays(tmp_path / "c" / "last.npz")
    assert not np.array_equal(a["conv1.W"], c["conv1.W"])  # the seed matters


# --------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("optimizer", "stop_at"),
    [("{type: sgd, lr: 0.02, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}", (1, 3)),
     ("{type: adam, lr: 0.001, weight_decay: 1.0e-4}", (2, 5))],
    ids=["sgd-nesterov", "adam"],
)
def test_stop_mid_epoch_then_resume_is_bit_identical(
    real_cifar_dir: Path, tmp_path: Path, optimizer: str, stop_at: tuple[int, int]
) -> None:
    """E epochs in one go == the same E epochs stopped by Ctrl-C after batch k and resumed from last.npz."""
    cfg = _cfg("data.limit=1500", "data.val_size=200", "train.epochs=2", f"train.optimizer={optimizer}")
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(cfg, whole, real_cifar_dir)

    previous = signal.getsignal(signal.SIGINT)
    rec = Recorder(interrupt_at=stop_at)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, split, real_cifar_dir, callbacks=rec)
    assert signal.getsignal(signal.SIGINT) is previous, "the SIGINT handler is restored"
    epoch, batch = stop_at
    assert (info.value.epoch, info.value.batch) == stop_at
    assert info.value.path == split / "last.npz"
    assert rec.batches[-1] == stop_at, "the stop happens right after the step in progress"
    steps = math.ceil(1300 / 128)
    ck = load_checkpoint(split / "last.npz")
    assert ck.resumable
    assert (ck.state["epoch"], ck.state["batch"], ck.state["step"]) == (epoch - 1, batch, (epoch - 1) * steps + batch)
    assert ck.state["partial"]["seen"] == batch * 128

    rec2 = Recorder()
    train(ck.config, split, real_cifar_dir, resume=ck, resume_path=split / "last.npz", callbacks=rec2)
    assert (rec2.info.start_epoch, rec2.info.start_batch) == (epoch - 1, batch)
    assert rec2.batches[0] == (epoch, batch + 1)
    assert len(rec2.batches) == 2 * steps - ((epoch - 1) * steps + batch)
    _assert_same_training_state(whole / "last.npz", split / "last.npz")
    _assert_same_training_state(whole / "best.npz", split / "best.npz")


def test_second_ctrl_c_aborts_at_once(real_cifar_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("data.limit=800", "data.val_size=100", "train.epochs=1")
    previous = signal.getsignal(signal.SIGINT)
    rec = Recorder(interrupt_at=(1, 2), times=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", real_cifar_dir, callbacks=rec)
    assert signal.getsignal(signal.SIGINT) is previous
    assert not (tmp_path / "run" / "last.npz").exists()


def test_stop_at_the_end_of_an_epoch_is_resumable(real_cifar_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("data.limit=800", "data.val_size=100", "train.epochs=2")
    steps = math.ceil(700 / 128)
    rec = Recorder(interrupt_at=(1, steps))  # Ctrl-C on the epoch's last step: the epoch completes first
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, tmp_path / "run", real_cifar_dir, callbacks=rec)
    assert (info.value.epoch, info.value.batch) == (1, steps)
    assert len(rec.ends) == 1  # validation and metrics of epoch 1 were done
    ck = load_checkpoint(tmp_path / "run" / "last.npz")
    assert (ck.state["epoch"], ck.state["batch"], ck.state["step"]) == (1, 0, steps)
    train(cfg, tmp_path / "run", real_cifar_dir, resume=ck, resume_path=tmp_path / "run" / "last.npz")
    train(cfg, tmp_path / "whole", real_cifar_dir)
    _assert_same_training_state(tmp_path / "whole" / "last.npz", tmp_path / "run" / "last.npz")


# ------------------------------------------------------------------------------------------ divergence


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_keeps_the_last_good_checkpoint(real_cifar_dir: Path, tmp_path: Path) -> None:
    over = ("data.limit=800", "data.val_size=100")
    run = tmp_path / "run"
    train(_cfg(*over, "train.epochs=1"), run, real_cifar_dir)
    before = (run / "last.npz").read_bytes()
    ck = load_checkpoint(run / "last.npz")
    with pytest.raises(TrainingDiverged) as info:
        train(_cfg(*over, "train.epochs=2", "train.optimizer.lr=1.0e+8"), run, real_cifar_dir,
              resume=ck, resume_path=run / "last.npz")
    msg = str(info.value)
    assert "learning rate" in msg and "epoch 2" in msg and str(run / "last.npz") in msg
    assert "\n" not in msg
    assert (run / "last.npz").read_bytes() == before
    again = load_checkpoint(run / "last.npz")
    assert all(np.all(np.isfinite(v)) for v in again.params.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_in_the_first_epoch_saves_nothing(real_cifar_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("data.limit=800", "data.val_size=100", "train.epochs=1", "train.optimizer.lr=1000000")
    with pytest.raises(TrainingDiverged, match="learning rate.*no checkpoint was saved"):
        train(cfg, tmp_path / "run", real_cifar_dir)
    assert not (tmp_path / "run" / "last.npz").exists()
    assert not (tmp_path / "run" / "best.npz").exists()


# ------------------------------------------------------------------------------------- limit / val_size


def test_limit_and_val_size(real_cifar_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("data.limit=3000", "data.val_size=500", "train.epochs=1", "train.batch_size=256")
    rec = Recorder()
    result = train(cfg, tmp_path / "run", real_cifar_dir, callbacks=rec)
    assert (rec.info.n_train, rec.info.n_val) == (2500, 500)
    assert rec.info.steps_per_epoch == 10 == len(rec.batches)  # ceil(2500 / 256)
    # train_acc = correct / seen: with 2,500 images seen it is a multiple of 1/2500.
    correct = result.history[0].train_acc * 2500
    assert correct == pytest.approx(round(correct), abs=1e-6)
    ck = load_checkpoint(tmp_path / "run" / "last.npz")
    assert ck.state["history"][0]["train_acc"] * 2500 == pytest.approx(round(correct), abs=1e-6)
