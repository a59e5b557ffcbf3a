"""model.input_shape from the data set (issue 13): resolved once when a config is built, stored resolved in
config.yaml and checkpoints; a stated shape or a class count that disagrees with the data set is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from clihelp import ok, one_line_error
from conftest import CONFIGS
from typer.testing import CliRunner

from cnncli import data
from cnncli.cli.app import app
from cnncli.config import build_config, config_to_dict, load_config
from cnncli.host.errors import CheckpointError
from cnncli.run.checkpoint import load_checkpoint

runner = CliRunner()
SEED_LAYERS = yaml.safe_load((CONFIGS / "seed.yaml").read_text(encoding="utf-8"))["model"]["layers"]


def _write(tmp_path: Path, raw: dict, name: str = "net") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_configs_state_no_shape_and_get_the_data_sets(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    assert "input_shape" not in yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
    cfg = load_config(path)
    assert cfg.model.input_shape == data.dataset_shape(cfg.data)[0] == (1, 28, 28)
    assert config_to_dict(cfg)["model"]["input_shape"] == [1, 28, 28]  # what config.yaml and checkpoints hold


@pytest.mark.parametrize(("data_keys", "shape"), [
    ({}, (3, 32, 32)),
    ({"dataset": "cifar100", "labels": "coarse"}, (3, 32, 32)),
    ({"dataset": "mnist"}, (1, 28, 28)),
    ({"dataset": "folder", "image_size": [1, 20, 24]}, (1, 20, 24)),
])
def test_left_out_shape_comes_from_the_data_set(data_keys: dict, shape: tuple) -> None:
    cfg = build_config({"model": {"layers": [{"type": "flatten"}, {"type": "linear"}]}, "data": data_keys})
    assert cfg.model.input_shape == shape
    # a stated shape is kept as stated (the data check is training's), and the resolved one round-trips
    stated = build_config({"model": {"input_shape": [2, 5, 5], "layers": [{"type": "flatten"}, {"type": "linear"}]},
                           "data": data_keys})
    assert stated.model.input_shape == (2, 5, 5)
    assert build_config(config_to_dict(cfg), name=cfg.name) == cfg


def test_run_without_shape_stores_it_and_the_class_names(real_cifar_dir: Path, tmp_path: Path) -> None:
    config = _write(tmp_path, {"model": {"layers": SEED_LAYERS}, "data": {"limit": 300, "val_size": 100},
                               "train": {"epochs": 1, "batch_size": 100}})
    run = tmp_path / "run"
    ok(runner.invoke(app, ["train", "-c", str(config), "--data-dir", str(real_cifar_dir), "--out", str(run)]))
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["model"]["input_shape"] == [3, 32, 32]
    ckpt = load_checkpoint(run / "best.npz")
    assert ckpt.config.model.input_shape == (3, 32, 32)
    assert ckpt.classes == data.load_classes(real_cifar_dir / "batches.meta")
    # eval needs nothing but the checkpoint and the data
    res = json.loads(ok(runner.invoke(app, ["eval", str(run / "best.npz"), "--data-dir", str(real_cifar_dir),
                                            "--json"])))
    assert res["n"] == 10000


def test_stated_shape_that_disagrees_is_one_line_before_reading_data(real_cifar_dir: Path, tmp_path: Path) -> None:
    layers = [{"type": "conv", "out_channels": 4, "padding": 1}, {"type": "flatten"}, {"type": "linear"}]
    config = _write(tmp_path, {"model": {"input_shape": [1, 28, 28], "layers": layers}})
    run = tmp_path / "run"
    err = one_line_error(runner.invoke(app, ["train", "-c", str(config), "--data-dir", str(real_cifar_dir),
                                             "--out", str(run)]))
    assert "model.input_shape = [1, 28, 28]" in err and "[3, 32, 32]" in err and "CIFAR-10" in err
    assert not run.exists()


@pytest.mark.parametrize(("layers", "where", "got"), [
    (SEED_LAYERS[:-1] + [{"type": "linear", "name": "fc1", "out_features": 7}], "model.layers[4] (fc1)", 7),
    # trailing shape-keeping layers: the error still names the layer that sets the count
    (SEED_LAYERS[:-1] + [{"type": "linear", "out_features": 12}, {"type": "dropout"}, {"type": "tanh"}],
     "model.layers[4] (fc1)", 12),
    ([{"type": "conv", "out_channels": 6, "padding": 1}, {"type": "globalavgpool"}], "model.layers[1] (globalavgpool)",
     6),
])
def test_output_count_that_disagrees_names_the_layer(real_cifar_dir: Path, tmp_path: Path, layers: list,
                                                     where: str, got: int) -> None:
    config = _write(tmp_path, {"model": {"layers": layers}})
    err = one_line_error(runner.invoke(app, ["train", "-c", str(config), "--data-dir", str(real_cifar_dir),
                                             "--out", str(tmp_path / "run")]))
    assert f"{where}: gives {got} outputs, but CIFAR-10 has 10 classes" in err
    assert ("set its out_features to 10" in err) == ("linear" in where or "fc" in where)


def test_class_names_entry_is_optional_and_checked(tmp_path: Path) -> None:
    from cnncli.nn.model import build_model
    from cnncli.run.checkpoint import save_checkpoint

    cfg = build_config({"model": {"layers": SEED_LAYERS}})
    model = build_model(cfg.model)
    plain = save_checkpoint(tmp_path / "plain.npz", model, cfg)
    assert load_checkpoint(plain).classes == ()
    named = save_checkpoint(tmp_path / "named.npz", model, cfg, classes=("a", "b"))
    assert load_checkpoint(named).classes == ("a", "b")
    with np.load(named, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["classes"] = np.array(json.dumps({"a": 1}))
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match=r"bad\.npz: the 'classes' entry must be a JSON list"):
        load_checkpoint(bad)
