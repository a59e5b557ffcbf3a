"""The `.npz` checkpoint: layout, safe loading (allow_pickle=False), atomic writes, errors that name the problem,
and parameters-only checkpoints written by another tool (plain `np.savez`) working for `cnn eval` and `--init`.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from clihelp import one_line_error as _one_line_error
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import config_to_dict, load_config
from cnncli.host.errors import CheckpointError
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import apply_optim, apply_params, load_checkpoint, save_checkpoint
from cnncli.run.train import train

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
SHAPES = {"conv1.W": (16, 3, 3, 3), "conv1.b": (16,), "fc1.W": (10, 4096), "fc1.b": (10,)}

runner = CliRunner()


def _seed_cfg(*overrides: str):
    return load_config(SEED, list(overrides))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture(scope="module")
def trained(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-epoch run (1,000 images, 200 held out); returns its run folder."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = _seed_cfg("data.limit=1000", "data.val_size=200", "train.epochs=1")
    train(cfg, run, real_cifar_dir)
    return run


# --------------------------------------------------------------------------------------------- layout


def test_training_checkpoint_layout(trained: Path) -> None:
    arrays = _arrays(trained / "last.npz")  # allow_pickle=False: every entry is a plain array
    for k, shape in SHAPES.items():
        assert arrays[k].shape == shape, k
        assert arrays[k].dtype == np.float32, k
        assert np.all(np.isfinite(arrays[k]))
    # Optimizer buffers of the seed config's SGD (momentum 0.9): one per parameter, same shapes.
    for k, shape in SHAPES.items():
        assert arrays[f"optim.{k}.momentum"].shape == shape
        assert np.any(arrays[f"optim.{k}.momentum"] != 0)
    assert set(arrays) == {*SHAPES, "config", "state", "classes", *(f"optim.{k}.momentum" for k in SHAPES)}
    assert arrays["classes"].shape == () and json.loads(str(arrays["classes"]))[:2] == ["airplane", "automobile"]

    assert arrays["config"].shape == () and arrays["config"].dtype.kind == "U"
    config = json.loads(str(arrays["config"]))
    seed_raw = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    assert config["data"]["normalize"] == seed_raw["data"]["normalize"]
    assert config["model"]["layers"][0]["name"] == "conv1"
    assert config["data"]["limit"] == 1000 and config["data"]["val_size"] == 200

    assert arrays["state"].shape == () and arrays["state"].dtype.kind == "U"
    state = json.loads(str(arrays["state"]))
    steps = -(-800 // 128)  # 800 training images in batches of 128: 7 steps
    assert state["format"] == 1
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, steps)
    assert state["best_epoch"] == 1 and 0 <= state["best_val_acc"] <= 1
    assert len(state["history"]) == 1 and state["history"][0]["epoch"] == 1
    assert state["partial"] == {}


def test_save_and_load_roundtrip_keeps_everything(tmp_path: Path) -> None:
    cfg = _seed_cfg("train.optimizer={type: adam}")
    model = build_model(cfg.model, seed=3)
    optim = {"t": np.array(5, dtype=np.int64), **{f"{k}.m": np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}}
    state = {"epoch": 2, "batch": 3, "step": 40, "best_val_acc": 0.5, "best_epoch": 1, "history": [], "partial": {}}
    path = save_checkpoint(tmp_path / "sub" / "c.npz", model, cfg, optim=optim, state=state)
    assert path == tmp_path / "sub" / "c.npz"
    raw = _arrays(path)
    assert int(raw["optim.t"]) == 5 and "optim.fc1.W.m" in raw
    ck = load_checkpoint(path)
    assert ck.config == cfg
    assert ck.resumable
    assert ck.state == {"format": 1, **state}
    assert set(ck.params) == set(SHAPES)
    for k, v in model.named_params().items():
        np.testing.assert_array_equal(ck.params[k], v)
    assert set(ck.optim) == set(optim)
    np.testing.assert_array_equal(ck.optim["conv1.W.m"], optim["conv1.W.m"])
    # apply_optim copies into existing buffers; a missing buffer is named.
    bufs = {"t": np.zeros((), np.int64), "fc1.W.m": np.zeros((10, 4096), np.float32)}
    apply_optim(ck, bufs, path)
    assert int(bufs["t"]) == 5 and np.all(bufs["fc1.W.m"] == 0.5)
    with pytest.raises(CheckpointError, match=r"optim\.fc1\.W\.momentum"):
        apply_optim(ck, {"fc1.W.momentum": np.zeros((10, 4096), np.float32)}, path)
    with pytest.raises(CheckpointError, match=r"optim\.t has shape"):
        apply_optim(ck, {"t": np.zeros(2, np.int64)}, path)


def test_parameters_only_save_has_no_state(tmp_path: Path) -> None:
    cfg = _seed_cfg()
    path = save_checkpoint(tmp_path / "p.npz", build_model(cfg.model), cfg)
    assert set(_arrays(path)) == {*SHAPES, "config"}
    ck = load_checkpoint(path)
    assert not ck.resumable and ck.optim == {} and ck.state == {}


# ------------------------------------------------------------------------------------------ safe load


class _Payload:
    """Unpickling this would run `exec(code)`; a safe loader never unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def test_object_array_is_refused_and_no_code_runs(tmp_path: Path) -> None:
    cfg = _seed_cfg()
    good = save_checkpoint(tmp_path / "good.npz", build_model(cfg.model), cfg)
    arrays = _arrays(good)
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    arrays["extra"] = evil
    path = _write_npz(tmp_path / "evil.npz", arrays)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # Through the CLI as well: one line naming the file, exit 1, nothing executed.
    result = runner.invoke(app, ["eval", str(path), "--json"])
    msg = _one_line_error(result)
    assert str(path) in msg
    assert not marker.exists()
    # The payload is real: loading with pickle allowed would run it (proves the test can fail).
    with np.load(path, allow_pickle=True) as npz:
        npz["extra"]
    assert marker.exists()


# --------------------------------------------------------------------------------------- atomic write


def _crashing_savez(exc: BaseException):
    def savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip ")  # partial bytes of the new checkpoint ...
        file.flush()
        raise exc  # ... then the crash

    return savez


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_crash_during_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    cfg = _seed_cfg()
    path = save_checkpoint(tmp_path / "last.npz", build_model(cfg.model, seed=1), cfg)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", _crashing_savez(exc))
    with pytest.raises(type(exc)):
        save_checkpoint(path, build_model(cfg.model, seed=2), cfg)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.npz"], "no temporary file may remain"
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.params["fc1.W"], build_model(cfg.model, seed=1).named_params()["fc1.W"])


def test_crash_during_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _seed_cfg()
    monkeypatch.setattr(np, "savez", _crashing_savez(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c.npz", build_model(cfg.model), cfg)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically_with_normal_permissions(tmp_path: Path) -> None:
    cfg = _seed_cfg()
    path = save_checkpoint(tmp_path / "c.npz", build_model(cfg.model, seed=1), cfg)
    save_checkpoint(path, build_model(cfg.model, seed=2), cfg)
    np.testing.assert_array_equal(load_checkpoint(path).params["conv1.W"],
                                  build_model(cfg.model, seed=2).named_params()["conv1.W"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# --------------------------------------------------------------------------------------------- errors


def _good_arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    cfg = _seed_cfg()
    return _arrays(save_checkpoint(tmp_path / "base.npz", build_model(cfg.model), cfg))


def _load_into_model(path: Path) -> None:
    ck = load_checkpoint(path)
    apply_params(ck, build_model(ck.config.model), path)


def test_missing_array_is_named(tmp_path: Path) -> None:
    arrays = _good_arrays(tmp_path)
    del arrays["fc1.W"]
    path = _write_npz(tmp_path / "missing.npz", arrays)
    with pytest.raises(CheckpointError, match=r"missing parameter array\(s\) fc1\.W") as info:
        _load_into_model(path)
    assert str(path) in str(info.value)


def test_misshaped_array_is_named(tmp_path: Path) -> None:
    arrays = _good_arrays(tmp_path)
    arrays["conv1.W"] = np.zeros((16, 3, 5, 5), np.float32)
    path = _write_npz(tmp_path / "shape.npz", arrays)
    with pytest.raises(CheckpointError, match=r"conv1\.W has shape \(16, 3, 5, 5\).*\(16, 3, 3, 3\)") as info:
        _load_into_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("fc1.b", np.arange(10, dtype=np.int64), r"fc1\.b has dtype int64"),
        ("fc1.b", np.full(10, np.nan, np.float32), r"fc1\.b holds NaN"),
        ("fc2.W", np.zeros((3, 3), np.float32), r"unexpected array\(s\) fc2\.W"),
    ],
)
def test_other_bad_arrays_are_named(tmp_path: Path, key: str, value: np.ndarray, pattern: str) -> None:
    arrays = _good_arrays(tmp_path)
    arrays[key] = value
    path = _write_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(CheckpointError, match=pattern):
        _load_into_model(path)


def test_missing_config_entry_and_bad_config_json(tmp_path: Path) -> None:
    arrays = _good_arrays(tmp_path)
    config = arrays.pop("config")
    path = _write_npz(tmp_path / "noconfig.npz", arrays)
    with pytest.raises(CheckpointError, match="no 'config' entry"):
        load_checkpoint(path)
    arrays["config"] = np.array("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(_write_npz(tmp_path / "badjson.npz", arrays))
    raw = json.loads(str(config))
    raw["train"]["optimizer"]["lr"] = -1
    arrays["config"] = np.array(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"train\.optimizer\.lr"):
        load_checkpoint(_write_npz(tmp_path / "badcfg.npz", arrays))


def test_garbage_file_directory_and_missing_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(3000))
    with pytest.raises(CheckpointError, match=r"not a \.npz checkpoint \(not a zip archive") as info:
        load_checkpoint(garbage)
    assert str(garbage) in str(info.value)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(_write_npz(tmp_path / "full.npz", _good_arrays(tmp_path)).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated))):
        load_checkpoint(truncated)
    folder = tmp_path / "dir.npz"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.npz")


# -------------------------------------------------------------------- exported, parameters-only files


def _export_like_another_tool(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """Write parameters (float64, as e.g. exported from PyTorch) and a hand-written config with plain np.savez."""
    params = {k: v.astype(np.float64) for k, v in _arrays(src).items() if k in SHAPES}
    seed_raw = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    config = {
        "model": seed_raw["model"],
        "data": {"normalize": seed_raw["data"]["normalize"], "val_size": 200, "limit": 1000},
    }
    np.savez(dst, **params, config=np.array(json.dumps(config)))
    return params


def test_exported_checkpoint_works_for_eval(trained: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported.npz"
    _export_like_another_tool(trained / "best.npz", exported)
    assert set(_arrays(exported)) == {*SHAPES, "config"}
    assert not load_checkpoint(exported).resumable

    def eval_json(ckpt: Path, *extra: str) -> dict:
        result = runner.invoke(app, ["eval", str(ckpt), "--data-dir", str(real_cifar_dir), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(_stdout(result))

    got, ref = eval_json(exported), eval_json(trained / "best.npz")
    assert got["n"] == 10000
    assert got["accuracy"] == ref["accuracy"] and got["confusion"] == ref["confusion"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["accuracy"] > 0.15  # a trained network, not chance
    val = eval_json(exported, "--split", "val")  # the split comes from the stored config
    assert val["n"] == 200


def test_exported_normalization_is_used_by_eval(trained: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported.npz"
    params = _export_like_another_tool(trained / "best.npz", exported)
    other = tmp_path / "other-normalization.npz"
    seed_raw = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    config = {"model": seed_raw["model"], "data": {"normalize": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}}
    np.savez(other, **params, config=np.array(json.dumps(config)))
    losses = []
    for ckpt in (exported, other):
        result = runner.invoke(app, ["eval", str(ckpt), "--data-dir", str(real_cifar_dir), "--json"])
        assert result.exit_code == 0, result.output
        losses.append(json.loads(_stdout(result))["loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_exported_checkpoint_works_as_init(trained: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported.npz"
    params = _export_like_another_tool(trained / "best.npz", exported)
    out = tmp_path / "run"
    # A learning rate so small that no update changes a float32 weight: the run must end where it started.
    args = [
        "train", "--config", str(SEED), "--init", str(exported), "--data-dir", str(real_cifar_dir),
        "--out", str(out), "--epochs", "1",
        "--set", "data.limit=600", "--set", "data.val_size=100",
        "--set", "train.optimizer={type: sgd, lr: 1.0e-30, momentum: 0.0, weight_decay: 0.0}",
        "--set", "train.schedule={type: constant}",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    final = _arrays(out / "last.npz")
    for k in SHAPES:
        np.testing.assert_allclose(final[k], params[k], rtol=0, atol=1e-20, err_msg=k)
    fresh = build_model(_seed_cfg().model, seed=0).named_params()
    assert not np.allclose(final["fc1.W"], fresh["fc1.W"])  # not the He-initialised weights


def test_exported_checkpoint_cannot_be_resumed(trained: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported.npz"
    _export_like_another_tool(trained / "best.npz", exported)
    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(exported)]))
    assert str(exported) in msg and "--init" in msg


def test_init_with_misshaped_weights_names_the_array(trained: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    arrays = _arrays(trained / "best.npz")
    arrays["fc1.W"] = np.zeros((10, 8192), np.float32)
    bad = _write_npz(tmp_path / "bad.npz", arrays)
    args = ["train", "--config", str(SEED), "--init", str(bad), "--data-dir", str(real_cifar_dir),
            "--out", str(tmp_path / "run"), "--set", "data.limit=300", "--set", "data.val_size=0"]
    msg = _one_line_error(runner.invoke(app, args))
    assert str(bad) in msg and "fc1.W" in msg and "(10, 8192)" in msg


def test_resume_rejects_a_checkpoint_from_another_optimizer(trained: Path, real_cifar_dir: Path) -> None:
    """An SGD checkpoint resumed as Adam: the missing buffer is named (no silent restart from zeros)."""
    ck = load_checkpoint(trained / "last.npz")
    cfg = _seed_cfg("data.limit=1000", "data.val_size=200", "train.optimizer={type: adam}")
    with pytest.raises(CheckpointError, match=r"missing optimizer buffer optim\.(t|conv1\.W\.m)\b"):
        train(cfg, trained.parent / "other", real_cifar_dir, resume=ck, resume_path=trained / "last.npz")


def test_config_of_checkpoint_equals_run_config(trained: Path) -> None:
    ck = load_checkpoint(trained / "last.npz")
    assert config_to_dict(ck.config) == config_to_dict(
        _seed_cfg("data.limit=1000", "data.val_size=200", "train.epochs=1")
    )
