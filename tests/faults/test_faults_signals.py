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


def test_ctrl_c_during_the_final_test_evaluation_then_resume_finishes_the_run(
        real_cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT sent while the test set is being evaluated (training done, every epoch saved): the message
    says what was saved, run.json keeps the evaluation pending, and the printed --resume runs the evaluation and
    finishes the run, with the accuracy `cnn eval` gives for best.npz."""
    import os

    from clihelp import stderr_of
    from faultkit import within

    import cnncli.run.train as train_mod

    real_evaluate = train_mod.evaluate
    n_test = 10_000  # the CIFAR-10 test set; the validation split is 200 images

    def interrupted_evaluate(model, x, *args, **kwargs):  # noqa: ANN001, ANN202
        if len(x) == n_test:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to this process's handler right here
        return real_evaluate(model, x, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "evaluate", interrupted_evaluate)
    with within(300, "training one epoch"):
        result = runner.invoke(app, ["train", "--config", str(SEED), "--data-dir", str(real_cifar_dir), "--out",
                                     str(run), "--epochs", "1", "--quiet", *SETS])
    err = " ".join(stderr_of(result).split())
    assert result.exit_code == 130, err
    assert "before a resumable checkpoint was saved" not in err and "Traceback" not in err
    assert (f"interrupted during the test evaluation; training is complete and saved (1 epoch(s): last epoch in "
            f"{run / 'last.npz'}, best in {run / 'best.npz'}); the test accuracy is not measured yet") in err
    resume = re.search(r"resume with: (cnn train --resume \S+ --data-dir \S+)", err)
    assert resume, err
    record = json.loads((run / "run.json").read_text())
    assert (record["state"], record["test_pending"], record["test_acc"], record["epochs_done"]) == \
        ("interrupted", True, None, 1)

    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    with within(300, "the resumed evaluation"):
        ok(runner.invoke(app, shlex.split(resume.group(1))[1:] + ["--quiet"]))
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "finished" and record["epochs_done"] == 1 and record.get("test_pending") is None
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # no epoch trained again
    evaluated = json.loads(ok(runner.invoke(app, ["eval", str(run / "best.npz"), "--data-dir", str(real_cifar_dir),
                                                  "--json"])))
    # the same images and weights: the same accuracy; the loss up to float32 summation order (micro-batches)
    assert record["test_acc"] == evaluated["accuracy"]
    assert record["test_loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    # finished now: a further --resume has nothing to do again
    again = runner.invoke(app, shlex.split(resume.group(1))[1:])
    assert again.exit_code == 1 and "nothing to train" in stderr_of(again)
