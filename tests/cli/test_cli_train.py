"""`cnn train` and `cnn eval` end to end on the real CIFAR-10 (small slices).

In process through Typer's CliRunner, except Ctrl-C, which is a real SIGINT sent to a `cnn train` subprocess.
`cnn eval --json` is checked against an independent forward pass of the seed network written here in NumPy.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok as _ok
from clihelp import one_line_error as _one_line_error
from helpers import arrays as _arrays
from helpers import assert_same_training_state as _assert_same_training_state
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.data import load_cifar10
from cnncli.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PARAMS = ("conv1.W", "conv1.b", "fc1.W", "fc1.b")

runner = CliRunner()


def _train(data: Path, out: Path, *args: str):
    return runner.invoke(app, ["train", "--data-dir", str(data), "--out", str(out), *args])


def _eval(ckpt: Path, data: Path, *args: str):
    return runner.invoke(app, ["eval", str(ckpt), "--data-dir", str(data), *args])


def _eval_json(ckpt: Path, data: Path, *args: str) -> dict:
    return json.loads(_ok(_eval(ckpt, data, "--json", *args)))


def _cnn() -> str:
    exe = Path(sys.executable).parent / "cnn"
    found = str(exe) if exe.exists() else shutil.which("cnn")
    assert found, "the cnn console script is not installed"
    return found


# --------------------------------------------------------------------------------- a real 5,000-image run


@pytest.fixture(scope="module")
def run5k(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "run5k"
    result = _train(real_cifar_dir, out, "--config", str(SEED), "--epochs", "2",
                    "--set", "data.limit=5000", "--set", "data.val_size=500")
    return out, _ok(result)


def test_train_prints_a_summary_and_the_eval_command(run5k: tuple[Path, str]) -> None:
    out, stdout = run5k
    assert "training on 4,500 images, validating on 500, testing on 10,000 (36 steps per epoch)" in stdout
    assert "test accuracy (best checkpoint)" in stdout
    assert f"cnn eval {out / 'best.npz'}" in stdout


def test_the_printed_eval_hint_works_as_printed(run5k: tuple[Path, str], real_cifar_dir: Path) -> None:
    out, stdout = run5k
    hint = re.search(r"evaluate with:\s+cnn (eval .*)", stdout)
    assert hint, stdout
    args = shlex.split(hint.group(1))
    assert "--data-dir" in args, "the hint names the data the run used, so it works offline"
    res = runner.invoke(app, [*args, "--json"], env={"CNNCLI_DATA": str(Path("/nonexistent"))})
    assert json.loads(_ok(res))["n"] == 10000


def test_test_accuracy_well_above_chance(run5k: tuple[Path, str], real_cifar_dir: Path) -> None:
    out, stdout = run5k
    res = _eval_json(out / "best.npz", real_cifar_dir)
    assert res["n"] == 10000
    assert res["accuracy"] > 0.25  # chance: 0.10
    printed = re.search(r"test accuracy \(best checkpoint\)\D*?([\d.]+)%", stdout)
    assert printed, stdout
    assert float(printed.group(1)) == pytest.approx(100 * res["accuracy"], abs=0.006)


def _independent_forward(params: dict[str, np.ndarray], cfg, x: np.ndarray) -> np.ndarray:
    """The seed network by its equations, in float64: conv 3×3 pad 1 -> ReLU -> max-pool 2×2 -> flatten -> fc."""
    mean = np.array(cfg.data.normalize.mean).reshape(1, 3, 1, 1)
    std = np.array(cfg.data.normalize.std).reshape(1, 3, 1, 1)
    xn = (x / 255.0 - mean) / std
    w, b = params["conv1.W"].astype(np.float64), params["conv1.b"].astype(np.float64)
    pad = np.pad(xn, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = np.zeros((len(x), 16, 32, 32))
    for u in range(3):
        for v in range(3):
            s += np.einsum("oc,nchw->nohw", w[:, :, u, v], pad[:, :, u : u + 32, v : v + 32])
    a = np.maximum(s + b[None, :, None, None], 0)
    p = a.reshape(len(x), 16, 16, 2, 16, 2).max(axis=(3, 5))
    return p.reshape(len(x), -1) @ params["fc1.W"].astype(np.float64).T + params["fc1.b"]


def test_eval_json_against_an_independent_forward_pass(run5k: tuple[Path, str], real_cifar_dir: Path) -> None:
    out, _ = run5k
    res = _eval_json(out / "best.npz", real_cifar_dir)
    assert set(res) >= {"accuracy", "loss", "per_class", "confusion", "n"}
    conf = np.array(res["confusion"])
    n = res["n"]
    assert conf.shape == (10, 10) and conf.sum() == n == 10000
    assert res["accuracy"] == pytest.approx(np.trace(conf) / n, abs=1e-12)
    assert list(res["per_class"]) == CLASSES
    for i, c in enumerate(CLASSES):
        assert res["per_class"][c] == pytest.approx(conf[i, i] / conf[i].sum(), abs=1e-12)
    assert conf.sum(axis=1).tolist() == [1000] * 10  # the test set has 1,000 images per class

    ck = load_checkpoint(out / "best.npz")
    test = load_cifar10(real_cifar_dir, train=False)
    correct, total_loss = 0, 0.0
    my_conf = np.zeros((10, 10), dtype=int)
    for start in range(0, 10000, 1000):
        xb, yb = test.test_x[start : start + 1000], test.test_y[start : start + 1000]
        z = _independent_forward(ck.params, ck.config, xb)
        zs = z - z.max(axis=1, keepdims=True)
        logp = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
        total_loss -= logp[np.arange(len(yb)), yb].sum()
        pred = z.argmax(axis=1)
        correct += int((pred == yb).sum())
        np.add.at(my_conf, (yb, pred), 1)
    assert res["loss"] == pytest.approx(total_loss / 10000, rel=1e-4)
    assert abs(res["accuracy"] - correct / 10000) <= 0.001  # float32 vs float64: a few near-ties may flip
    assert np.abs(conf - my_conf).sum() <= 20


def test_eval_val_and_train_splits(run5k: tuple[Path, str], real_cifar_dir: Path) -> None:
    out, _ = run5k
    val = _eval_json(out / "best.npz", real_cifar_dir, "--split", "val")
    trn = _eval_json(out / "best.npz", real_cifar_dir, "--split", "train", "--batch-size", "700")
    assert (val["n"], trn["n"]) == (500, 4500)
    for res in (val, trn):
        conf = np.array(res["confusion"])
        assert conf.sum() == res["n"]
        assert res["accuracy"] == pytest.approx(np.trace(conf) / res["n"], abs=1e-12)
    # The validation accuracy of the best epoch is what training recorded.
    state = load_checkpoint(out / "best.npz").state
    assert val["accuracy"] == pytest.approx(state["best_val_acc"], abs=1e-12)


def test_eval_table_output(run5k: tuple[Path, str], real_cifar_dir: Path) -> None:
    out, _ = run5k
    stdout = _ok(_eval(out / "best.npz", real_cifar_dir, "--split", "val"))
    assert "on the val split (500 images)" in stdout
    for c in ("airplane", "truck", "per-class accuracy", "confusion matrix"):
        assert c in stdout


def test_eval_bad_split(run5k: tuple[Path, str], real_cifar_dir: Path) -> None:
    out, _ = run5k
    msg = _one_line_error(_eval(out / "best.npz", real_cifar_dir, "--split", "validation"))
    assert "--split" in msg and "validation" in msg


def test_eval_bad_checkpoints(run5k: tuple[Path, str], real_cifar_dir: Path, tmp_path: Path) -> None:
    out, _ = run5k
    missing = tmp_path / "missing.npz"
    msg = _one_line_error(_eval(missing, real_cifar_dir))
    assert str(missing) in msg and "not found" in msg

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file\n" * 50)
    assert str(garbage) in _one_line_error(_eval(garbage, real_cifar_dir))

    folder = tmp_path / "folder.npz"
    folder.mkdir()
    assert str(folder) in _one_line_error(_eval(folder, real_cifar_dir))

    arrays = _arrays(out / "best.npz")
    no_fc = {k: v for k, v in arrays.items() if k != "fc1.b"}
    path = tmp_path / "no-fc1b.npz"
    np.savez(path, **no_fc)
    msg = _one_line_error(_eval(path, real_cifar_dir))
    assert str(path) in msg and "fc1.b" in msg

    arrays["conv1.W"] = arrays["conv1.W"][:8]
    path = tmp_path / "misshaped.npz"
    np.savez(path, **arrays)
    msg = _one_line_error(_eval(path, real_cifar_dir))
    assert str(path) in msg and "conv1.W" in msg and "(8, 3, 3, 3)" in msg


# ------------------------------------------------------------------------------------------- resume


def test_resume_at_an_epoch_boundary_is_bit_identical(real_cifar_dir: Path, tmp_path: Path) -> None:
    # Warm-up lasts exactly epoch 1, so its learning rates do not depend on the total number of epochs and
    # "1 epoch, then --resume --epochs 2" follows the same schedule as "--epochs 2" (cosine over epoch 2).
    common = ["--config", str(SEED), "--set", "data.limit=2000", "--set", "data.val_size=200",
              "--set", "train.schedule={type: cosine, warmup_epochs: 1}"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _ok(_train(real_cifar_dir, whole, *common, "--epochs", "2"))
    _ok(_train(real_cifar_dir, split, *common, "--epochs", "1"))
    assert load_checkpoint(split / "last.npz").state["epoch"] == 1
    stdout = _ok(runner.invoke(app, ["train", "--resume", str(split / "last.npz"), "--data-dir", str(real_cifar_dir),
                                     "--epochs", "2"]))
    assert f"resumed from {split / 'last.npz'} at epoch 2" in stdout
    _assert_same_training_state(whole / "last.npz", split / "last.npz")
    _assert_same_training_state(whole / "best.npz", split / "best.npz")
    assert (split / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert load_config(split / "config.yaml").train.epochs == 2


def _start_and_interrupt(args: list[str], cwd: Path, delay: float = 0.3) -> subprocess.CompletedProcess:
    """Start `cnn train`, wait until the loop starts (the 'run folder:' line), then send one SIGINT."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([_cnn(), "train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("run folder:") or time.monotonic() > deadline:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        rest, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest, err)


# A constant schedule: the learning rate does not depend on the planned number of epochs, so the stopped run can be
# finished with any --epochs and compared with an uninterrupted run of that length.
SIGINT_SETS = ["--set", "data.limit=20000", "--set", "data.val_size=1000",
               "--set", "train.schedule={type: constant}", "--set", "train.optimizer.lr=0.005"]


@pytest.fixture(scope="module")
def interrupted(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A `cnn train` subprocess (30 epochs planned) stopped by one SIGINT soon after its loop started.

    The run folder has a long name, as real paths often have: the printed messages are longer than 120 columns.
    """
    base = tmp_path_factory.mktemp("sigint")
    run = base / ("interrupted-run-" + "x" * 50)
    proc = _start_and_interrupt(["--config", str(SEED), "--data-dir", str(real_cifar_dir), "--out", str(run),
                                 "--epochs", "30", *SIGINT_SETS], cwd=base)
    return proc, run, base


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(interrupted, real_cifar_dir: Path) -> None:
    proc, run, base = interrupted
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    stopped = re.search(r"interrupted at epoch (\d+), batch (\d+); resumable checkpoint saved to (\S+)", text)
    assert stopped, proc.stderr
    epoch, batch, saved = int(stopped.group(1)), int(stopped.group(2)), Path(stopped.group(3))
    assert saved == run / "last.npz" and saved.is_file()
    command = re.search(r"resume with: (cnn train --resume \S+(?: --data-dir \S+)?)", text)
    assert command, proc.stderr
    assert f"--resume {run / 'last.npz'}" in command.group(1)

    ck = load_checkpoint(saved)
    assert ck.resumable
    steps = math.ceil(19000 / 128)
    if batch < steps:  # stopped mid-epoch: the epoch is not counted as done
        assert (ck.state["epoch"], ck.state["batch"]) == (epoch - 1, batch)
    else:  # stopped on an epoch's last step: the epoch completed first
        assert (ck.state["epoch"], ck.state["batch"]) == (epoch, 0)
    assert ck.state["step"] == (epoch - 1) * steps + batch

    # Run the printed command (plus --epochs to finish the interrupted epoch): bit-identical to a run that
    # was never stopped.
    argv = shlex.split(command.group(1))[1:] + ["--epochs", str(epoch)]
    _ok(runner.invoke(app, argv))
    whole = base / "whole"
    _ok(_train(real_cifar_dir, whole, "--config", str(SEED), "--epochs", str(epoch), *SIGINT_SETS))
    _assert_same_training_state(whole / "last.npz", run / "last.npz")


def test_ctrl_c_prints_the_resume_command_on_one_line(interrupted) -> None:
    proc, run, _ = interrupted
    assert proc.returncode == 130
    lines = proc.stderr.splitlines()
    assert any(line.startswith("interrupted at epoch") and line.endswith(f"saved to {run / 'last.npz'}")
               for line in lines), proc.stderr
    commands = [line for line in lines if line.startswith("resume with:")]
    assert len(commands) == 1, proc.stderr
    assert f"cnn train --resume {run / 'last.npz'} --data-dir " in commands[0]
    assert commands[0].rstrip().endswith("cifar-10-batches-py"), proc.stderr


# ------------------------------------------------------------------------------------------ divergence


def _good_epoch(data: Path, run: Path) -> bytes:
    _ok(_train(data, run, "--config", str(SEED), "--epochs", "1",
               "--set", "data.limit=1200", "--set", "data.val_size=200"))
    return (run / "last.npz").read_bytes()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_exits_1_with_one_line_and_keeps_last_checkpoint(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    before = _good_epoch(real_cifar_dir, run)
    result = runner.invoke(app, ["train", "--resume", str(run / "last.npz"), "--data-dir", str(real_cifar_dir),
                                 "--epochs", "2", "--set", "train.optimizer.lr=1.0e+8"])
    msg = _one_line_error(result)
    assert "learning rate" in msg and "train.optimizer.lr" in msg
    assert str(run / "last.npz") in msg
    assert (run / "last.npz").read_bytes() == before
    ck = load_checkpoint(run / "last.npz")
    assert ck.state["epoch"] == 1
    assert all(np.all(np.isfinite(v)) for v in ck.params.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_from_the_start(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train(real_cifar_dir, run, "--config", str(SEED), "--epochs", "1", "--set", "data.limit=1000",
                    "--set", "data.val_size=100", "--set", "train.optimizer.lr=1000000")
    msg = _one_line_error(result)
    assert "learning rate" in msg and "no checkpoint was saved" in msg
    assert not (run / "last.npz").exists()


def test_nan_stderr_is_only_the_error_line(real_cifar_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [_cnn(), "train", "--config", str(SEED), "--data-dir", str(real_cifar_dir), "--out", str(tmp_path / "run"),
         "--epochs", "1", "--set", "data.limit=1000", "--set", "data.val_size=100",
         "--set", "train.optimizer.lr=1000000"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "learning rate" in lines[0], proc.stderr


# ---------------------------------------------------------------------------------- options and --set


def test_limit_val_size_epochs_and_seed_options(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    stdout = _ok(_train(real_cifar_dir, run, "--config", str(SEED), "--set", "data.limit=3000",
                        "--set", "data.val_size=500", "--epochs", "1", "--seed", "3"))
    assert "training on 2,500 images, validating on 500, testing on 10,000 (20 steps per epoch)" in stdout
    cfg = load_config(run / "config.yaml")
    assert (cfg.seed, cfg.train.epochs, cfg.data.limit, cfg.data.val_size) == (3, 1, 3000, 500)
    assert load_checkpoint(run / "last.npz").config == cfg
    assert (run / "metrics.csv").read_text().count("\n") == 2  # header + 1 epoch
    trn = _eval_json(run / "last.npz", real_cifar_dir, "--split", "train")
    assert trn["n"] == 2500
    assert _eval_json(run / "last.npz", real_cifar_dir, "--split", "val")["n"] == 500


def test_seed_option_changes_the_run(real_cifar_dir: Path, tmp_path: Path) -> None:
    # Explicit --set seed=3 and the --seed 3 shortcut give the same run; seed 0 another one.
    common = ["--config", str(SEED), "--set", "data.limit=600", "--set", "data.val_size=100", "--epochs", "1"]
    _ok(_train(real_cifar_dir, tmp_path / "a", *common, "--seed", "3"))
    _ok(_train(real_cifar_dir, tmp_path / "b", *common, "--set", "seed=3"))
    _ok(_train(real_cifar_dir, tmp_path / "c", *common))
    _assert_same_training_state(tmp_path / "a" / "last.npz", tmp_path / "b" / "last.npz")
    a, c = _arrays(tmp_path / "a" / "last.npz"), _arrays(tmp_path / "c" / "last.npz")
    assert not np.array_equal(a["conv1.W"], c["conv1.W"])


@pytest.mark.parametrize(
    ("item", "where", "suggestion"),
    [
        ("train.optimiser.lr=0.1", "train.optimiser", "train.optimizer"),
        ("data.limt=3000", "data.limt", "data.limit"),
        ("train.optimizer.momentun=0.5", "train.optimizer.momentun", "train.optimizer.momentum"),
        ("model.layers[0].kernal_size=5", "model.layers[0].kernal_size", "model.layers[0].kernel_size"),
    ],
)
def test_unknown_set_key_names_the_path_and_suggests(tmp_path: Path, item: str, where: str, suggestion: str) -> None:
    result = runner.invoke(app, ["train", "--config", str(SEED), "--out", str(tmp_path / "run"), "--set", item])
    msg = _one_line_error(result)
    assert msg.startswith(f"error: --set {item}: ")  # the --set gave the key, not the config file
    assert f"{where}: unknown key" in msg or msg.startswith(f"error: --set {where}=")
    assert f"did you mean '{suggestion}'" in msg
    assert not (tmp_path / "run").exists()


def test_unknown_set_key_on_resume_names_the_set(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _good_epoch(real_cifar_dir, run)
    result = runner.invoke(app, ["train", "--resume", str(run / "last.npz"), "--set", "train.epoch=3"])
    msg = _one_line_error(result)
    assert msg.startswith("error: --set train.epoch=3: unknown key") and "'train.epochs'" in msg  # the --set's key


def test_resume_and_init_exclude_each_other(tmp_path: Path) -> None:
    ck = tmp_path / "x.npz"
    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(ck), "--init", str(ck)]))
    assert "--resume" in msg and "--init" in msg


@pytest.mark.parametrize(("text", "value"), [("1e6", 1e6), ("1.0e6", 1e6), ("1e-3", 1e-3)])
def test_set_accepts_exponent_notation(text: str, value: float) -> None:
    assert load_config(SEED, [f"train.optimizer.lr={text}"]).train.optimizer.lr == value


def test_set_accepts_exponent_notation_with_a_dot_and_a_sign() -> None:
    """The spelling that works today (and that the tests above use): 1.0e+8, 1.0e-3."""
    assert load_config(SEED, ["train.optimizer.lr=1.0e+8"]).train.optimizer.lr == 1e8
    assert load_config(SEED, ["train.optimizer.lr=1.0e-3"]).train.optimizer.lr == 1e-3
