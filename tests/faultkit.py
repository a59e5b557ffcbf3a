"""Shared by the fault tests (tests/test_faults_*.py): tiny real-data runs, cached for the whole session so that
several tests compare against the same uninterrupted run, and a `cnn train` subprocess that is sent signals."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from clihelp import ok
from typer.testing import CliRunner

from cnncli.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "configs" / "seed.yaml"
# 1,800 training images (15 steps of 128), 200 held out. A constant schedule: the learning rates do not depend on
# the planned epochs, so a stopped run finished with --epochs E ends where an uninterrupted E-epoch run ends.
SETS = ["--set", "data.limit=2000", "--set", "data.val_size=200", "--set", "train.schedule={type: constant}",
        "--set", "train.optimizer.lr=0.005"]
STEPS = 15
runner = CliRunner()
_CACHE: dict[tuple[str, int], Path] = {}


def cnn() -> str:
    exe = Path(sys.executable).parent / "cnn"
    found = str(exe) if exe.exists() else shutil.which("cnn")
    assert found, "the cnn console script is not installed"
    return found


def train(data: Path, *args: str):
    """`cnn train --data-dir DATA ARGS…` in process (CliRunner)."""
    return runner.invoke(app, ["train", "--data-dir", str(data), *args])


def reference_run(factory: pytest.TempPathFactory, data: Path, epochs: int) -> Path:
    """An uninterrupted run of the seed config with SETS for `epochs` epochs (made once per session)."""
    key = ("reference", epochs)
    if key not in _CACHE:
        run = factory.mktemp("reference") / f"run-{epochs}"
        ok(train(data, "--config", str(SEED), "--out", str(run), "--epochs", str(epochs), *SETS))
        _CACHE[key] = run
    return _CACHE[key]


def copy_of_run(factory: pytest.TempPathFactory, data: Path, dest: Path, epochs: int = 1) -> Path:
    """A copy (at `dest`) of `reference_run(epochs)`, for a test to resume, break or damage."""
    shutil.copytree(reference_run(factory, data, epochs), dest)
    (dest / ".cnn-train.lock").unlink(missing_ok=True)
    return dest


def signalled(args: list[str], signals: list[int], *, after: str = "run folder:", delay: float = 0.3,
              gap: float = 0.02) -> subprocess.CompletedProcess:
    """Start `cnn train ARGS`, wait for the stdout line starting with `after`, then send `signals`, `gap` s apart."""
    proc = subprocess.Popen([cnn(), "train", *args], env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(after):
            break
    time.sleep(delay)
    for s in signals:
        proc.send_signal(s)
        time.sleep(gap)
    try:
        rest, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest, err)


def temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------ hostile files (#25)


class Hung(BaseException):
    """Raised by `within` when the block outlives its time: the code under test hangs (a BaseException, so that
    no `except Exception` in the code under test can swallow it)."""


@contextmanager
def within(seconds: float, what: str = "the call") -> Iterator[None]:
    """Run the block under a SIGALRM timer: `Hung` when it is still running after `seconds` (a blocking open()
    or read() of a FIFO is interrupted too: the signal's handler raising ends the retried system call)."""

    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"{what} still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


NULL_DEVICE = (1, 3)  # major, minor of /dev/null: reads end at once, writes vanish
ZERO_DEVICE = (1, 5)  # /dev/zero: reads never end


def mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def mknod_char(path: Path, device: tuple[int, int] = NULL_DEVICE) -> Path:
    """A character device node at `path` (as root); the test is skipped where the machine forbids mknod."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(*device))
    except PermissionError:
        pytest.skip("mknod is not allowed here (not root, or a container without CAP_MKNOD)")
    return path


def is_char_device(path: Path) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


def symlink_loops(folder: Path) -> Path:
    """`folder` with two symlinks back to itself (a/l1 -> a, a/l2 -> a): Python's glob('**') finds 2^40 paths."""
    (folder / "l1").symlink_to(folder, target_is_directory=True)
    (folder / "l2").symlink_to(folder, target_is_directory=True)
    return folder


def tiny_checkpoint(path: Path, classes: tuple[str, ...] | None = None, dataset: str | None = None) -> Path:
    """The seed network, untrained, saved as a checkpoint with a resolved normalisation (what `cnn predict`,
    `cnn export` and `cnn trace` need), with `classes` stored when given."""
    from dataclasses import replace

    from cnncli.config import NormalizeConfig, load_config
    from cnncli.nn.model import build_model
    from cnncli.run.checkpoint import save_checkpoint

    cfg = load_config(SEED)
    data = replace(cfg.data, normalize=NormalizeConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    if dataset is not None:
        data = replace(data, dataset=dataset)
    cfg = replace(cfg, data=data)
    return save_checkpoint(path, build_model(cfg.model, seed=0), cfg, classes=classes)


def png(path: Path, side: int = 32, value: int = 128) -> Path:
    """A small RGB PNG of one grey value."""
    from PIL import Image

    Image.new("RGB", (side, side), (value, value, 255 - value)).save(path, format="PNG")
    return path
