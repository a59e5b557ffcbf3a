"""Disks and folders: a file too large (RLIMIT_FSIZE gives a real EFBIG) or a full disk (ENOSPC, injected) while
saving, a kill -9 in the middle of a save, a read-only, special-file or file-blocked --out. Each ends with one line
naming the path and the OS reason, exit 1, the previous checkpoint intact and loadable, no temporary files left
(or, after a kill -9, removed by the next run), and --resume working. The folder is checked before the data loads:
those errors come before the resolved config is printed.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok, one_line_error
from faultkit import SEED, SETS, cnn, copy_of_run, reference_run, temp_files, train
from helpers import assert_same_training_state

from cnncli.run.checkpoint import load_checkpoint

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.startswith("error:") and "\n" not in err, err
    return err


def test_file_too_large_while_saving_keeps_the_previous_checkpoint_and_resumes(
        real_cifar_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = copy_of_run(tmp_path_factory, real_cifar_dir, tmp_path / "run")
    before = (run / "last.npz").read_bytes()
    assert len(before) > 100_000  # the seed network's checkpoint; config.yaml and run.json are far smaller

    def limit_file_size() -> None:  # writes past 100 kB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([cnn(), "train", "--resume", str(run / "last.npz"), "--data-dir", str(real_cifar_dir),
                           "--epochs", "2"], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size)
    err = _one_line(proc)
    assert str(run / "last.npz") in err and "File too large (EFBIG)" in err and "previous content" in err
    assert (run / "last.npz").read_bytes() == before and temp_files(run) == []
    assert load_checkpoint(run / "last.npz").state["epoch"] == 1
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "failed" and "EFBIG" in record["error"]
    # Room again: the same command ends where an uninterrupted two-epoch run ends.
    ok(train(real_cifar_dir, "--resume", str(run / "last.npz"), "--epochs", "2"))
    assert_same_training_state(reference_run(tmp_path_factory, real_cifar_dir, 2) / "last.npz", run / "last.npz")


def test_full_disk_while_writing_metrics_is_one_line_and_nothing_half_written(
        real_cifar_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_of_run(tmp_path_factory, real_cifar_dir, tmp_path / "run")
    metrics_before = (run / "metrics.csv").read_bytes()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the disk fills up exactly when metrics.csv is flushed
        if ".metrics.csv." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    err = one_line_error(train(real_cifar_dir, "--resume", str(run / "last.npz"), "--epochs", "2"))
    monkeypatch.undo()
    assert str(run / "metrics.csv") in err and "No space left on device (ENOSPC)" in err
    assert (run / "metrics.csv").read_bytes() == metrics_before and temp_files(run) == []
    assert load_checkpoint(run / "last.npz").state["epoch"] == 2  # written just before, complete
    ok(train(real_cifar_dir, "--resume", str(run / "last.npz"), "--epochs", "3"))
    assert (run / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs: rewritten from the history


KILL_DURING_SAVE = """
import os, signal, sys
real = os.fsync
def fsync(fd):
    if ".last.npz." in os.readlink(f"/proc/self/fd/{fd}"):
        os.kill(os.getpid(), signal.SIGKILL)  # the new checkpoint is written but not yet renamed
    real(fd)
os.fsync = fsync
from cnncli.cli.app import main
sys.argv = ["cnn", *sys.argv[1:]]
main()
"""


def test_kill_9_during_a_save_keeps_the_checkpoint_and_the_next_run_removes_the_temporary_file(
        real_cifar_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = copy_of_run(tmp_path_factory, real_cifar_dir, tmp_path / "run")
    before = (run / "last.npz").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "train", "--resume", str(run / "last.npz"),
                           "--data-dir", str(real_cifar_dir), "--epochs", "2"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = temp_files(run)
    assert len(left) == 1 and left[0].startswith(".last.npz."), left
    assert (run / "last.npz").read_bytes() == before  # never half-written
    (run / "notes.last.npz.tmp").write_text("mine")  # not a name atomic_write makes: kept
    stdout = ok(train(real_cifar_dir, "--resume", str(run / "last.npz"), "--epochs", "2"))
    assert "removed 1 temporary file(s) left by a run killed while saving" in stdout and left[0] in stdout
    assert temp_files(run) == ["notes.last.npz.tmp"]
    assert load_checkpoint(run / "last.npz").state["epoch"] == 2


def _without_dac_override() -> None:
    """In the child, before exec: drop root's power to write where the permission bits say no (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH leave the bounding set, so the exec'd process runs without them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def test_read_only_out_is_one_line_before_the_data_loads(real_cifar_dir: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    try:
        probe = subprocess.run(["sh", "-c", f"touch {ro}/probe"], preexec_fn=preexec, capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this process may write into a read-only folder (root without a capability bounding set)")
        out = ro / "run"
        proc = subprocess.run([cnn(), "train", "--config", str(SEED), "--data-dir", str(real_cifar_dir),
                               "--out", str(out), *SETS], env=ENV, capture_output=True, text=True, timeout=120,
                              preexec_fn=preexec)
        err = _one_line(proc)
        assert f"{out}: cannot create the run folder in {ro}: Permission denied (EACCES)" in err
        assert "resolved config" not in proc.stdout  # refused before the data loaded
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)


@pytest.mark.parametrize("kind", ["file", "under-a-file", "fifo", "device", "broken-link"])
def test_out_that_cannot_be_a_folder_is_one_line(real_cifar_dir: Path, tmp_path: Path, kind: str) -> None:
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("a file")
        expected = f"{out}: is a file, not a folder"
    elif kind == "under-a-file":
        (tmp_path / "taken").write_text("a file")
        out = tmp_path / "taken" / "run"
        expected = f"{out}: lies under {tmp_path / 'taken'}, which is a file, not a folder"
    elif kind == "fifo":
        out = tmp_path / "pipe"
        os.mkfifo(out)
        expected = f"{out}: is a FIFO (named pipe), not a folder"
    elif kind == "device":
        out = Path("/dev/null")
        expected = "/dev/null: is a character device, not a folder"
    else:
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "gone")
        expected = f"{out}: is a symbolic link to a missing target"
    result = train(real_cifar_dir, "--config", str(SEED), "--out", str(out), *SETS)
    err = one_line_error(result)
    assert expected in err, err
    assert "resolved config" not in result.stdout  # before the data loaded
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(out).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == {"file": ["taken"], "under-a-file": ["taken"],
                                                          "fifo": ["pipe"], "device": [], "broken-link": ["link"]}[kind]


def test_atomic_write_names_the_path_and_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnncli.host.atomic import atomic_write
    from cnncli.host.errors import StorageError

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as info, atomic_write(target) as f:
        f.write(np.zeros(10).tobytes())
    assert str(info.value) == f"{target}: cannot write: No space left on device (ENOSPC); the file keeps its " \
                              "previous content"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)  # callers catching OSError still do
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
