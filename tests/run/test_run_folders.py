"""A run folder belongs to one run: a new `cnn train` into a folder that holds a run is refused (unless
--overwrite), and a folder in use by a running `cnn train` is refused even with --overwrite."""

from __future__ import annotations

from pathlib import Path

from clihelp import ok, one_line_error
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.run.train import lock_run_dir

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
runner = CliRunner()
SMALL = ["--set", "data.limit=600", "--set", "data.val_size=100", "--epochs", "1"]


def _train(data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--config", str(SEED), "--data-dir", str(data), "--out", str(out),
                               *SMALL, *extra])


def test_an_earlier_run_is_never_replaced_silently(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(_train(real_cifar_dir, run))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    err = one_line_error(_train(real_cifar_dir, run, "--seed", "5"))
    assert str(run) in err and "earlier run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing rewritten
    ok(_train(real_cifar_dir, run, "--seed", "5", "--overwrite"))
    assert (run / "best.npz").read_bytes() != before["best.npz"]


def test_a_folder_in_use_by_another_run_is_refused(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "busy"
    run.mkdir()
    held = lock_run_dir(run)  # as a running `cnn train` holds it
    try:
        err = one_line_error(_train(real_cifar_dir, run, "--overwrite"))
        assert str(run) in err and "another cnn train is running" in err
        assert not (run / "config.yaml").exists()
    finally:
        held.close()
    ok(_train(real_cifar_dir, run, "--overwrite"))  # free again once the other run ends
