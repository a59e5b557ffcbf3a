"""Nothing is overwritten that is not a regular file: every command that writes a path the user names (export
--onnx, trace --save / --png, plot's PNGs, checkpoints, run files) writes only a regular file or a new path.

Device nodes are made with os.mknod in a temporary folder (as root; skipped where not allowed) with the
numbers of /dev/null, so nothing is lost if a write did reach them. Before the fix, the rename of the atomic
write replaced each of them with a regular file (run as root, `--onnx /dev/null` would replace /dev/null).
Every test runs under a timer (a FIFO must not block the writer either)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clihelp import one_line_error
from faultkit import is_char_device, mkfifo, mknod_char, tiny_checkpoint, within
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.host.errors import StorageError

runner = CliRunner()
REFUSED = "not a regular file; refusing to write it (only a regular file or a new path is written)"


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest):
    with within(60, request.node.name):
        yield


def _special(tmp_path: Path, kind: str, name: str) -> tuple[Path, str]:
    """A path of `kind` (device, fifo, folder, link-to-device) and the words the refusal uses for it."""
    path = tmp_path / name
    if kind == "device":
        return mknod_char(path), "a character device"
    if kind == "fifo":
        return mkfifo(path), "a FIFO (named pipe)"
    if kind == "folder":
        path.mkdir()
        return path, "a folder"
    target = mknod_char(tmp_path / f"dev-{name}")
    path.symlink_to(target)
    return path, "a character device"


def _unchanged(path: Path, kind: str) -> None:
    if kind == "device":
        assert is_char_device(path)
    elif kind == "fifo":
        assert path.is_fifo()
    elif kind == "folder":
        assert path.is_dir() and not any(path.iterdir())
    else:
        assert path.is_symlink() and is_char_device(path.resolve())
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


@pytest.mark.parametrize("kind", ["device", "fifo", "folder", "link"])
def test_atomic_write_never_replaces_a_special_file(tmp_path: Path, kind: str) -> None:
    from cnncli.host.atomic import atomic_write

    path, words = _special(tmp_path, kind, "out.bin")
    with pytest.raises(StorageError) as info:
        with atomic_write(path) as f:
            f.write(b"data")
    assert str(info.value).startswith(f"{path}: is {words}, not a regular file")
    _unchanged(path, kind)


def test_atomic_write_still_replaces_a_regular_file_and_writes_a_new_path(tmp_path: Path) -> None:
    from cnncli.host.atomic import atomic_write

    old = tmp_path / "old.txt"
    old.write_text("before", encoding="utf-8")
    for path in (old, tmp_path / "sub" / "new.txt"):
        with atomic_write(path, binary=False) as f:
            f.write("after")
        assert path.read_text(encoding="utf-8") == "after"


@pytest.mark.parametrize("kind", ["device", "fifo", "link"])
def test_export_onnx_onto_a_special_file_is_refused(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("onnx")
    ckpt = tiny_checkpoint(tmp_path / "c.npz")
    path, words = _special(tmp_path, kind, "model.onnx")
    err = one_line_error(runner.invoke(app, ["export", str(ckpt), "--onnx", str(path)]))
    assert err == f"error: --onnx {path}: is {words}, {REFUSED}"
    _unchanged(path, kind)


@pytest.mark.parametrize(("option", "kind"), [("--save", "device"), ("--png", "fifo"), ("--save", "folder")])
def test_trace_outputs_onto_a_special_file_are_refused(tmp_path: Path, option: str, kind: str) -> None:
    if option == "--png":
        pytest.importorskip("matplotlib")
    ckpt = tiny_checkpoint(tmp_path / "c.npz")
    path, words = _special(tmp_path, kind, "t.out")
    err = one_line_error(runner.invoke(app, ["trace", str(ckpt), option, str(path), "--data-dir",
                                             str(tmp_path / "no-data-needed")]))
    tail = REFUSED if kind != "folder" else "not a regular file; give the name of a file to write"
    assert err == f"error: {option} {path}: is {words}, {tail}"  # before any data is read
    _unchanged(path, kind)


def _hand_made_run(folder: Path) -> Path:
    folder.mkdir()
    (folder / "metrics.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,images_per_s\n"
        "1,2.0,0.3,1.9,0.35,0.01,1.0,100\n2,1.5,0.45,1.6,0.42,0.01,1.0,100\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("kind", ["device", "link"])
def test_plot_onto_a_special_file_is_refused(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("matplotlib")
    run = _hand_made_run(tmp_path / "run")
    path, words = _special(run, kind, "learning_curves.png")
    err = one_line_error(runner.invoke(app, ["plot", str(run), "--no-confusion"]))
    assert err == f"error: {path}: is {words}, {REFUSED}"
    _unchanged(path, kind)


def test_a_checkpoint_onto_a_device_is_refused(tmp_path: Path) -> None:
    dev = mknod_char(tmp_path / "best.npz")
    with pytest.raises(StorageError, match="is a character device, not a regular file"):
        tiny_checkpoint(dev)
    assert is_char_device(dev) and os.listdir(tmp_path) == ["best.npz"]
