"""`cnn runs` and run.json: a real `cnn train` records its state, overrides and test accuracy; hand-made run
folders cover the other states (a dead `running` process reads as interrupted), nested folders are found, and
`--json` gives one object per run. Grouping runs by config-but-the-seed, the mean ± spread of curves, and the
`cnn plot` overlay of several runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from clihelp import ok, one_line_error
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import config_to_dict, load_config
from cnncli.run.plot import band
from cnncli.run.runs import group_runs, list_runs, short_key
from cnncli.run.train import METRIC_FIELDS

SEED = Path(__file__).resolve().parents[2] / "configs" / "seed.yaml"
runner = CliRunner()


def _fake_run(folder: Path, overrides: list[str], val_accs: list[float], record: dict | None = None) -> Path:
    """A run folder as cnn train leaves it, with chosen numbers: config.yaml, metrics.csv, run.json."""
    folder.mkdir(parents=True)
    cfg = load_config(SEED, overrides)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)), encoding="utf-8")
    rows = [",".join(METRIC_FIELDS)]
    for i, v in enumerate(val_accs, start=1):
        rows.append(f"{i},{2.0 - 0.1 * i},{v - 0.05},{1.9 - 0.1 * i},{v},0.01,1.5,100")
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if record is not None:
        (folder / "run.json").write_text(json.dumps({"overrides": overrides, **record}), encoding="utf-8")
    return folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_real_train_run_records_finished_state_overrides_and_test_accuracy(real_cifar_dir: Path,
                                                                              tmp_path: Path) -> None:
    run = tmp_path / "runs" / "one"
    sets = ["data.limit=512", "data.val_size=128"]
    out = ok(runner.invoke(app, ["train", "--config", str(SEED), "--data-dir", str(real_cifar_dir),
                                 *(a for s in sets for a in ("--set", s)), "--epochs", "1", "--out", str(run)]))
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "finished" and record["overrides"] == [*sets, "train.epochs=1"]
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert f"{100 * record['test_acc']:.2f}%" in out  # the number the summary printed
    [summary] = list_runs(tmp_path / "runs")
    assert (summary.state, summary.epochs_done, summary.epochs, summary.test_acc) == ("finished", 1, 1,
                                                                                     record["test_acc"])


def test_states_overrides_and_json_of_hand_made_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    host = socket.gethostname()
    _fake_run(root / "a", ["train.optimizer.lr=0.1"], [0.2, 0.3],
              {"state": "finished", "test_acc": 0.28, "epochs": 2})
    _fake_run(root / "sweep" / "trial-0001", ["seed=1"], [0.25],
              {"state": "running", "host": host, "pid": _dead_pid(), "epochs": 3})
    _fake_run(root / "sweep" / "trial-0002", [], [0.1], {"state": "running", "host": host, "pid": os.getpid()})
    _fake_run(root / "b", [], [0.1], {"state": "failed", "error": "the loss became nan"})
    _fake_run(root / "old", ["train.epochs=2"], [0.1, 0.4])  # no run.json: 2 of 2 epochs -> finished
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("x")

    result = runner.invoke(app, ["runs", str(root), "--json"])
    runs = {r["path"]: r for r in map(json.loads, ok(result).splitlines())}  # one object per line
    assert sorted(runs) == ["a", "b", "old", "sweep/trial-0001", "sweep/trial-0002"]
    assert runs["a"]["state"] == "finished" and runs["a"]["best_val_acc"] == 0.3 and runs["a"]["best_epoch"] == 2
    assert runs["a"]["overrides"] == ["train.optimizer.lr=0.1"] and runs["a"]["test_acc"] == 0.28
    assert runs["a"]["seconds"] == pytest.approx(3.0)
    assert runs["sweep/trial-0001"]["state"] == "interrupted"  # its process is gone
    assert runs["sweep/trial-0002"]["state"] == "running"  # this process is alive
    assert runs["b"]["state"] == "failed" and runs["b"]["error"] == "the loss became nan"
    assert runs["old"]["state"] == "finished" and runs["old"]["config"] == "seed"

    table = ok(runner.invoke(app, ["runs", str(root / "sweep")]))
    assert "trial-0001" in table and "interrupted" in table and " a " not in table


def test_runs_of_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    assert "folder not found" in one_line_error(runner.invoke(app, ["runs", str(tmp_path / "nope")]))


def test_grouping_ignores_the_seed_and_labels_what_differs(tmp_path: Path) -> None:
    for name, sets in (("r1", ["train.optimizer.lr=0.1", "seed=0"]), ("r2", ["train.optimizer.lr=0.1", "seed=1"]),
                       ("r3", ["train.optimizer.lr=0.03", "seed=0"])):
        _fake_run(tmp_path / name, sets, [0.2])
    groups = group_runs(list_runs(tmp_path))
    assert [(label, [r.path.name for r in rs]) for label, rs in groups] == [("lr=0.03", ["r3"]),
                                                                             ("lr=0.1", ["r1", "r2"])]
    assert short_key("model.layers[0].out_channels", ["model.layers[0].out_channels",
                                                      "model.layers[3].out_channels"]) == "layers[0].out_channels"


def test_band_is_the_mean_and_sample_std_per_epoch() -> None:
    b = band([(np.array([1, 2, 3]), np.array([0.2, 0.4, 0.5])), (np.array([1, 2]), np.array([0.4, 0.6])),
              (np.array([1]), np.array([np.nan]))])
    assert b.epoch.tolist() == [1, 2, 3] and b.count.tolist() == [2, 2, 1]
    assert b.mean == pytest.approx([0.3, 0.5, 0.5])
    assert b.std == pytest.approx([np.sqrt(0.02), np.sqrt(0.02), 0.0])  # ((0.1² + 0.1²) / (2 − 1)) ** 0.5


def test_plot_overlays_several_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name, sets in (("r1", ["seed=0"]), ("r2", ["seed=1"]), ("r3", ["train.optimizer.lr=0.5"])):
        _fake_run(tmp_path / "sweep" / name, sets, [0.2, 0.3, 0.35])
    out = ok(runner.invoke(app, ["plot", str(tmp_path / "sweep")]))
    assert "3 runs in 2 groups" in out
    blob = (tmp_path / "sweep" / "compare.png").read_bytes()
    assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 10_000
    ok(runner.invoke(app, ["plot", str(tmp_path / "sweep" / "r1"), str(tmp_path / "sweep" / "r3"),
                           "--out", str(tmp_path)]))
    assert (tmp_path / "compare.png").is_file()
