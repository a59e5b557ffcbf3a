"""Hostile YAML and JSON (configs, --set values, a checkpoint's stored config, run.json, sweep.json): alias bombs
are refused before they expand, deep nesting and huge integers end in one line, a value of the wrong kind
anywhere names its key path and its kind, and no message repeats a long value whole.

The library cases run in process; each family also goes once through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from clihelp import ok, one_line_error
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import config_from_json, config_to_dict, load_config
from cnncli.host.errors import CheckpointError, ConfigError
from cnncli.host.safeload import MAX_DEPTH, describe, load_json, load_yaml, show
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
CNN = str(Path(sys.executable).parent / "cnn")
runner = CliRunner()

# the "billion laughs": 9 levels of 9 aliases would be 9⁹ = 387,420,489 strings once expanded
BOMB = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)) + "seed: *a8\n"


def _cnn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CNN, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _cli_one_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _config_error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg  # one line, never the whole value
    return msg


# ---------------------------------------------------------------------------------------------- aliases


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    msg = _config_error(tmp_path, BOMB)
    assert "line 2" in msg and "YAML aliases (*a0) are not accepted" in msg
    err = _cli_one_line(_cnn("summary", "--config", str(tmp_path / "c.yaml"), cwd=tmp_path))
    assert err == f"error: {msg}"
    # in a --set value, and in the config a run folder keeps (cnn runs reads it as missing, at once)
    base = SEED.read_text(encoding="utf-8")
    msg = _config_error(tmp_path, base, ["model.layers=[&x {type: relu}, *x]"])
    assert msg.startswith("--set 'model.layers=[&x {type: relu}, *x]': cannot read the value") and "alias" in msg


def test_anchors_without_aliases_and_merge_free_yaml_still_load() -> None:
    assert load_yaml("a: &x 1\nb: 2\n") == {"a": 1, "b": 2}
    assert load_yaml("lr: 1e-3\nn: 1_000\n") == {"lr": 1e-3, "n": 1000}  # exponent floats read as numbers


# ------------------------------------------------------------------------------- nesting and integers


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_deep_nesting_is_one_line(tmp_path: Path, depth: int) -> None:
    msg = _config_error(tmp_path, "seed: " + "[" * depth + "]" * depth + "\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in msg
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_json("[" * depth + "]" * depth)
    ok_depth = MAX_DEPTH - 1  # 'seed:' is the first level
    assert load_yaml("seed: " + "[" * ok_depth + "]" * ok_depth) is not None


@pytest.mark.parametrize("digits", [20, 5000, 100_000])
def test_huge_integers_are_one_line(tmp_path: Path, digits: int) -> None:
    huge = "9" * digits
    msg = _config_error(tmp_path, f"seed: {huge}\n")
    assert "c.yaml: invalid YAML at line 1, column 7:" in msg and "too large" in msg
    msg = _config_error(tmp_path, SEED.read_text(encoding="utf-8"), [f"model.layers[0].out_channels={huge}"])
    assert msg.startswith("--set 'model.layers[0].out_channels=999") and "too large" in msg
    with pytest.raises(ValueError, match="too large"):
        load_json(f'{{"seed": {huge}}}')


def test_a_huge_integer_from_the_python_api_is_refused_and_shown_short() -> None:
    from cnncli.config import build_config

    raw = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    raw["model"]["layers"][0]["out_channels"] = 10**5000
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    msg = str(info.value)
    # 10**5000 has 5001 digits
    assert msg.startswith("model.layers[0].out_channels: the integer <an integer of about 5001 digits> is too large")
    assert len(msg) < 200


def test_repeated_keys_are_refused(tmp_path: Path) -> None:
    msg = _config_error(tmp_path, "seed: 1\nseed: 2\nmodel: {layers: [{type: relu}]}\n")
    assert msg == f"{tmp_path / 'c.yaml'}: invalid YAML at line 2, column 1: the key \"seed\" appears twice"


# ----------------------------------------------------------------------------------------- wrong kinds


@pytest.mark.parametrize(
    ("edit", "path", "kind"),
    [
        ("model.layers[0].type=[conv]", "model.layers[0].type", '["conv"] (a list)'),
        ("model.layers[0].type={name: conv}", "model.layers[0].type", '{"name": "conv"} (a mapping)'),
        ("train.optimizer.lr={a: 1}", "train.optimizer.lr", '{"a": 1} (a mapping)'),
        ("model.layers[0].out_channels=[16]", "model.layers[0].out_channels", "[16] (a list)"),
        ("data.dataset=[cifar10]", "data.dataset", '["cifar10"] (a list)'),
        ("name=[my, run]", "name", '["my", "run"] (a list)'),
        ("model.input_shape={c: 3}", "model.input_shape", '{"c": 3} (a mapping)'),
        ("data.augment.flip=yes please", "data.augment.flip", '"yes please" (a string)'),
        ("train=5", "train", "5 (an integer)"),
        ("model=[1, 2]", "model", "[1, 2] (a list)"),
        ("train.optimizer=[sgd]", "train.optimizer", '["sgd"] (a list)'),
        ("seed=2001-12-14", "seed", "(a date)"),
    ],
)
def test_a_value_of_the_wrong_kind_names_its_key_path_and_kind(edit: str, path: str, kind: str,
                                                                tmp_path: Path) -> None:
    key, value = edit.split("=", 1)
    raw = yaml.safe_load(SEED.read_text(encoding="utf-8"))  # the same mistake written in the file …
    node, parts = raw, key.replace("[", ".").replace("]", "").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = yaml.safe_load(value)
    msg = _config_error(tmp_path, yaml.safe_dump(raw))
    assert msg.startswith(f"{tmp_path / 'c.yaml'}: {path}: ") and kind in msg, msg
    msg = _config_error(tmp_path, SEED.read_text(encoding="utf-8"), [edit])  # … and in a --set
    assert msg.startswith(f"--set {edit}: ") and kind in msg, msg


def test_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    zeros = ", ".join(["0"] * 10_000)
    msg = _config_error(tmp_path, SEED.read_text(encoding="utf-8").replace("lr: 0.01", f"lr: [{zeros}]"))
    shown = msg.split("expected a number, got ", 1)[1]
    assert shown.startswith("[0, 0, 0,") and shown.endswith("…(a list of 10000 values)".replace("…", "… ")), msg
    assert len(shown) < 100
    text = "x" * 1_000_000
    msg = _config_error(tmp_path, SEED.read_text(encoding="utf-8").replace("type: conv", f"type: {text}"))
    assert "unknown layer type" in msg
    assert show({"k": [1, {"deep": "v" * 500}]}).endswith("…") and len(show("v" * 500)) <= 61
    assert describe(None) == "null" and describe(True) == "true (a boolean)"


def test_wrong_kind_through_the_console_script(tmp_path: Path) -> None:
    path = tmp_path / "kinds.yaml"
    path.write_text("model:\n  layers:\n  - {type: [conv]}\n", encoding="utf-8")
    err = _cli_one_line(_cnn("summary", "--config", str(path), cwd=tmp_path))
    assert err.startswith(f"error: {path}: model.layers[0].type: expected the name of a layer type")
    assert err.endswith('got ["conv"] (a list)')


# ----------------------------------------------------------------------------- JSON the tool reads


def _checkpoint_with_config_text(path: Path, text: str) -> Path:
    cfg = load_config(SEED)
    save_checkpoint(path, build_model(cfg.model, seed=0), cfg)
    with np.load(path, allow_pickle=False) as npz:
        entries = {k: npz[k] for k in npz.files}
    entries["config"] = np.array(text)
    np.savez(path, **entries)
    return path


def test_a_checkpoints_stored_config_is_read_bounded(tmp_path: Path) -> None:
    good = json.dumps(config_to_dict(load_config(SEED)))
    assert config_from_json(good, "x").model == load_config(SEED).model
    cases = {
        "deep": ("[" * 100_000 + "]" * 100_000, "nested deeper than"),
        "hugeint": (good.replace('"seed": 0', '"seed": ' + "7" * 5000), "too large"),
        "kind": (good.replace('"epochs": 15', '"epochs": [15]'),
                 "train.epochs: expected an integer, got [15] (a list)"),
    }
    for name, (text, needle) in cases.items():
        path = _checkpoint_with_config_text(tmp_path / f"{name}.npz", text)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value).startswith(str(path)) and needle in str(info.value), info.value
        assert len(str(info.value)) < 300
    err = _cli_one_line(_cnn("eval", str(tmp_path / "deep.npz"), cwd=tmp_path))
    assert "nested deeper than" in err


def test_hostile_run_records_do_not_stop_cnn_runs(tmp_path: Path) -> None:
    """A damaged run.json (deep, huge integers, wrong kinds) or a bomb in config.yaml: the run is still listed,
    every field of the kind it should be."""
    root = tmp_path / "runs"
    records = {
        "deep": "[" * 100_000 + "]" * 100_000,
        "hugeint": '{"state": "finished", "epochs": ' + "9" * 5000 + "}",
        "kinds": json.dumps({"state": ["finished"], "epochs": "3", "overrides": [1, {"a": 2}, "seed=1"],
                             "stopped_early": [1], "error": {"x": 1}, "best_epoch": "2", "test_acc": True,
                             "config": ["x"]}),
    }
    for name, text in records.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(BOMB if name == "kinds" else "name: ok\n", encoding="utf-8")
        (folder / "run.json").write_text(text, encoding="utf-8")
        (folder / "metrics.csv").write_text("epoch,val_acc,seconds\n1,0.5,2.0\n", encoding="utf-8")
    proc = subprocess.run([CNN, "runs", str(root), "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(listed) == ["deep", "hugeint", "kinds"]
    kinds = listed["kinds"]
    assert kinds["config"] == "?" and kinds["overrides"] == ["seed=1"] and kinds["epochs"] is None
    assert kinds["stopped_early"] is None and kinds["error"] is None and kinds["test_acc"] is None
    assert kinds["state"] in ("finished", "interrupted") and kinds["epochs_done"] == 1
    assert listed["hugeint"]["epochs"] is None and listed["deep"]["config"] == "ok"
    table = ok(runner.invoke(app, ["runs", str(root)]))  # the table renders them too
    assert "kinds" in table


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"grid": [5]}, "spec.grid[0]: expected a mapping, got 5 (an integer)"),
        ({"seeds": ["0"]}, 'spec.seeds[0]: expected an integer, got "0" (a string)'),
        ({"metric": ["val_acc"]}, 'spec.metric: expected a string, got ["val_acc"] (a list)'),
        ({"extra": 1}, 'spec: unknown key "extra"'),
    ],
)
def test_a_damaged_sweep_json_is_one_line(spec: dict, needle: str, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    good = {"config": str(SEED), "config_name": "seed", "sets": [], "grid": [{"key": "seed", "kind": "grid",
            "values": [0, 1]}], "sample": [], "seeds": [0], "metric": "val_acc", "mode": "max", "base_hash": "x"}
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"name": "s", "storage": None, "spec": {**good, **spec}}))
    err = one_line_error(runner.invoke(app, ["sweep", "show", str(folder)]))
    assert err == f"error: {folder / 'sweep.json'}: {needle}", err


def test_what_is_within_the_bounds_still_loads() -> None:
    """The bounds refuse only what no config means: every shipped config loads, and a YAML at the depth and
    integer limits is read."""
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)
    assert load_yaml(f"seed: {2**63 - 1}") == {"seed": 2**63 - 1}
    assert load_json(json.dumps({"seed": -(2**63 - 1)})) == {"seed": -(2**63 - 1)}
