"""Bounded reads and recursion, and the right words: a metrics.csv of 1 GiB (sparse), with a 300 kB field,
a FIFO or a folder in its place; Python-API mappings nested 5,000 deep or holding themselves (bounded at 64
levels like YAML); a TensorBoard event file whose name a folder holds; image-folder class entries that are
symlink loops or dangling links. Each ends in one line that names the file or key, under a timer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import yaml
from clihelp import one_line_error
from faultkit import SEED, mkfifo, png, within
from typer.testing import CliRunner

import cnncli
from cnncli.cli.app import app
from cnncli.host.errors import CnnError, ConfigError, DataError

runner = CliRunner()
HEADER = "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,images_per_s\n"


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest):
    with within(60, request.node.name):
        yield


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return run


# ----------------------------------------------------------------------------------------- metrics.csv


def test_a_1_gib_sparse_metrics_csv_is_refused_unread(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    with open(run / "metrics.csv", "wb") as f:
        f.write(HEADER.encode())
        f.truncate(1024**3)  # 1 GiB, a hole after the header: one line of NUL bytes
    err = one_line_error(runner.invoke(app, ["plot", str(run), "--no-confusion"]))
    assert err == f"error: {run / 'metrics.csv'}: is 1.0 GiB, more than the 16.0 MiB a metrics.csv may be; " \
                  "refusing to read it"


def test_a_300_kb_field_in_metrics_csv_is_one_line(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    (run / "metrics.csv").write_text(HEADER + "1,2.0,0.3,1.9,0.35,0.01,1.0,100\n" + "2," + "9" * 300_000 + "\n",
                                     encoding="utf-8")
    err = one_line_error(runner.invoke(app, ["plot", str(run), "--no-confusion"]))
    assert err.startswith(f"error: {run / 'metrics.csv'}: line 3: not a metrics file (field larger than field limit")
    assert len(err) < 300


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_metrics_csv_that_is_a_fifo_or_folder_is_named_as_such(tmp_path: Path, kind: str) -> None:
    run = _run_folder(tmp_path)
    path = run / "metrics.csv"
    if kind == "fifo":
        mkfifo(path)
    else:
        path.mkdir()
    err = one_line_error(runner.invoke(app, ["plot", str(run), "--no-confusion"]))
    words = "a FIFO (named pipe)" if kind == "fifo" else "a folder"
    assert err == f"error: {path}: is {words}, not a regular file"


# ---------------------------------------------------------------------------- the Python API's mappings


def _seed() -> dict:
    return yaml.safe_load(SEED.read_text(encoding="utf-8"))


def _deep(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("where", ["config", "override"])
def test_api_mappings_nested_5000_deep_are_one_line(tmp_path: Path, where: str) -> None:
    raw = _seed()
    if where == "config":
        raw["data"] = _deep(5000)
        with pytest.raises(ConfigError, match=r"^config: nested deeper than 64 levels at data\.a\.a\.a"):
            cnncli.fit(raw, out=tmp_path / "run")
    else:
        with pytest.raises(ConfigError, match=r"^train: nested deeper than 64 levels at a\.a\.a"):
            cnncli.fit(raw, out=tmp_path / "run", train=_deep(5000))
    assert not (tmp_path / "run").exists()


def test_api_mappings_holding_themselves_are_one_line(tmp_path: Path) -> None:
    from cnncli.config import build_config

    raw = _seed()
    loop: dict = {"lr": 0.1}
    loop["again"] = loop
    raw["train"] = loop
    with pytest.raises(ConfigError) as info:
        cnncli.fit(raw, out=tmp_path / "run")
    assert str(info.value).startswith("config: nested deeper than 64 levels at train.again.again.again")
    layers: list = []
    layers.append(layers)
    raw = _seed()
    raw["model"]["layers"] = layers
    with pytest.raises(ConfigError, match=r"^nested deeper than 64 levels at model\.layers\[0\]\[0\]"):
        build_config(raw)


def test_api_mappings_at_the_yaml_limit_still_build_as_before() -> None:
    from cnncli.config import build_config
    from cnncli.host.safeload import MAX_DEPTH, too_deep

    assert too_deep(_deep(MAX_DEPTH - 1)) is None and too_deep(_deep(MAX_DEPTH)) is not None
    raw = _seed()
    raw["model"]["layers"][0]["out_channels"] = 8
    assert build_config(raw).model.layers[0].out_channels == 8


# ------------------------------------------------------------------------------------------- wrong words


def test_a_tensorboard_event_file_name_held_by_a_folder_is_one_line(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboardX")
    import tensorboardX.event_file_writer as efw

    from cnncli.config import load_config
    from cnncli.nn.model import build_model
    from cnncli.run.tb import TensorBoardLog

    now = 1_800_000_000.25
    monkeypatch.setattr(efw.time, "time", lambda: now)  # the event file's name holds the time
    taken = tmp_path / f"events.out.tfevents.{str(now)[:10]}.{socket.gethostname()}"
    taken.mkdir()
    with pytest.raises(CnnError) as info:
        TensorBoardLog(tmp_path, build_model(load_config(SEED).model, seed=0))
    assert str(info.value) == f"{taken}: cannot write the TensorBoard event file: Is a directory (EISDIR)"
    assert time.time() == now  # (the patch was in force)


def _class_set(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        png(root / cls / "0.png")
    return root


def test_a_class_entry_that_is_a_symlink_loop_is_named(tmp_path: Path) -> None:
    from cnncli.data.images import load_image_folder

    root = _class_set(tmp_path / "set")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(DataError) as info:
        load_image_folder(root, (3, 32, 32))
    assert str(info.value) == f"{root / 'loop'}: cannot use this class entry: Too many levels of symbolic links " \
                              "(ELOOP)"


def test_a_dangling_class_link_is_refused_not_skipped(tmp_path: Path) -> None:
    from cnncli.data.images import load_image_folder

    root = _class_set(tmp_path / "set")
    (root / "bird").symlink_to(tmp_path / "moved-away")
    with pytest.raises(DataError) as info:
        load_image_folder(root, (3, 32, 32))
    assert str(info.value) == f"{root / 'bird'}: a symbolic link to nothing ({str(tmp_path / 'moved-away')!r} " \
                              "does not exist); remove it or point it at a class folder"
    (root / "bird").unlink()
    (root / "bird").symlink_to(root / "cat")  # a link to a real folder is a class like any other
    assert load_image_folder(root, (3, 32, 32))[4] == ("bird", "cat", "dog")
