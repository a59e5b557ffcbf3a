"""`cnn sweep` on Optuna with real (tiny) trainings: the search-space options, a 2×2 grid run by 2 worker processes
(4 run folders, a table whose best trial is the best metrics.csv), a second process adding trials to the same
journal without repeating finished ones, a sweep stopped by SIGTERM or by a killed worker that continues where it
stopped (the cut-off trial resumed from its last.npz, bit for bit), and the scale-out path: two `cnn sweep`
processes sharing one study on a real, throwaway PostgreSQL server.

The PostgreSQL test skips only where no server binaries exist and $CI is unset; in CI it must run (.ci/run
installs the server). As root, the server runs as the `postgres` (or `nobody`) user, since initdb refuses root.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok, one_line_error
from helpers import assert_same_training_state
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.host.errors import ConfigError
from cnncli.run.runs import read_history
from cnncli.run.sweep import parse_grid, parse_sample

SEED = Path(__file__).resolve().parents[2] / "configs" / "seed.yaml"
SMALL = ["data.limit=512", "data.val_size=128", "train.batch_size=64", "train.epochs=1"]
runner = CliRunner()


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _trial_dirs(folder: Path) -> list[Path]:
    return sorted(folder.glob("trial-*"))


def _show(target: Path | str, *extra: str) -> dict:
    return json.loads(ok(runner.invoke(app, ["sweep", "show", str(target), "--json", *extra])))


def _best_val(run_dir: Path) -> float:
    return max(r["val_acc"] for r in read_history(run_dir))


def _cli(*args: str) -> list[str]:
    """A `cnn` command line as its own process (so that it can be signalled)."""
    return [sys.executable, "-c", "from cnncli.cli.app import app; app()", *args]


# ------------------------------------------------------------------------------------- search space


def test_grid_values_are_yaml_scalars_split_at_top_level_commas() -> None:
    d = parse_grid("train.optimizer.lr=0.003, 1e-2,3e-2")
    assert d.key == "train.optimizer.lr" and d.values == (0.003, 0.01, 0.03)
    assert parse_grid("train.optimizer.type='a,b',adam").values == ("a,b", "adam")
    assert parse_grid("train.optimizer.nesterov=true,false").values == (True, False)
    for bad, says in (("train.optimizer.lr", "expected key.path=values"), ("lr=0.1,,0.2", "an empty value"),
                      ("lr=[1,2],3", "not a single value"), ("lr=0.1,0.1", "repeated")):
        with pytest.raises(ConfigError, match=says):
            parse_grid(bad)


def test_sampled_kinds_and_their_errors() -> None:
    d = parse_sample("train.optimizer.lr=loguniform:1e-4:1e-1")
    assert (d.kind, d.low, d.high) == ("loguniform", 1e-4, 0.1)
    assert parse_sample("model.layers[0].out_channels=int:4:32").low == 4
    assert parse_sample("train.optimizer.type=choice:sgd,adam").values == ("sgd", "adam")
    for bad, says in (("lr=normal:0:1", "expected one of"), ("lr=uniform:1", "two bounds"),
                      ("lr=uniform:2:1", "LOW must be below HIGH"), ("lr=loguniform:0:1", "LOW > 0"),
                      ("lr=int:0.5:2", "integers"), ("seed=int:0:9", "--seeds"), ("lr=choice:a", "two values")):
        with pytest.raises(ConfigError, match=says):
            parse_sample(bad)


@pytest.mark.parametrize(("args", "says"), [
    (["--grid", "train.optimiser.lr=0.1,0.2"], "train.optimiser: unknown key"),
    (["--grid", "train.optimizer.lr=0,0.1"], "train.optimizer.lr: must be greater than 0, got 0"),
    (["--grid", "train.optimizer.lr=0.1", "--sample", "train.batch_size=int:8:64"], "exclude each other"),
    (["--sample", "train.optimizer.lr=loguniform:1e-4:1e-1"], "--trials: give the number of points"),
    (["--grid", "train.optimizer.lr=0.1", "--prune", "hyperband"], "--prune: must be median or asha"),
    (["--grid", "train.optimizer.lr=0.1", "--metric", "test_acc"], "--metric: must be one of"),
    ([], "no search space"),
])  # fmt: skip
def test_bad_sweep_options_are_one_line_errors_and_make_no_folder(tmp_path: Path, args: list[str], says: str) -> None:
    result = runner.invoke(app, ["sweep", str(SEED), *args, "--out", str(tmp_path / "s")])
    msg = one_line_error(result)
    assert says in msg, msg
    assert not (tmp_path / "s").exists()


def test_without_optuna_one_line_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = runner.invoke(app, ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.1", "--out", str(tmp_path / "s")])
    assert "pip install 'cnncli[sweep]'" in one_line_error(result)


# ---------------------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def grid_sweep(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    folder = tmp_path_factory.mktemp("sweep") / "grid"
    args = ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.01,0.05", "--seeds", "2", "--workers", "2",
            *_sets(SMALL), "--data-dir", str(real_cifar_dir), "--out", str(folder)]  # fmt: skip
    return folder, ok(runner.invoke(app, args)), args


def test_a_2x2_grid_with_2_workers_gives_4_ordinary_run_folders(grid_sweep) -> None:
    folder, output, _ = grid_sweep
    trials = _trial_dirs(folder)
    assert len(trials) == 4
    points = set()
    for t in trials:
        assert {"config.yaml", "metrics.csv", "run.json", "overrides.json", "best.npz", "last.npz"} <= {
            p.name for p in t.iterdir()}
        recorded = json.loads((t / "overrides.json").read_text())
        cfg = load_config(t / "config.yaml")
        assert load_config(SEED, recorded["overrides"]) == cfg  # the recorded overrides rebuild the trial's config
        assert json.loads((t / "run.json").read_text())["state"] == "finished"
        points.add((cfg.train.optimizer.lr, cfg.seed))
    assert points == set(itertools.product((0.01, 0.05), (0, 1)))
    assert "2 worker process(es), 1 engine thread(s) each" in output
    assert "peak memory per worker" in output


def test_the_table_ranks_trials_by_the_best_metrics_csv(grid_sweep) -> None:
    folder, output, _ = grid_sweep
    shown = _show(folder)
    trials = shown["trials"]
    assert len(trials) == 4 and all(t["state"] == "finished" for t in trials)
    for t in trials:
        assert t["value"] == pytest.approx(_best_val(Path(t["run_dir"])), abs=1e-6)  # the csv keeps 6 digits
    values = [t["value"] for t in trials]
    assert values == sorted(values, reverse=True)
    best = max(_best_val(t) for t in _trial_dirs(folder))
    assert shown["best"]["value"] == pytest.approx(best, abs=1e-6)
    best_folder = Path(output.split("best run folder: ")[1].split()[0])
    assert _best_val(best_folder) == pytest.approx(best, abs=1e-9)
    test_acc = json.loads((best_folder / "run.json").read_text())["test_acc"]
    assert shown["best"]["test_acc"] == test_acc
    # the table groups the seeds of each learning rate: mean over 2 seeds
    lr01 = [t["value"] for t in trials if t["params"]["train.optimizer.lr"] == 0.01]
    [point] = [p for p in shown["points"] if p["params"]["train.optimizer.lr"] == 0.01]
    assert point["n"] == 2 and point["mean"] == pytest.approx(sum(lr01) / 2)


def test_the_same_command_again_repeats_nothing(grid_sweep) -> None:
    folder, _, args = grid_sweep
    before = {t: (t / "metrics.csv").read_bytes() for t in _trial_dirs(folder)}
    output = ok(runner.invoke(app, args))
    assert "nothing left to run" in output
    assert {t: (t / "metrics.csv").read_bytes() for t in _trial_dirs(folder)} == before


def test_a_second_process_adds_trials_to_the_same_journal(real_cifar_dir: Path, tmp_path: Path) -> None:
    base = ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.01,0.05", *_sets(SMALL),
            "--data-dir", str(real_cifar_dir), "--out", str(tmp_path / "s")]  # fmt: skip
    ok(runner.invoke(app, [*base, "--trials", "1"]))
    [first] = _trial_dirs(tmp_path / "s")
    kept = (first / "metrics.csv").read_bytes(), (first / "last.npz").read_bytes()
    proc = subprocess.run(_cli(*base), capture_output=True, text=True, timeout=300)  # another process
    assert proc.returncode == 0, proc.stderr
    assert "2 trials in all, 1 to run" in proc.stdout
    assert ((first / "metrics.csv").read_bytes(), (first / "last.npz").read_bytes()) == kept
    trials = _show(tmp_path / "s")["trials"]
    assert sorted(t["params"]["train.optimizer.lr"] for t in trials) == [0.01, 0.05]
    assert len(_trial_dirs(tmp_path / "s")) == 2


def test_a_sampled_search_repeats_each_point_over_the_seeds(real_cifar_dir: Path, tmp_path: Path) -> None:
    ok(runner.invoke(app, ["sweep", str(SEED), "--sample", "train.optimizer.lr=loguniform:1e-3:1e-1", "--trials", "2",
                           "--seeds", "2", "--workers", "2", *_sets(SMALL), "--data-dir", str(real_cifar_dir),
                           "--out", str(tmp_path / "s")]))
    trials = _show(tmp_path / "s")["trials"]
    assert len(trials) == 4 and len(_trial_dirs(tmp_path / "s")) == 4
    by_lr: dict[float, list[int]] = {}
    for t in trials:
        cfg = load_config(Path(t["run_dir"]) / "config.yaml")
        assert cfg.train.optimizer.lr == t["params"]["train.optimizer.lr"] and cfg.seed == t["seed"]
        by_lr.setdefault(cfg.train.optimizer.lr, []).append(cfg.seed)
    assert len(by_lr) == 2 and all(1e-3 <= lr <= 1e-1 for lr in by_lr)
    assert all(sorted(seeds) == [0, 1] for seeds in by_lr.values())  # each sampled point once per seed


def test_median_pruning_marks_pruned_trials_and_follows_the_rule(real_cifar_dir: Path, tmp_path: Path) -> None:
    sets = [*SMALL[:-1], "train.epochs=2"]
    ok(runner.invoke(app, ["sweep", str(SEED), "--grid", "train.optimizer.lr=1e-6,1e-5,0.01,0.02,0.03", "--prune",
                           "median", *_sets(sets), "--data-dir", str(real_cifar_dir), "--out", str(tmp_path / "s")]))
    trials = sorted(_show(tmp_path / "s")["trials"], key=lambda t: t["number"])  # one worker: in this order
    assert {t["state"] for t in trials} <= {"finished", "pruned"} and len(trials) == 5
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned, "the bad learning rates should have been pruned"
    # the rule, checked on the recorded numbers: at epoch k a trial is pruned when its best validation accuracy so
    # far is below the median of the epoch-k values of the trials completed before it (once there are 2 of those)
    completed: list[list[float]] = []
    for t in trials:
        folder = Path(t["run_dir"])
        curve = [r["val_acc"] for r in read_history(folder)]
        for k in range(1, len(curve) + 1):
            at_k = [c[k - 1] for c in completed]
            prune_here = len(at_k) >= 2 and max(curve[:k]) < np.median(at_k)
            assert prune_here == (t["state"] == "pruned" and k == len(curve)), (t, k)
        if t["state"] == "pruned":
            assert json.loads((folder / "run.json").read_text())["state"] == "pruned"  # marked in its folder
            assert len(curve) == 1  # never at the last epoch: pruning then would save nothing
        else:
            assert len(curve) == 2
            completed.append(curve)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


LONGER = ["data.limit=4096", "data.val_size=128", "train.batch_size=64", "train.epochs=3"]  # 62 steps per epoch


def test_a_stopped_sweep_continues_and_the_cut_off_trial_resumes_bit_for_bit(real_cifar_dir: Path,
                                                                             tmp_path: Path) -> None:
    folder = tmp_path / "s"
    args = ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.01,0.05", *_sets(LONGER), "--data-dir",
            str(real_cifar_dir), "--out", str(folder)]  # fmt: skip
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(folder / "trial-0000" / "metrics.csv", proc)  # its first epoch is done; two are left
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "run the same command again to continue" in stderr
    cut = folder / "trial-0000"
    assert json.loads((cut / "run.json").read_text())["state"] == "interrupted"
    state = json.loads(str(np.load(cut / "last.npz")["state"]))
    assert (state["epoch"], state["batch"]) != (3, 0) and state["epoch"] >= 1  # stopped inside the run
    assert not (folder / "trial-0001").exists()

    output = ok(runner.invoke(app, args))
    assert "(resuming its last.npz)" in output
    trials = _show(folder)["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"]  # the stopped attempt is not listed
    assert sorted(t["params"]["train.optimizer.lr"] for t in trials) == [0.01, 0.05]
    assert str(cut.resolve()) in {t["run_dir"] for t in trials}
    assert [int(r["epoch"]) for r in read_history(cut)] == [1, 2, 3]

    # the resumed trial ends exactly where an uninterrupted training of the same overrides does
    from cnncli.run.train import train

    overrides = json.loads((cut / "overrides.json").read_text())["overrides"]
    train(load_config(SEED, overrides), tmp_path / "whole", real_cifar_dir)
    assert_same_training_state(cut / "last.npz", tmp_path / "whole" / "last.npz")


def test_a_killed_worker_is_found_and_its_trial_resumed(real_cifar_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "s"
    args = ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.01", *_sets(LONGER), "--data-dir",
            str(real_cifar_dir), "--out", str(folder)]  # fmt: skip
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(folder / "trial-0000" / "metrics.csv", proc)
    worker = json.loads((folder / "trial-0000" / "run.json").read_text())["pid"]  # run.json names the worker
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)  # no chance to save or to tell the study
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert json.loads((folder / "trial-0000" / "run.json").read_text())["state"] == "running"  # as it was left

    output = ok(runner.invoke(app, args))
    assert "trial 1 started" in output and "(resuming its last.npz)" in output
    [trial] = _show(folder)["trials"]
    assert trial["state"] == "finished" and trial["run_dir"] == str((folder / "trial-0000").resolve())
    assert [int(r["epoch"]) for r in read_history(folder / "trial-0000")] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ PostgreSQL


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb in a temporary folder, trust auth); stopped after."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI: PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run should install them")
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="cnncli-pg-"))
    user = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        assert user is not None, "no unprivileged user (postgres or nobody) to run PostgreSQL as"
        shutil.chown(root, user)

    def as_user(*cmd: str) -> list[str]:
        if user is None:
            return list(cmd)
        if shutil.which("runuser"):
            return ["runuser", "-u", user, "--", *cmd]
        return ["su", user, "-s", "/bin/sh", "-c", shlex.join(cmd)]

    port = _free_port()
    data, log = root / "data", root / "server.log"
    pg_ctl = str(bin_dir / "pg_ctl")
    try:
        for cmd in ([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync"],
                    [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                     f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start"]):
            done = subprocess.run(as_user(*cmd), capture_output=True, text=True, timeout=120, cwd=root)
            if done.returncode != 0:
                pytest.fail(f"could not start PostgreSQL ({Path(cmd[0]).name}): {done.stderr or done.stdout} "
                            f"{log.read_text() if log.exists() else ''}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_user(pg_ctl, "-D", str(data), "-m", "immediate", "stop"), capture_output=True,
                           timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_two_machines_share_one_study_on_a_real_postgresql_server(postgres_url: str, real_cifar_dir: Path,
                                                                  tmp_path: Path) -> None:
    import optuna

    common = ["sweep", str(SEED), "--grid", "train.optimizer.lr=0.01,0.05", "--seeds", "2", *_sets(SMALL),
              "--data-dir", str(real_cifar_dir), "--storage", postgres_url, "--name", "shared"]  # fmt: skip
    procs = [subprocess.Popen(_cli(*common, "--out", str(tmp_path / f"machine{i}")), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 2)]  # started together
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr + stdout
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    everything = study.get_trials()
    trials = [t for t in everything if t.state.name == "COMPLETE"]
    # Optuna's grid sampler may hand both machines the same point at once; the later one must yield unrun
    assert all(t.state.name == "FAIL" and t.user_attrs.get("outcome") == "duplicate"
               for t in everything if t.number not in {d.number for d in trials}), [
        (t.number, t.state.name, t.user_attrs) for t in everything]
    assert sorted((t.params["train.optimizer.lr"], t.params["seed"]) for t in trials) == sorted(
        itertools.product((0.01, 0.05), (0, 1)))  # every grid point once, nothing repeated
    folders = [f for i in (1, 2) for f in _trial_dirs(tmp_path / f"machine{i}")]
    assert sorted(f.name for f in folders) == sorted(f"trial-{t.number:04d}" for t in trials)  # ran on one machine
    for t in trials:
        assert t.value == pytest.approx(_best_val(Path(t.user_attrs["run_dir"])), abs=1e-6)
    shown = _show("shared", "--storage", postgres_url)  # from the storage alone, as a third machine would
    assert len(shown["trials"]) == 4 and shown["best"]["value"] == max(t.value for t in trials)


def test_a_slot_goes_to_the_lower_trial_unless_the_higher_one_claimed_it_first() -> None:
    """Two trials handed one grid point: the lower-numbered wins, except when it wrote the slot only after the
    higher one had passed its check (claimed); a trial that gave the slot up (cut off) holds nothing."""
    import optuna

    from cnncli.run.sweep import is_duplicate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    a, b, c = study.ask(), study.ask(), study.ask()
    for t in (a, b):
        t.set_user_attr("slot", "lr=0.01|seed=0")
    assert not is_duplicate(study, a.number, "lr=0.01|seed=0")  # b (higher) has not claimed it
    assert is_duplicate(study, b.number, "lr=0.01|seed=0")  # a is lower
    assert not is_duplicate(study, c.number, "lr=0.05|seed=0")  # nobody holds that one
    b.set_user_attr("claimed", True)
    assert is_duplicate(study, a.number, "lr=0.01|seed=0")  # b passed its check before a wrote the slot
    b.set_user_attr("outcome", "interrupted")
    study.tell(b, state=optuna.trial.TrialState.FAIL)  # cut off: it no longer holds the slot
    assert not is_duplicate(study, a.number, "lr=0.01|seed=0")
