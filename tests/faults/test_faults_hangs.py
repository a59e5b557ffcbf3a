"""Nothing hangs: FIFOs, devices and symlink loops wherever a command reads a path it was given or found.

Real FIFOs (os.mkfifo) and device nodes (os.mknod, as root; skipped where the machine forbids it) in a
temporary folder. Every test here runs under a SIGALRM timer (`faultkit.within`): before the fix each of
them blocked forever in open() or read(), or walked a symlink loop at full CPU, and the timer turned that
into a failure instead of a stuck test run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import one_line_error, stderr_of, stdout_of
from faultkit import (
    ZERO_DEVICE,
    mkfifo,
    mknod_char,
    png,
    symlink_loops,
    tiny_checkpoint,
    within,
)
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.host.errors import CnnError, DataError

pytest.importorskip("PIL.Image")
runner = CliRunner()
LIMIT = 30  # seconds; each of these finishes in well under one when nothing hangs


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest):
    with within(LIMIT, request.node.name):
        yield


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "c.npz", classes=tuple(f"class{i}" for i in range(10)))


# --------------------------------------------------------------------------------------------- predict


def test_a_fifo_among_predict_arguments_is_named_and_the_others_are_classified(tmp_path: Path, ckpt: Path) -> None:
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png", value=10)
    fifo = mkfifo(tmp_path / "pipe.png")
    result = runner.invoke(app, ["predict", str(ckpt), str(a), str(fifo), str(b)])
    assert result.exit_code == 1
    lines = stdout_of(result).splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(a), str(b)]  # the images before and after it
    assert stderr_of(result).strip() == f"error: {fifo}: is a FIFO (named pipe), not a regular file"


def test_a_fifo_and_a_device_inside_a_predict_folder(tmp_path: Path, ckpt: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    png(folder / "a.png")
    mkfifo(folder / "b.png")
    mknod_char(folder / "c.jpg", ZERO_DEVICE)  # /dev/zero would be read for ever
    png(folder / "d.png")
    result = runner.invoke(app, ["predict", str(ckpt), str(folder)])
    assert result.exit_code == 1
    assert [line.split(": ")[0] for line in stdout_of(result).splitlines()] == [str(folder / "a.png"),
                                                                                str(folder / "d.png")]
    assert stderr_of(result).splitlines() == [f"error: {folder / 'b.png'}: is a FIFO (named pipe), not a regular file",
                                              f"error: {folder / 'c.jpg'}: is a character device, not a regular file"]


def test_classifier_predict_files_with_a_fifo(tmp_path: Path, ckpt: Path) -> None:
    from cnncli.run.predict import Classifier, Failure, Prediction

    fifo = mkfifo(tmp_path / "x.png")
    got = Classifier.from_checkpoint(ckpt).predict_files([fifo, png(tmp_path / "y.png")])
    assert isinstance(got[0], Failure) and got[0].message == f"{fifo}: is a FIFO (named pipe), not a regular file"
    assert isinstance(got[1], Prediction)


def test_a_glob_through_symlink_loops_ends_and_takes_each_image_once(tmp_path: Path, ckpt: Path) -> None:
    from cnncli.run.predict import image_inputs

    top = tmp_path / "a"
    (top / "sub").mkdir(parents=True)
    png(top / "one.png")
    png(top / "sub" / "two.png")
    symlink_loops(top)
    symlink_loops(top / "sub")
    found = image_inputs([f"{top}/**/*.png"])
    assert found == [top / "one.png", top / "sub" / "two.png"]
    # the pattern matching the loops themselves: they are folders reached through links, each image once
    assert image_inputs([f"{top}/**"]) == found
    result = runner.invoke(app, ["predict", str(ckpt), f"{top}/**/*.png"])
    assert result.exit_code == 0 and len(stdout_of(result).splitlines()) == 2


def test_glob_matches_what_python_glob_matches_without_links(tmp_path: Path) -> None:
    import glob

    from cnncli.run.predict import safe_glob

    for rel in ["x.png", "d/y.png", "d/e/z.PNG", "d/.hidden/h.png", ".top.png", "d/e/f/w.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    for pattern in ["**/*.png", "**", "d/**/*", "*/**/*.jpg", "**/e/*", "d/*/*.PNG", "**/.hidden/*"]:
        full = f"{tmp_path}/{pattern}"
        assert safe_glob(full) == sorted(glob.glob(full, recursive=True)), pattern
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert safe_glob("**/*.png") == sorted(glob.glob("**/*.png", recursive=True))
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------------- image-folder data set


def _folder_set(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        png(root / cls / "0.png")
    return root


def test_a_fifo_in_an_image_folder_data_set_is_refused_by_name(tmp_path: Path) -> None:
    from cnncli.data.images import load_image_folder

    root = _folder_set(tmp_path / "set")
    fifo = mkfifo(root / "dog" / "1.png")
    with pytest.raises(DataError) as info:
        load_image_folder(root, (3, 32, 32))
    assert str(info.value) == f"{fifo}: is a FIFO (named pipe), not a regular file"


def test_a_device_in_an_image_folder_data_set_is_refused_by_name(tmp_path: Path) -> None:
    from cnncli.data.images import load_image_folder

    root = _folder_set(tmp_path / "set")
    dev = mknod_char(root / "cat" / "1.jpg", ZERO_DEVICE)
    with pytest.raises(DataError, match=f"^{dev}: is a character device, not a regular file$"):
        load_image_folder(root, (3, 32, 32))


# ------------------------------------------------------------------------------------- sweep journal


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_sweep_journal_that_is_a_fifo_or_dev_zero_is_refused(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("optuna")
    journal = mkfifo(tmp_path / "j.log") if kind == "fifo" else mknod_char(tmp_path / "j.log", ZERO_DEVICE)
    # in a child process with an address-space cap: before the fix /dev/zero grew memory at 0.5 GB/s
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from cnncli.run.sweep import open_storage; from cnncli.host.errors import ConfigError\n"
            "try:\n    open_storage(sys.argv[1], '.')\nexcept ConfigError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(journal)], capture_output=True, text=True,
                          timeout=LIMIT - 5, cwd=tmp_path)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    expected = f"--storage {journal}: is {what}, not a journal file (a regular file or a new path)"
    assert proc.stdout.strip() == expected, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- other readers of a path


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_layers_file_that_is_a_fifo_or_device_is_named(tmp_path: Path, kind: str) -> None:
    path = mkfifo(tmp_path / "l.py") if kind == "fifo" else mknod_char(tmp_path / "l.py", ZERO_DEVICE)
    err = one_line_error(runner.invoke(app, ["summary", "--layers", str(path)]))
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert err == f"error: --layers {path}: is {what}, not a Python file of Layer subclasses"


def test_a_fifo_among_the_mnist_files_is_named(tmp_path: Path) -> None:
    from cnncli.data.mnist import IDX_FILES

    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in IDX_FILES[:-1]:
        (folder / name).write_bytes(b"\x1f\x8b")
    fifo = mkfifo(folder / IDX_FILES[-1])
    (tmp_path / "c.yaml").write_text("data: {dataset: mnist}\nmodel: {layers: [{type: flatten}, "
                                     "{type: linear, out_features: 10}]}\n", encoding="utf-8")
    for data_dir in (folder, tmp_path):
        err = one_line_error(runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--data-dir",
                                                 str(data_dir), "--out", str(tmp_path / "run")]))
        assert err == f"error: {fifo}: is a FIFO (named pipe), not a regular file; the four MNIST files must be " \
                      "regular files"


def test_a_fifo_among_the_cifar_files_is_named(tmp_path: Path) -> None:
    from cnncli.config import DataConfig
    from cnncli.data import ensure_dataset

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    fifo = mkfifo(folder / "data_batch_1")
    with pytest.raises(CnnError, match=f"^{fifo}: is a FIFO \\(named pipe\\), not a regular file"):
        ensure_dataset(DataConfig(), tmp_path, lambda done, total: None)


def test_a_folder_that_cannot_be_listed_stops_only_itself(tmp_path: Path, ckpt: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`cnn predict CKPT unreadable/ ok.png`: the folder is one error line, ok.png is still classified. (As root
    no folder is unreadable, so the listing's failure is made by os.walk's error callback, as the OS would.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    png(locked / "hidden-from-us.png")
    ok_png = png(tmp_path / "ok.png")
    real_walk = os.walk

    def walk(top, *args, **kwargs):  # noqa: ANN001, ANN202
        if Path(top) == locked:
            kwargs["onerror"](PermissionError(13, "Permission denied", str(locked)))
            return iter(())
        return real_walk(top, *args, **kwargs)

    monkeypatch.setattr(os, "walk", walk)
    result = runner.invoke(app, ["predict", str(ckpt), str(locked), str(ok_png)])
    assert result.exit_code == 1
    assert [line.split(": ")[0] for line in stdout_of(result).splitlines()] == [str(ok_png)]
    assert stderr_of(result).strip() == f"error: cannot list {locked}: Permission denied"
