"""A newcomer's first hour, from a folder that is no checkout: configs by name, errors that name the source of
the wrong value, no quiet no-ops, one option vocabulary (--json, --quiet, --split, old spellings), shell
completion, and the progress display (in a pty).

Each family goes through the real `cnn` console script in a subprocess at least once; its further cases run
in process (Typer's CliRunner, same commands, same error wrapper) to keep the file fast."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok as _ok
from clihelp import one_line_error as _one_line_error
from helpers import arrays
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.data import load_cifar10, make_splits
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
CNN = str(Path(sys.executable).parent / "cnn")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = ["--set", "data.val_size=100", "--epochs", "1", "--batch-size", "100"]  # on `digits`: 200 to train
runner = CliRunner()


def cnn(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The console script, from `cwd` (never the checkout), with CNNCLI_DATA unset: data comes from --data-dir."""
    full = {k: v for k, v in os.environ.items() if k != "CNNCLI_DATA"}
    full["XDG_CACHE_HOME"] = str(cwd / ".cache")  # a download attempt would land here, never in ~/.cache
    return subprocess.run([CNN, *args], cwd=cwd, env={**full, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The user-error contract: exit `code`, one line on stderr starting 'error:', no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], err)
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    """--json: stdout holds one JSON object per line and nothing else."""
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert objs and all(isinstance(o, dict) for o in objs), proc.stdout
    return objs


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def digits(home: Path) -> Path:
    """A tiny MNIST-layout data set (300 train, 50 test random 28×28 images; the four gzipped IDX files written
    here by hand): these tests train only to get a run folder, and the built-in `mnist` config reads it at once."""
    rng = np.random.default_rng(0)
    folder = home / "digits"
    folder.mkdir()
    for name, shape in (("train-images-idx3-ubyte", (300, 28, 28)), ("train-labels-idx1-ubyte", (300,)),
                        ("t10k-images-idx3-ubyte", (50, 28, 28)), ("t10k-labels-idx1-ubyte", (50,))):
        values = rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8)
        header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + values.tobytes(), mtime=0))
    return folder


@pytest.fixture(scope="module")
def run(home: Path, digits: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny `cnn train --config mnist --quiet` (200 training images, 1 epoch) in `home`."""
    proc = cnn("train", "--config", "mnist", *TINY, "--quiet", "--out", "run", "--data-dir", str(digits), cwd=home)
    assert proc.returncode == 0, proc.stderr
    return home / "run", proc


# ------------------------------------------------------------------------------------- configs by name


def test_builtin_names_work_everywhere_from_any_folder(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = json_lines(cnn("summary", "--config", "seed-diagram", "--json", cwd=home))[0]
    assert [r["name"] for r in summary["layers"] if r["params"]] == ["conv1", "conv2", "fc1"]
    assert summary["params"] == (16 * 27 + 16) + (32 * 16 * 9 + 32) + (10 * 8192 + 10)
    monkeypatch.chdir(home)
    grad = json.loads(_ok(runner.invoke(app, ["gradcheck", "-c", "mnist", "--batch-size", "1", "--max-entries", "2",
                                              "--json"])))
    assert grad["passed"] and grad["tensors"][-1]["shape"] == [1, 1, 28, 28]  # MNIST's input
    bench = json.loads(_ok(runner.invoke(app, ["bench", "--config", "seed", "--steps", "1", "--repeats", "1",
                                               "--batch-size", "8", "--eval-batch-size", "8", "--json"])))
    assert bench["batch"] == 8 and bench["eval_batch"] == 8
    # the default config is the built-in seed, wherever the command runs
    default = json.loads(_ok(runner.invoke(app, ["summary", "--json"])))
    assert default["params"] == 16 * 27 + 16 + 10 * 4096 + 10


def test_unknown_builtin_name_lists_the_names(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = one_line(cnn("summary", "--config", "sed", cwd=home))
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert err.startswith("error: sed: ") and "did you mean 'seed'?" in err
    assert f"built-in configs: {', '.join(names)}" in err
    monkeypatch.chdir(home)
    err = _one_line_error(runner.invoke(app, ["gradcheck", "--config", "configs/seed.yaml"]))  # the checkout's path
    assert "configs/seed.yaml: config file not found" in err and "--config seed" in err


def test_config_list_and_show(home: Path) -> None:
    listed = [json.loads(line) for line in _ok(runner.invoke(app, ["config", "list", "--json"])).splitlines()]
    assert [r["name"] for r in listed] == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {r["name"]: r["dataset"] for r in listed}["mnist"] == "mnist"
    proc = cnn("config", "show", "seed", "--set", "train.epochs=3", "--set", "model.layers[0].out_channels=8",
               cwd=home)
    assert proc.returncode == 0, proc.stderr
    saved = home / "mine.yaml"
    saved.write_text(proc.stdout, encoding="utf-8")
    expected = load_config(CONFIGS / "seed.yaml", ["train.epochs=3", "model.layers[0].out_channels=8"])
    copy = load_config(saved)  # what a user copies runs as is, named after its own file
    assert copy.name == "mine" and copy.model == expected.model and copy.train == expected.train
    assert copy.data == expected.data and copy.seed == expected.seed
    for key in ("eval_batch_size:", "momentum:", "val_size:", "crop_padding:", "warmup_epochs:"):
        assert key in proc.stdout  # defaults filled in, even where seed.yaml leaves them out
    err = _one_line_error(runner.invoke(app, ["config", "show", "seed", "--set", "train.epochs=0"]))
    assert err.startswith("error: --set train.epochs=0: must be a positive number")


# --------------------------------------------------------------------------- errors that name the source


def test_a_bad_set_value_blames_the_set_not_the_file(home: Path) -> None:
    yaml_file = home / "mine.yaml"
    yaml_file.write_text((CONFIGS / "seed.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    expected = 'error: --set train.optimizer.lr=abc: expected a number, got "abc" (a string)'
    assert one_line(cnn("train", "--config", str(yaml_file), "--set", "train.optimizer.lr=abc", cwd=home)) == expected
    for command in ("summary", "bench", "gradcheck", "config show"):
        args = [*command.split(), *([] if command == "config show" else ["--config"]), str(yaml_file)]
        assert _one_line_error(runner.invoke(app, [*args, "--set", "train.optimizer.lr=abc"])) == expected
    # a value inside a mapping the --set gave
    err = _one_line_error(runner.invoke(app, ["summary", "-c", "seed", "--set", "train.optimizer={type: adam, lr: x}"]))
    assert err.startswith("error: --set train.optimizer={type: adam, lr: x}: train.optimizer.lr: expected a number")
    # the file's own mistake still names the file
    bad = home / "bad.yaml"
    bad.write_text(yaml_file.read_text(encoding="utf-8").replace("lr: 0.01", "lr: abc"), encoding="utf-8")
    err = _one_line_error(runner.invoke(app, ["summary", "--config", str(bad), "--set", "train.epochs=2"]))
    assert err.startswith(f"error: {bad}: train.optimizer.lr: expected a number")
    # --resume: the stored config is the source, the --set still takes the blame for its value
    cfg = load_config(CONFIGS / "seed.yaml")
    model = build_model(cfg.model, seed=0)
    ckpt = save_checkpoint(home / "r.npz", model, cfg, optim={}, state={"epoch": 1, "batch": 0, "step": 1})
    err = _one_line_error(runner.invoke(app, ["train", "--resume", str(ckpt), "--set", "train.optimizer.lr=abc"]))
    assert err.startswith("error: --set train.optimizer.lr=abc: expected a number"), err


def test_files_that_are_no_yaml_config_say_what_they_are(home: Path) -> None:
    cfg = load_config(CONFIGS / "seed.yaml")
    npz = save_checkpoint(home / "best.npz", build_model(cfg.model, seed=0), cfg)
    assert zipfile.is_zipfile(npz)
    expected = f"error: {npz}: is a .npz checkpoint, not a YAML config; to evaluate it: cnn eval {npz}"
    assert one_line(cnn("gradcheck", "--config", str(npz), cwd=home)) == expected
    for command in ("summary", "train", "bench", "trace", "config show"):
        args = [*command.split(), *([] if command == "config show" else ["--config"]), str(npz)]
        assert _one_line_error(runner.invoke(app, args)) == expected
    folder = home / "a-folder"
    folder.mkdir()
    empty = home / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    latin = home / "latin.yaml"
    latin.write_bytes(b"seed: 0\n# caf\xe9\n")
    binary = home / "weights.bin"
    binary.write_bytes(np.arange(64, dtype=np.float32).tobytes())
    fifo = home / "fifo.yaml"
    os.mkfifo(fifo)
    cases = {folder: "is a folder, not a config file", empty: "is empty, not a config",
             latin: "is not UTF-8 text (byte 0xe9 at offset 13), not a YAML config",
             binary: "is a binary file, not a YAML config", fifo: "is not a regular file (a pipe or device)"}
    for path, what in cases.items():
        err = _one_line_error(runner.invoke(app, ["summary", "--config", str(path)]))  # a pipe must not block
        assert err.startswith(f"error: {path}: {what}"), err


def test_a_control_character_in_a_name_keeps_the_error_on_one_line(tmp_path: Path) -> None:
    err = _one_line_error(runner.invoke(app, ["summary", "--config", str(tmp_path / "two\nlines.yaml")]))
    assert err == f"error: {tmp_path}/two\\nlines.yaml: config file not found (built-in configs: " + ", ".join(
        sorted(p.stem for p in CONFIGS.glob("*.yaml"))) + ")"
    latin = tmp_path / "u16.yaml"
    latin.write_bytes("seed: 0\n".encode("utf-16"))
    assert _one_line_error(runner.invoke(app, ["summary", "-c", str(latin)])).endswith("is UTF-16 text; a config is "
                                                                                     "UTF-8 (save it as UTF-8)")


# ------------------------------------------------------------------------------- quiet, json, no-ops


def test_quiet_prints_only_the_final_line(run: tuple[Path, subprocess.CompletedProcess]) -> None:
    folder, proc = run
    assert proc.stderr == ""
    (line,) = proc.stdout.splitlines()
    record = json.loads((folder / "run.json").read_text())
    assert f"test accuracy {100 * record['test_acc']:.2f}%" in line
    assert "run folder run;" in line and "evaluate with: cnn eval run/best.npz --data-dir " in line


def test_resume_with_no_epochs_left_changes_nothing(run: tuple[Path, subprocess.CompletedProcess],
                                                    digits: Path) -> None:
    folder, _ = run
    home = folder.parent

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}

    before = snapshot()
    assert {"config.yaml", "run.json", "last.npz", "best.npz", "metrics.csv"} <= set(before)
    time.sleep(0.05)  # a rewrite would now show in the mtimes even on coarse clocks
    err = one_line(cnn("train", "--resume", "run/last.npz", "--epochs", "1", "--data-dir", str(digits), cwd=home))
    assert "run/last.npz: the run already has 1 epoch(s) and --epochs 1 is the total" in err
    assert "cnn train --resume run/last.npz --epochs 2" in err
    assert snapshot() == before  # no file rewritten, none added
    err = _one_line_error(runner.invoke(app, ["train", "--resume", str(folder / "last.npz"), "--data-dir",
                                              str(digits)]))  # no --epochs: the config's 1
    assert "the run already has 1 epoch(s) and its config asks for 1" in err
    assert snapshot() == before


def test_eval_split_headings_and_old_batch_spelling(home: Path, real_cifar_dir: Path) -> None:
    cfg = load_config(CONFIGS / "seed.yaml", ["data.val_size=100"])
    ckpt = save_checkpoint(home / "fresh.npz", build_model(cfg.model, seed=0), cfg)  # no training needed
    proc = cnn("eval", str(ckpt), "--split", "val", "--batch-size", "30", "--data-dir", str(real_cifar_dir), cwd=home)
    assert proc.returncode == 0, proc.stderr
    assert "on the val split (100 images)" in proc.stdout  # data.val_size of the checkpoint's config
    heading = next(line for line in proc.stdout.splitlines() if "airplane" in line and "truck" in line)
    assert all(name in heading for name in CLASSES)  # no name cut to five letters
    helptext = _ok(runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}))
    assert "--eval-batch-size" in helptext and not re.search(r"--batch-size\b", helptext)  # the old one is hidden


def test_confusion_matrix_too_wide_for_the_terminal_numbers_its_columns() -> None:
    from rich.console import Console

    from cnncli.cli.train import confusion_table

    console = Console(width=80, file=open(os.devnull, "w"), record=True)  # noqa: SIM115
    console.print(confusion_table(np.arange(100).reshape(10, 10), CLASSES, width=80))
    text = console.export_text()
    assert "numbered" in text.split("┏")[0]  # the title says so
    for i, name in enumerate(CLASSES):
        assert f"{i} {name}" in text  # every name in full, beside its number


def test_trace_takes_the_same_split_as_eval(real_cifar_dir: Path, home: Path) -> None:
    proc = cnn("trace", "--config", "seed", "--split", "val", "--index", "3", "--checks", "0", "--json",
               "--data-dir", str(real_cifar_dir), cwd=home)
    (res,) = json_lines(proc)
    cfg = load_config(CONFIGS / "seed.yaml")
    ds = load_cifar10(real_cifar_dir, train=True, test=False)
    split = make_splits(ds.train_x, ds.train_y, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed)
    assert res["split"] == "val" and res["label"] == int(split.val_y[3]) and res["class"] == CLASSES[res["label"]]
    assert [s["symbol"] for s in res["steps"]][:2] == ["X", "S¹"]
    err = _one_line_error(runner.invoke(app, ["trace", "--split", "validation"]))
    assert "--split: must be test, train or val" in err


def test_train_json_is_one_object_on_stdout(home: Path, digits: Path) -> None:
    proc = cnn("train", "--config", "mnist", *TINY, "--json", "--out", "run-json", "--data-dir", str(digits), cwd=home)
    (res,) = json_lines(proc)
    assert res["run_dir"] == "run-json" and res["epochs"] == 1 and len(res["history"]) == 1
    saved = arrays(home / "run-json" / "best.npz")
    assert json.loads(str(saved["state"]))["best_val_acc"] == res["best_val_acc"]
    assert "epoch 1/1" in proc.stderr  # the progress went to stderr
    runs = [json.loads(line) for line in _ok(runner.invoke(app, ["runs", str(home), "--json"])).splitlines()]
    assert {r["path"] for r in runs} >= {"run-json"}


# ------------------------------------------------------------------------------------ help and options


def test_help_has_no_type_labels_and_one_spelling() -> None:
    import typer

    from cnncli.cli.app import app

    root = typer.main.get_command(app)

    def commands(group, path=()):  # noqa: ANN001
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd, (*path, name))
            else:
                yield (*path, name), cmd

    seen: dict[str, set[str]] = {}
    for path, cmd in commands(root):
        ctx = cmd.make_context(" ".join(path), ["--help"], resilient_parsing=True)
        for p in cmd.get_params(ctx):
            label = p.display_type_rich(ctx) or ""
            assert "<" not in label, (path, p.name, label)  # <list[str]>, <bool>, <path>, …
            for opt in p.opts:
                seen.setdefault(opt, set()).add(" ".join(path))
    for old in ("--batch", "--eval-batch"):
        assert old not in seen  # spelled --batch-size / --eval-batch-size everywhere
    assert {"eval", "gradcheck", "summary", "bench", "trace", "runs", "config list", "config show",
            "sweep show", "train", "download", "plot"} <= seen["--json"]
    assert {"eval", "trace"} <= seen["--split"]


def test_old_spellings_still_work_and_usage_errors_name_the_new_one(home: Path) -> None:
    res = json.loads(_ok(runner.invoke(app, ["gradcheck", "--batch", "1", "--max-entries", "2", "--json"])))
    assert res["batch"] == 1
    err = one_line(cnn("bench", "--eval-batch", "zero", cwd=home), code=2)
    assert "--eval-batch-size" in err


def test_shell_completion(home: Path) -> None:
    # the bash script that `cnn --install-completion` installs (that option detects the shell this test runs
    # under, sh in CI, which has no completion: ask for bash's script by name instead)
    script = cnn(cwd=home, env={"_CNN_COMPLETE": "source_bash"})
    assert script.returncode == 0 and "_CNN_COMPLETE=complete_bash" in script.stdout
    env = {"_CNN_COMPLETE": "complete_bash", "COMP_WORDS": "cnn train --config seed-", "COMP_CWORD": "3"}
    assert cnn(cwd=home, env=env).stdout.split() == ["seed-diagram"]


# ------------------------------------------------------------------------------------------ progress


def _screen(data: str) -> list[str]:
    """What a terminal shows after `data`: carriage returns overwrite, newlines advance (escapes ignored)."""
    lines, col = [""], 0
    for ch in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data):
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            cur = lines[-1].ljust(col)
            lines[-1] = cur[:col] + ch + cur[col + 1:]
            col += 1
    return lines


def _pty(columns: int) -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    return master, slave


def _drain(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.05)[0]:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_training_bar_keeps_its_width_when_the_numbers_appear() -> None:
    from cnncli.cli.progress import TrainProgress

    master, slave = _pty(100)
    with open(slave, "w", buffering=1) as stream:
        progress = TrainProgress(stream=stream)
        progress.on_epoch_start(1, 3, 12, 0)
        for b in range(1, 13):
            progress.on_batch(b, 12, 2.3 - 0.01 * b, 0.1 + 0.01 * b, 900.0 * b, 0.01)
            progress.bar.refresh()  # draw every step (tqdm would skip some within its mininterval)
        progress.on_validate()
        progress.bar.refresh()
        progress.close()
    frames = [f for f in re.split(r"[\r\n]", _drain(master)) if f.count("|") >= 2]
    os.close(master)
    assert any("loss       –" in f for f in frames) and any("loss  2.2" in f for f in frames)  # before and after
    assert len({len(f.split("|")[1]) for f in frames}) == 1  # the bar between the two '|' never changes width
    assert len({f.index("|") for f in frames}) == 1


def test_gradcheck_shows_progress_and_ctrl_c_leaves_no_half_drawn_bar(home: Path) -> None:
    # not a terminal: periodic lines on stderr (every update with $CNNCLI_PROGRESS_SECONDS=0)
    proc = cnn("gradcheck", "--batch-size", "1", "--max-entries", "3", "--json", cwd=home,
               env={"CNNCLI_PROGRESS_SECONDS": "0"})
    lines = proc.stderr.splitlines()
    total = 3 * 5  # conv1.W, conv1.b, fc1.W, fc1.b and X, each larger than 3 entries: 3 checked of each
    assert lines and all(re.match(rf"gradcheck: finite differences: \d+ of {total} entries \(\d+%\)", x) for x in lines)
    assert json.loads(proc.stdout)["passed"]
    # a terminal: a bar, erased when Ctrl-C stops the run
    master, slave = _pty(100)
    env = {k: v for k, v in os.environ.items() if k != "CNNCLI_DATA"}
    child = subprocess.Popen([CNN, "gradcheck", "--max-entries", "100000"], cwd=home, env=env, stdin=slave,
                             stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = ""
    deadline = time.monotonic() + 60
    while "entries" not in seen and time.monotonic() < deadline and child.poll() is None:
        seen += _drain(master)
    assert "gradcheck: finite differences" in seen and "%|" in seen  # the bar is drawn
    os.kill(child.pid, signal.SIGINT)
    code = child.wait(timeout=60)
    seen += _drain(master)
    os.close(master)
    assert code == 130
    visible = [line for line in _screen(seen) if line.strip()]
    assert not any("finite differences" in line for line in visible), visible[-3:]


def test_download_bar_speaks_binary_units_and_ctrl_c_erases_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnncli.cli import progress

    assert progress._human_bytes(170_498_071) == "162.6 MiB"  # CIFAR-10's archive: 170,498,071 / 1024²
    master, slave = _pty(100)
    with open(slave, "w", buffering=1) as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        with pytest.raises(KeyboardInterrupt), progress.byte_progress("CIFAR-10 archive") as update:
            for i in range(1, 4):
                update(i * 30 * 1024**2, 170_498_071)
            raise KeyboardInterrupt
        with progress.byte_progress("finished") as update:
            update(2048, 2048)
    data = _drain(master)
    os.close(master)
    assert "90.0 MiB /  162.6 MiB" in data and " MB" not in data
    visible = [line for line in _screen(data) if line.strip()]
    assert len(visible) == 1 and visible[0].startswith("finished: 100%") and "2.0 KiB /    2.0 KiB" in visible[0]
