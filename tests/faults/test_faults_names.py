"""Names a user gives that become checkpoint keys or folders: layer names (model.layers[i].name, also inside a
residual block), a config's run name (the run folder under runs/) and a sweep's --name. Bad ones are one line
naming the key path and the value; good ones work end to end (a checkpoint keyed by them loads back)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from clihelp import one_line_error
from helpers import closed_port_url
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import build_config, load_config
from cnncli.host.names import RUN_NAME, check_name
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import apply_params, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
runner = CliRunner()
HEAD = [{"type": "flatten"}, {"type": "linear", "out_features": 10}]


def _config(tmp_path: Path, raw: dict, file: str = "cfg.yaml") -> Path:
    path = tmp_path / file
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("name", "why"), [
    ("../escape", "contains a path separator or '..'"),
    ("a/b", "contains a path separator or '..'"),
    ("a.b", "is not a valid name"),  # a dot would reach into another layer's keys ('res1.conv1.W')
    ("1conv", "is not a valid name"),
    ("conv 1", "is not a valid name"),
    ("naïve", "is not a valid name"),
    ("", "is not a valid name"),
    ("x" * 65, "is 65 characters long; a name has at most 64"),
    ("optim", "is reserved for the checkpoint's own entries (optim, config, state)"),
    ("State", "is reserved for the checkpoint's own entries"),
])
def test_bad_layer_names_are_one_line_naming_the_key(tmp_path: Path, name: str, why: str) -> None:
    cfg = _config(tmp_path, {"model": {"layers": [{"type": "conv", "name": name}, *HEAD]}})
    err = one_line_error(runner.invoke(app, ["summary", "--config", str(cfg)]))
    shown = repr(name if len(name) <= 80 else name[:77] + "...")
    assert f"model.layers[0].name: {shown} {why}" in err, err


def test_a_bad_name_inside_a_residual_block_is_named_with_its_path(tmp_path: Path) -> None:
    block = {"type": "residual", "layers": [{"type": "conv", "out_channels": 3, "padding": 1, "name": "config"}]}
    cfg = _config(tmp_path, {"model": {"layers": [{"type": "relu"}, block, *HEAD]}})
    err = one_line_error(runner.invoke(app, ["summary", "--config", str(cfg)]))
    assert "model.layers[1].layers[0].name: 'config' is reserved" in err, err


def test_a_stored_config_with_a_bad_layer_name_is_refused(tmp_path: Path) -> None:
    import json

    import numpy as np

    cfg = load_config(SEED)
    good = save_checkpoint(tmp_path / "good.npz", build_model(cfg.model), cfg)
    with np.load(good, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    raw = json.loads(str(arrays["config"]))
    raw["model"]["layers"][0]["name"] = "optim"  # its weights would be read back as an optimizer buffer 'W'
    arrays["config"] = np.array(json.dumps(raw))
    arrays["optim.W"] = arrays.pop("conv1.W")
    arrays["optim.b"] = arrays.pop("conv1.b")
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    err = one_line_error(runner.invoke(app, ["eval", str(bad)]))
    assert f"{bad}: stored config: model.layers[0].name: 'optim' is reserved" in err, err


def test_good_names_key_the_checkpoint_and_load_back(tmp_path: Path) -> None:
    names = ["conv_1", "Block-2", "a" * 64]
    layers = [{"type": "conv", "out_channels": 4, "padding": 1, "name": names[0]},
              {"type": "conv", "out_channels": 4, "padding": 1, "name": names[1]}, {"type": "flatten"},
              {"type": "linear", "name": names[2]}]
    cfg = build_config({"model": {"layers": layers}})
    path = save_checkpoint(tmp_path / "named.npz", build_model(cfg.model, seed=3), cfg)
    ck = load_checkpoint(path)
    assert set(ck.params) == {f"{n}.{p}" for n in names for p in ("W", "b")}
    model = build_model(cfg.model, seed=4)
    apply_params(ck, model, path)
    assert all((model.named_params()[k] == v).all() for k, v in ck.params.items())


NOTE = "(the config's name: its name: key, else its file's name)"


@pytest.mark.parametrize(("raw_name", "file", "expected"), [
    ("../../outside", "cfg.yaml", f"name: '../../outside' {NOTE} contains a path separator or '..'"),
    (None, "my config.yaml", f"name: 'my config' {NOTE} is not a valid name"),
    ("..", "cfg.yaml", f"name: '..' {NOTE} contains a path separator or '..'"),
])
def test_a_run_name_that_would_leave_runs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     raw_name: str | None, file: str, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    raw = {"model": {"layers": [{"type": "conv"}, *HEAD]}, **({"name": raw_name} if raw_name else {})}
    cfg = _config(tmp_path, raw, file)
    err = one_line_error(runner.invoke(app, ["train", "--config", str(cfg), "--data-dir", str(tmp_path / "none")]))
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [file]  # no runs/ folder, nothing outside it
    # with --out the name names no folder: the same config is accepted up to the data (missing here)
    if raw_name == "../../outside":
        monkeypatch.setenv("CNNCLI_CIFAR10_URL", closed_port_url())
        err = one_line_error(runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                                                 "--data-dir", str(tmp_path / "none")]))
        assert "name:" not in err and "127.0.0.1" in err  # refused for the download, not the name


def test_run_names_allow_dots_and_digits_but_not_dot_dot() -> None:
    for good in ("seed", "2024.05-run", "seed.v2", "a" * 64):
        assert check_name(good, "name", RUN_NAME) == good
    for bad in ("..", "a..b", ".hidden", "a/b", "a" * 65, "-x"):
        with pytest.raises(Exception, match=r"^name: "):
            check_name(bad, "name", RUN_NAME)


def test_a_sweep_name_that_makes_a_folder_outside_runs_is_refused(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(runner.invoke(app, ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.1,0.2",
                                             "--name", "../../elsewhere"]))
    assert "--name: '../../elsewhere' contains a path separator or '..'" in err, err
    assert list(tmp_path.iterdir()) == []
