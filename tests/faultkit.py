"""Shared by the fault tests (tests/test_faults_*.py): tiny real-data runs, cached for the whole session so that
several tests compare against the same uninterrupted run, and a `cnn train` subprocess that is sent signals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
