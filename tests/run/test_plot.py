"""`cnn plot` and `cnncli/run/plot.py`: learning curves and confusion matrix of a real (tiny) training run.

The run folder is made by training for real: `cnn train` on 1,000 images (200 held out) for 2 epochs. The PNGs
are checked by their bytes (signature, IHDR size, non-trivial length). Tests that draw need matplotlib (the
viz extra, installed in CI) and use `pytest.importorskip`; the missing-matplotlib path is simulated by making
`import matplotlib` fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import one_line_error as _one_line_error
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.run.plot import INSTALL_HINT, Metrics, learning_curves_png, read_metrics
from cnncli.run.train import METRIC_FIELDS

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

runner = CliRunner()


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, after checking its signature and a non-trivial size."""
    blob = path.read_bytes()
    assert blob.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert blob[12:16] == b"IHDR"
    assert len(blob) > 10_000, f"{path} is suspiciously small ({len(blob)} bytes)"
    return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")


@pytest.fixture(scope="module")
def run_dir(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "seed-run"
    result = runner.invoke(app, [
        "train", "--config", str(SEED), "--data-dir", str(real_cifar_dir), "--set", "data.limit=1000",
        "--set", "data.val_size=200", "--epochs", "2", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _write_metrics(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(METRIC_FIELDS)] + [",".join(str(r.get(k, "")) for k in METRIC_FIELDS) for r in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


ROW = {"train_loss": 2.1, "train_acc": 0.2, "val_loss": 2.0, "val_acc": 0.25, "lr": 0.01, "seconds": 1.0,
       "images_per_s": 500.0}  # fmt: skip


# ----------------------------------------------------------------------------------------- metrics.csv


def test_read_metrics_of_a_real_run(run_dir: Path) -> None:
    m = read_metrics(run_dir)
    assert m.epoch.tolist() == [1, 2]
    assert m.has_validation and np.isfinite(m.val_acc).all()
    assert ((0 <= m.train_acc) & (m.train_acc <= 1)).all() and (m.lr > 0).all()


def test_read_metrics_without_validation(tmp_path: Path) -> None:
    folder = _write_metrics(tmp_path / "r", [{**ROW, "epoch": 1, "val_loss": "", "val_acc": ""}])
    m = read_metrics(folder)
    assert not m.has_validation and np.isnan(m.val_loss).all()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "missing", "run folder not found"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a folder"),
        (lambda p: p, "metrics.csv: not found"),
        (lambda p: _write_metrics(p / "r", []), "metrics.csv: no epochs"),
        (lambda p: _write_metrics(p / "r", [{**ROW, "epoch": 1, "train_loss": "oops"}]),
         "metrics.csv: line 2: train_loss is 'oops', not a number"),
        (lambda p: (p / "metrics.csv").write_text("a,b\n1,2\n") and p, "metrics.csv: not a metrics file"),
    ],
    ids=["no-folder", "a-file", "no-metrics", "empty", "bad-number", "bad-header"],
)
def test_cli_plot_bad_run_dir(make, needle: str, tmp_path: Path) -> None:
    """One line naming the folder or file, exit 1 — with or without matplotlib (checked before drawing)."""
    target = make(tmp_path)
    err = _one_line_error(runner.invoke(app, ["plot", str(target), "--no-confusion"]))
    assert needle in err, err
    assert str(target) in err


# ---------------------------------------------------------------------------------------------- drawing


def test_cli_plot_writes_pngs(run_dir: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    result = runner.invoke(app, ["plot", str(run_dir), "--out", str(out), "--data-dir", str(real_cifar_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "gradflow.png", "learning_curves.png"]
    w, h = _png_size(out / "learning_curves.png")
    assert w > 1000 and h > 300
    w, h = _png_size(out / "confusion.png")
    assert w > 600 and h > 600
    assert "accuracy" in result.output and "wrote" in result.output


def test_cli_plot_defaults_to_the_run_folder_and_needs_best_npz(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    copy = _write_metrics(tmp_path / "copy", [])
    (copy / "metrics.csv").write_text((run_dir / "metrics.csv").read_text(encoding="utf-8"), encoding="utf-8")
    result = runner.invoke(app, ["plot", str(copy), "--no-confusion"])
    assert result.exit_code == 0, result.output
    _png_size(copy / "learning_curves.png")
    err = _one_line_error(runner.invoke(app, ["plot", str(copy)]))
    assert str(copy / "best.npz") in err and "not found" in err


def test_learning_curves_without_validation(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    e = np.arange(1, 4)
    m = Metrics(epoch=e, train_loss=np.array([2.0, 1.5, 1.2]), train_acc=np.array([0.2, 0.4, 0.5]),
                val_loss=np.full(3, np.nan), val_acc=np.full(3, np.nan), lr=np.array([0.01, 0.005, 0.001]))
    _png_size(learning_curves_png(m, tmp_path / "c.png"))


def test_cli_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`import matplotlib` fails: one line saying what to install, exit 1, nothing written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    folder = _write_metrics(tmp_path / "r", [{**ROW, "epoch": 1}])
    err = _one_line_error(runner.invoke(app, ["plot", str(folder)]))
    assert err == f"error: {INSTALL_HINT}"
    assert "pip install 'cnncli[viz]'" in err
    assert not list(folder.glob("*.png"))


def test_plot_and_eval_of_a_run_read_the_data_folder_it_recorded(
        run_dir: Path, real_cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --data-dir, no $CNNCLI_DATA, an empty cache and a mirror that refuses connections: the run's run.json
    names the folder it read, and plot and eval use it (and say so) instead of downloading CIFAR-10."""
    import json

    from clihelp import stderr_of

    pytest.importorskip("matplotlib")
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert Path(record["data_dir"]) == real_cifar_dir.resolve()
    monkeypatch.delenv("CNNCLI_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CNNCLI_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # a download fails
    note = f"note: reading the data the run used, {real_cifar_dir.resolve()} (from its run.json; --data-dir to change)"
    result = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    assert note in " ".join(stderr_of(result).split())
    assert (tmp_path / "pics" / "confusion.png").is_file()
    result = runner.invoke(app, ["eval", str(run_dir / "best.npz"), "--json"])
    assert result.exit_code == 0, result.output
    assert note in " ".join(stderr_of(result).split())
    monkeypatch.setenv("CNNCLI_DATA", str(real_cifar_dir))
    given = runner.invoke(app, ["eval", str(run_dir / "best.npz"), "--json", "--data-dir", str(real_cifar_dir)])
    assert json.loads(result.stdout) == json.loads(given.stdout) and "note:" not in stderr_of(given)
