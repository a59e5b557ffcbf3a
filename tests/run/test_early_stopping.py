"""Early stopping and the plateau schedule: the rules on hand-made metric sequences, then real (tiny) runs on
CIFAR-10 that stop, or lower the learning rate, where the rule says, and do the same after a resume.

A real run's metrics cannot be chosen, so the runs use min_delta = 10: no epoch after the first can improve a
loss by that much, which makes the stopping epoch (1 + patience) and the lr drop known in advance.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers import assert_same_training_state

from cnncli.config import EarlyStoppingConfig, ScheduleConfig, load_config
from cnncli.host.errors import ConfigError
from cnncli.run.checkpoint import load_checkpoint
from cnncli.run.optim import learning_rate, plateau_lr
from cnncli.run.runs import read_history
from cnncli.run.train import Callbacks, TrainingInterrupted, stops_early, train

SEED = Path(__file__).resolve().parents[2] / "configs" / "seed.yaml"
SMALL = ["data.limit=512", "data.val_size=128", "train.batch_size=64"]  # 384 training images: 6 steps per epoch


def _first_stop(values: list[float], cfg: EarlyStoppingConfig) -> int | None:
    """The first epoch after which the rule stops (scanning the run as it grows)."""
    return next((n for n in range(1, len(values) + 1) if stops_early(values[:n], cfg)), None)


# ------------------------------------------------------------------------------------------------ rules


def test_early_stopping_waits_patience_epochs_without_improvement() -> None:
    acc = EarlyStoppingConfig(metric="val_acc", patience=2)
    # best 0.30 at epoch 3; epochs 4 and 5 do not beat it -> stop after 5
    assert _first_stop([0.10, 0.20, 0.30, 0.30, 0.25, 0.40], acc) == 5
    # an improvement resets the count: 4 fails, 5 improves, 6 and 7 fail -> stop after 7
    assert _first_stop([0.1, 0.2, 0.3, 0.29, 0.31, 0.30, 0.30], acc) == 7
    assert _first_stop([0.1, 0.2, 0.3, 0.4], acc) is None


def test_early_stopping_losses_improve_downwards_and_min_delta_counts() -> None:
    loss = EarlyStoppingConfig(metric="val_loss", patience=3)
    assert _first_stop([1.0, 0.9, 0.95, 0.93, 0.91, 0.5], loss) == 5  # 0.9 at epoch 2 stays the best for 3 epochs
    # with min_delta 0.05 the drops to 0.97 and 0.93 are too small: epochs 2, 3, 4 fail -> stop after 4
    strict = EarlyStoppingConfig(metric="val_loss", patience=3, min_delta=0.05)
    assert _first_stop([1.0, 0.97, 0.96, 0.955, 0.5], strict) == 4
    assert _first_stop([1.0, 0.94, 0.88, 0.82], strict) is None  # each improves by 0.06


def test_plateau_lowers_the_lr_after_patience_epochs_and_stops_at_min_lr() -> None:
    cfg = ScheduleConfig(type="plateau", factor=0.5, patience=2, monitor="val_loss", min_delta=0.0, min_lr=0.02)
    losses = [1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 1.3, 1.3]
    # epoch 3: 2nd epoch without improvement -> 0.1·0.5; epoch 4 improves; epoch 6: 2nd again -> 0.025;
    # epoch 8: again -> 0.0125, floored at min_lr 0.02
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.02]
    assert [plateau_lr(0.1, cfg, losses[:n]) for n in range(len(losses) + 1)] == pytest.approx(expected)
    acc = ScheduleConfig(type="plateau", factor=0.1, patience=1, monitor="val_acc")
    assert plateau_lr(1.0, acc, [0.5, 0.6, 0.55]) == pytest.approx(0.1)  # accuracies improve upwards


def test_plateau_keeps_the_warm_up_ramp() -> None:
    cfg = ScheduleConfig(type="plateau", warmup_epochs=1, factor=0.5, patience=1)
    assert learning_rate(0.2, cfg, step=1, steps_per_epoch=4, epochs=5, monitored=()) == pytest.approx(0.2 * 2 / 4)
    assert learning_rate(0.2, cfg, step=8, steps_per_epoch=4, epochs=5, monitored=(1.0, 1.0)) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- real runs


class StopAt(Callbacks):
    """Sends this process a real SIGINT after batch `batch` of epoch `epoch`; records the epochs started."""

    def __init__(self, epoch: int | None = None, batch: int | None = None) -> None:
        self.at, self.current, self.started = (epoch, batch), 0, []

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_batch: int) -> None:
        self.current = epoch
        self.started.append(epoch)

    def on_batch(self, batch: int, steps: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        if (self.current, batch) == self.at:
            signal.raise_signal(signal.SIGINT)


@pytest.fixture()
def data_link(real_cifar_dir: Path, tmp_path: Path) -> Path:
    """tmp_path, with the real CIFAR-10 folder reachable as tmp_path/data."""
    (tmp_path / "data").symlink_to(real_cifar_dir)
    return tmp_path


def _run(folder: Path, overrides: list[str], cb: Callbacks | None = None, resume: Path | None = None):
    """train() on folder (tmp_path/runs/NAME), the data at tmp_path/data."""
    cfg = load_config(SEED, [*SMALL, *overrides])
    ckpt = load_checkpoint(resume) if resume else None
    return train(cfg, folder, folder.parent.parent / "data", resume=ckpt, resume_path=resume, callbacks=cb)


ES = ["train.epochs=4", "train.early_stopping.metric=val_loss", "train.early_stopping.patience=1",
      "train.early_stopping.min_delta=10"]  # fmt: skip


def test_a_real_run_stops_early_and_a_resumed_one_stops_at_the_same_epoch(data_link: Path) -> None:
    whole = _run(data_link / "runs" / "whole", ES)
    assert [m.epoch for m in whole.history] == [1, 2] and whole.stopped_early == 2
    record = json.loads((data_link / "runs" / "whole" / "run.json").read_text())
    assert record["state"] == "finished" and record["stopped_early"] == 2 and record["epochs_done"] == 2
    assert whole.test is not None and record["test_acc"] == whole.test.accuracy  # best.npz is still evaluated
    assert len(read_history(data_link / "runs" / "whole")) == 2

    cut = data_link / "runs" / "cut"
    with pytest.raises(TrainingInterrupted):
        _run(cut, ES, StopAt(2, 3))
    assert json.loads((cut / "run.json").read_text())["state"] == "interrupted"
    resumed = _run(cut, ES, resume=cut / "last.npz")
    assert resumed.stopped_early == 2 and [m.epoch for m in resumed.history] == [1, 2]
    assert_same_training_state(cut / "last.npz", data_link / "runs" / "whole" / "last.npz")

    again = StopAt()
    done = _run(cut, ES, again, resume=cut / "last.npz")  # resuming a run that early stopping ended trains nothing
    assert again.started == [] and done.stopped_early == 2


def test_a_plateau_run_resumes_with_the_same_learning_rates(data_link: Path) -> None:
    plateau = ["train.epochs=3", "train.schedule.type=plateau", "train.schedule.warmup_epochs=0",
               "train.schedule.patience=1", "train.schedule.factor=0.5", "train.schedule.min_delta=10",
               "train.optimizer.lr=0.02"]  # fmt: skip
    whole = _run(data_link / "runs" / "whole", plateau)
    # epoch 2 does not improve epoch 1's loss by 10: from epoch 3 on, lr = 0.02·0.5
    assert [m.lr for m in whole.history] == pytest.approx([0.02, 0.02, 0.01])
    cut = data_link / "runs" / "cut"
    with pytest.raises(TrainingInterrupted):
        _run(cut, plateau, StopAt(3, 2))
    resumed = _run(cut, plateau, resume=cut / "last.npz")
    assert [m.lr for m in resumed.history] == [m.lr for m in whole.history]
    assert_same_training_state(cut / "last.npz", data_link / "runs" / "whole" / "last.npz")


def test_watching_validation_numbers_without_a_validation_set_is_a_config_error(data_link: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric: val_acc needs a validation set"):
        _run(data_link / "runs" / "x", ["data.val_size=0", "train.early_stopping.patience=2"])
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.patience"):
        load_config(SEED, ["train.early_stopping.patience=0"])
    with pytest.raises(ConfigError, match=r"train\.schedule\.monitor"):
        load_config(SEED, ["train.schedule.monitor=test_acc"])
    assert not (data_link / "runs" / "x").exists()  # nothing half-made
