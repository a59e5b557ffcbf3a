"""Signals during `cnn train`: SIGTERM is handled like Ctrl-C (finish the step, save a resumable checkpoint, say how
to resume, exit 143), repeated signals still end cleanly (no traceback, no "Exception ignored", the checkpoint
loads), and a SIGTERM while the data loads ends with one line. The real `cnn` in a subprocess, tiny data slices;
the state machine of cnncli/host/signals.py is also checked in process with real signals.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from clihelp import ok
from faultkit import SEED, SETS, STEPS, copy_of_run, reference_run, runner, signalled, temp_files
from helpers import assert_same_training_state

from cnncli.cli.app import app
from cnncli.host.signals import stop_signals
from cnncli.run.checkpoint import load_checkpoint


def _clean_exit(proc: subprocess.CompletedProcess, code: int) -> list[str]:
    """The exit code, no traceback or 'Exception ignored' anywhere; returns stderr's lines."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text and "Exception ignored" not in text, text
    return proc.stderr.splitlines()


def test_sigterm_saves_a_resumable_checkpoint_exits_143_and_resumes_bit_identically(
        real_cifar_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = tmp_path / "run"
    proc = signalled(["--config", str(SEED), "--data-dir", str(real_cifar_dir), "--out", str(run), "--epochs", "50",
                      *SETS], [signal.SIGTERM])
    lines = _clean_exit(proc, 143)
    text = " ".join(proc.stderr.split())
    stopped = re.search(r"stopped by SIGTERM at epoch (\d+), batch (\d+); resumable checkpoint saved to (\S+)", text)
    assert stopped, proc.stderr
    epoch, batch = int(stopped.group(1)), int(stopped.group(2))
    assert Path(stopped.group(3)) == run / "last.npz"
    commands = [line for line in lines if line.startswith("resume with:")]
    assert len(commands) == 1 and f"cnn train --resume {run / 'last.npz'}" in commands[0], proc.stderr
    assert temp_files(run) == []
    assert json.loads((run / "run.json").read_text())["state"] == "interrupted"

    ck = load_checkpoint(run / "last.npz")
    assert ck.resumable and ck.state["step"] == (epoch - 1) * STEPS + batch
    expected = (epoch - 1, batch) if batch < STEPS else (epoch, 0)  # the step finished; mid-epoch or at its end
    assert (ck.state["epoch"], ck.state["batch"]) == expected

    # The printed command finishes the epoch (and one more): the same weights and optimizer buffers, bit for bit,
    # as a run that was never stopped.
    total = max(epoch, 2)
    ok(runner.invoke(app, shlex.split(commands[0].split(":", 1)[1])[1:] + ["--epochs", str(total)]))
    assert_same_training_state(reference_run(tmp_path_factory, real_cifar_dir, total) / "last.npz", run / "last.npz")


def test_double_ctrl_c_exits_cleanly_and_keeps_a_loadable_checkpoint(
        real_cifar_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = copy_of_run(tmp_path_factory, real_cifar_dir, tmp_path / "run")
    # Resumed for many epochs, then two Ctrl-C in quick succession: wherever the second lands (in a step, in the
    # checkpoint write, in the unwinding, at the interpreter's exit), the exit is clean.
    proc = signalled(["--resume", str(run / "last.npz"), "--data-dir", str(real_cifar_dir), "--epochs", "50"],
                     [signal.SIGINT, signal.SIGINT])
    lines = _clean_exit(proc, 130)
    assert lines and lines[0].startswith(("interrupted at epoch", "aborted by SIGINT")), lines
    assert temp_files(run) == []
    ck = load_checkpoint(run / "last.npz")  # intact: the first epoch's, or the one the first Ctrl-C saved
    assert ck.resumable and (ck.state["epoch"], ck.state["batch"]) >= (1, 0)
    assert json.loads((run / "run.json").read_text())["state"] == "interrupted"


def test_sigterm_while_the_data_loads_ends_with_one_line(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = signalled(["--config", str(SEED), "--data-dir", str(real_cifar_dir), "--out", str(run), "--epochs", "3",
                      *SETS], [signal.SIGTERM], after="resolved config", delay=0)
    lines = _clean_exit(proc, 143)
    # Most often the data is still loading (nothing to save); on a fast machine the loop may have begun.
    assert len(lines) in (1, 2) and lines[0].startswith(("aborted by SIGTERM", "stopped by SIGTERM")), lines
    if (run / "last.npz").exists():
        assert load_checkpoint(run / "last.npz").resumable


# ------------------------------------------------------------------------------ the handler, in process


def test_first_signal_is_a_request_inside_the_loop_and_a_second_one_aborts() -> None:
    with stop_signals() as stop:
        with stop.deferring():
            signal.raise_signal(signal.SIGTERM)
            assert stop.is_set() and stop.signum == signal.SIGTERM
            with stop.shielded():  # a checkpoint being written: a second signal waits
                signal.raise_signal(signal.SIGINT)
            assert stop.count == 2
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # on the way out: ignored
        assert stop.signum == signal.SIGTERM  # the first one decides the exit code
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_outside_the_loop_the_first_signal_aborts_and_later_ones_are_ignored() -> None:
    with stop_signals() as stop:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # would kill the process with the default handler
        assert stop.count == 2 and stop.leaving
