"""TensorBoard event files: a real two-epoch run with train.tensorboard on, read back with tensorboard's own
event reader (an independent implementation of the format), must give metrics.csv's numbers; per-parameter
histograms, norms and update ratios are there and the last weight norms equal those of last.npz; the HParams
records of a sweep trial decode to its values; without tensorboardX, one line says what to install.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok, one_line_error
from helpers import arrays
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.run.runs import read_history

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SEED = Path(__file__).resolve().parents[2] / "configs" / "seed.yaml"
SMALL = ["--set", "data.limit=512", "--set", "data.val_size=128", "--set", "train.batch_size=64"]
runner = CliRunner()


def _load(folder: Path):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tb_run(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tb") / "run"
    ok(runner.invoke(app, ["train", "--config", str(SEED), "--data-dir", str(real_cifar_dir), *SMALL, "--epochs", "2",
                           "--tensorboard", "--out", str(run)]))
    return run


def test_epoch_scalars_read_back_to_the_numbers_of_metrics_csv(tb_run: Path) -> None:
    acc = _load(tb_run)
    history = read_history(tb_run)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    steps_per_epoch = math.ceil(384 / 64)
    for column in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        events = acc.Scalars(f"epoch/{column}")
        assert [e.step for e in events] == [steps_per_epoch, 2 * steps_per_epoch]  # at the global step
        # metrics.csv keeps 6 significant digits, the events float32
        assert [e.value for e in events] == pytest.approx([r[column] for r in history], rel=1e-5), column
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1, 2]


def test_every_step_is_logged_and_the_epoch_mean_of_step_losses_is_the_train_loss(tb_run: Path) -> None:
    acc = _load(tb_run)
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, 13))
    assert len(acc.Scalars("step/lr")) == len(acc.Scalars("step/accuracy")) == 12
    history = read_history(tb_run)
    # 384 images in 6 full batches of 64: the epoch's train loss is the plain mean of its step losses
    for epoch in (1, 2):
        step_losses = [e.value for e in loss[(epoch - 1) * 6 : epoch * 6]]
        assert np.mean(step_losses) == pytest.approx(history[epoch - 1]["train_loss"], rel=1e-5)
    assert acc.Scalars("step/lr")[-1].value == pytest.approx(history[-1]["lr"], rel=1e-5)


def test_per_parameter_histograms_norms_and_update_ratios(tb_run: Path) -> None:
    acc = _load(tb_run)
    tags = acc.Tags()
    last = {k: v for k, v in arrays(tb_run / "last.npz").items() if k not in ("config", "state", "classes")
            and not k.startswith("optim.")}
    assert set(last) == {"conv1.W", "conv1.b", "fc1.W", "fc1.b"}
    for name, value in last.items():
        assert f"weights/{name}" in tags["histograms"] and f"grads/{name}" in tags["histograms"]
        hist = acc.Histograms(f"weights/{name}")[-1].histogram_value
        assert hist.num == value.size and hist.min == pytest.approx(float(value.min()), rel=1e-6)
        norm = acc.Scalars(f"norm/weights/{name}")
        assert norm[-1].value == pytest.approx(float(np.linalg.norm(value.astype(np.float64))), rel=1e-5)
        grads = acc.Scalars(f"norm/grads/{name}")
        assert len(grads) == 2 and all(g.value > 0 for g in grads)
        ratios = [e.value for e in acc.Scalars(f"update_ratio/{name}")]
        assert len(ratios) == 2 and all(0 < r < 1 for r in ratios), (name, ratios)


def test_hparams_records_decode_to_the_trial_values(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import metadata

    from cnncli.run.tb import write_hparams

    write_hparams(tmp_path, {"train.optimizer.lr": 0.03, "seed": 1, "optimizer": "sgd"}, {"val_acc": 0.42})
    acc = _load(tmp_path)
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG} <= set(content)
    start = metadata.plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    hp = start.session_start_info.hparams
    assert hp["train.optimizer.lr"].number_value == pytest.approx(0.03)
    assert hp["seed"].number_value == 1 and hp["optimizer"].string_value == "sgd"
    assert acc.Scalars("hparams/val_acc")[0].value == pytest.approx(0.42)


def test_without_tensorboardx_one_line_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now raises ImportError
    result = runner.invoke(app, ["train", "--config", str(SEED), "--tensorboard", "--out", str(tmp_path / "r"),
                                 "--data-dir", str(tmp_path / "nodata")])
    assert "pip install 'cnncli[tensorboard]'" in one_line_error(result)
