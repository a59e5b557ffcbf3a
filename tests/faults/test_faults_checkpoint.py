"""Hostile checkpoints and training state, built by hand: members whose .npy header lies, members that would
expand far beyond their header, FIFOs and devices, values that overflow float32, wrong dtypes and names, JSON bombs,
and training states out of range. Each is refused with one line naming the file and the member or field, before
the member's data (or the data set) is read."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from clihelp import one_line_error
from faultkit import cnn, copy_of_run, train
from helpers import closed_port_url
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.host.errors import CheckpointError
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import apply_optim, apply_params, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
runner = CliRunner()


def _npy(arr: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, arr, allow_pickle=True)
    return f.getvalue()


def _header(shape: tuple[int, ...], descr: str = "<f4", version: tuple[int, int] = (1, 0)) -> bytes:
    f = io.BytesIO()
    d = {"descr": descr, "fortran_order": False, "shape": shape}
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(f, d)
    return f.getvalue()


def _members(path: Path) -> dict[str, bytes]:
    """A real checkpoint's members as raw .npy bytes, by key."""
    with zipfile.ZipFile(path) as zf:
        return {info.filename[:-4]: zf.read(info) for info in zf.infolist()}


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED,
         names: list[str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name in names or [f"{k}.npy" for k in members]:
            zf.writestr(name, members[name[:-4] if name.endswith(".npy") else name])
    return path


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    cfg = load_config(SEED)
    return save_checkpoint(tmp_path / "good.npz", build_model(cfg.model, seed=1), cfg)


def _refused(path: Path, *parts: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ headers


def test_a_header_that_declares_more_data_than_the_entry_holds(good: Path, tmp_path: Path) -> None:
    m = _members(good)
    m["fc1.b"] = _header((10,)) + np.zeros(5, np.float32).tobytes()  # says 10 floats, holds 5
    _refused(_zip(tmp_path / "short.npz", m), "fc1.b: the entry holds 20 bytes of data but its header declares 40")
    m["fc1.b"] = _header((10,)) + np.zeros(50, np.float32).tobytes()  # trailing bytes beyond the declared array
    _refused(_zip(tmp_path / "long.npz", m), "fc1.b: the entry holds 200 bytes of data but its header declares 40")


def test_a_header_with_a_huge_shape_is_refused_before_its_data(good: Path, tmp_path: Path) -> None:
    m = _members(good)
    m["conv1.W"] = _header((10**6, 3, 3, 3)) + b"\0" * 16  # would be 108 MB; the member holds a header only
    _refused(_zip(tmp_path / "huge.npz", m), "conv1.W has shape (1000000, 3, 3, 3), the model needs (16, 3, 3, 3)")


def test_a_compressed_member_cannot_expand_beyond_its_header(good: Path, tmp_path: Path) -> None:
    m = _members(good)
    honest = _header((10, 4096)) + np.zeros((10, 4096), np.float32).tobytes()
    bomb = honest + bytes(30 * 2**20)  # 30 MiB of zeros deflate to ~30 kB
    m["fc1.W"] = bomb
    path = _zip(tmp_path / "bomb.npz", m, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        _refused(path, "fc1.W: the entry declares 31,621,248 bytes, more than floating point can take")
        # The same member with its sizes forged to the honest ones: reading stops there, and the CRC says so.
        _forge_size(path, "fc1.W.npy", len(honest))
        _refused(path, "fc1.W: not a readable array", "CRC")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB read"


def _forge_size(path: Path, name: str, size: int) -> None:
    """Overwrite the uncompressed size of zip member `name` in its local header and central directory entry."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    for sig, offset, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        at = data.find(sig)
        while at >= 0 and data[at + name_at: at + name_at + len(encoded)] != encoded:
            at = data.find(sig, at + 4)
        assert at >= 0, (sig, name)
        data[at + offset: at + offset + 4] = struct.pack("<I", size)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("key", "npy", "expected"), [
    ("fc1.b", _npy(np.zeros(10, np.complex64)), "fc1.b has dtype complex64, expected floating point"),
    ("fc1.b", _npy(np.zeros(10, bool)), "fc1.b has dtype bool, expected floating point"),
    ("fc1.b", _npy(np.array(["x"] * 10)), "fc1.b has dtype <U1, expected floating point"),
    ("fc1.b", _npy(np.zeros(10, np.longdouble)) if np.dtype(np.longdouble).itemsize > 8 else
     _npy(np.zeros(10, np.int8)), "fc1.b has dtype"),
    ("fc1.b", _npy(np.array([None] * 10, dtype=object)), "fc1.b: holds pickled objects"),
    ("config", _npy(np.zeros(())), "config has dtype float64, expected JSON text"),
    ("fc1.b", _header((10,), version=(2, 0))[:6] + b"\x03\x00" + _header((10,), version=(2, 0))[8:] +
     bytes(40), "fc1.b: .npy format version 3.0 is not read here"),
], ids=["complex", "bool", "text", "other", "object", "config-float", "npy-v3"])
def test_members_of_the_wrong_kind_are_named(good: Path, tmp_path: Path, key: str, npy: bytes, expected: str) -> None:
    m = _members(good)
    m[key] = npy
    _refused(_zip(tmp_path / "bad.npz", m), expected)


def test_optimizer_buffers_are_checked_by_name_dtype_and_shape(good: Path, tmp_path: Path) -> None:
    m = _members(good)
    for key, npy, expected in [
        ("optim.fc9.W.momentum", _npy(np.zeros(3, np.float32)), "unexpected optimizer buffer optim.fc9.W.momentum"),
        ("optim.fc1.W.velocity", _npy(np.zeros((10, 4096), np.float32)), "unexpected optimizer buffer"),
        ("optim.fc1.b.momentum", _npy(np.zeros(10, np.int32)), "optim.fc1.b.momentum has dtype int32"),
        ("optim.fc1.b.momentum", _npy(np.zeros(11, np.float32)), "optim.fc1.b.momentum has shape (11,)"),
        ("optim.t", _npy(np.zeros((), np.float64)), "optim.t has dtype float64, expected an integer step count"),
    ]:
        _refused(_zip(tmp_path / "bad.npz", {**m, key: npy}), expected)
    # values: finite once cast to the buffer's dtype, as parameters
    path = _zip(tmp_path / "nan.npz", {**m, "optim.fc1.b.momentum": _npy(np.full(10, 1e300))})
    with pytest.raises(CheckpointError, match=r"optim\.fc1\.b\.momentum holds NaN or infinite values once cast"):
        apply_optim(load_checkpoint(path), {"fc1.b.momentum": np.zeros(10, np.float32)}, path)


def test_entries_that_are_not_arrays_or_come_twice(good: Path, tmp_path: Path) -> None:
    m = _members(good)
    _refused(_zip(tmp_path / "txt.npz", {**m, "notes.txt": b"hi"},
                  names=[*(f"{k}.npy" for k in m), "notes.txt"]), "holds 'notes.txt', which is not an array")
    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = _zip(tmp_path / "twice.npz", m, names=[*(f"{k}.npy" for k in m), "fc1.b.npy"])
    _refused(twice, "holds the entry 'fc1.b' twice")


# ------------------------------------------------------------------------------ values after the cast


def test_finiteness_is_checked_after_the_cast_to_float32(good: Path, tmp_path: Path) -> None:
    m = _members(good)
    m["fc1.b"] = _npy(np.full(10, 1e300))  # finite in float64, inf in float32
    path = _zip(tmp_path / "overflow.npz", m)
    ck = load_checkpoint(path)
    assert np.all(np.isfinite(ck.params["fc1.b"]))  # nothing wrong before the cast
    with pytest.raises(CheckpointError, match=r"fc1\.b holds NaN or infinite values once cast to float32"):
        apply_params(ck, build_model(ck.config.model), path)
    err = one_line_error(runner.invoke(app, ["eval", str(path), "--data-dir", str(tmp_path / "none")]))
    assert f"{path}: fc1.b holds NaN or infinite values once cast to float32" in err
    m["fc1.b"] = _npy(np.full(10, np.nan))
    ck = load_checkpoint(_zip(tmp_path / "nan.npz", m))
    with pytest.raises(CheckpointError, match=r"fc1\.b holds NaN or infinite values$"):
        apply_params(ck, build_model(ck.config.model), tmp_path / "nan.npz")


# ------------------------------------------------------------------------------------ special files


def test_a_fifo_is_refused_at_once_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "last.npz"
    os.mkfifo(fifo)
    proc = subprocess.run([cnn(), "eval", str(fifo)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {fifo}: is a FIFO (named pipe), not a .npz checkpoint file"
    err = one_line_error(runner.invoke(app, ["train", "--resume", str(fifo)]))
    assert "is a FIFO (named pipe)" in err


def test_a_device_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"^/dev/zero: is a character device, not a \.npz checkpoint file$"):
        load_checkpoint(Path("/dev/zero"))


# --------------------------------------------------------------------------------------- JSON bombs


@pytest.mark.parametrize(("key", "text", "expected"), [
    ("config", "[" * 100_000 + "]" * 100_000, "the stored config is not valid JSON (nested deeper than 64 levels)"),
    ("config", "9" * 5000, "the stored config is not valid JSON"),
    ("state", '{"epoch": ' + "[" * 100_000 + "]" * 100_000 + "}", "the 'state' entry is not valid JSON (nested"),
    ("state", "[1, 2]", "the 'state' entry is not a JSON object (got list)"),
], ids=["config-deep", "config-huge-int", "state-deep", "state-list"])
def test_json_bombs_are_one_line(good: Path, tmp_path: Path, key: str, text: str, expected: str) -> None:
    m = _members(good)
    m[key] = _npy(np.array(text))
    _refused(_zip(tmp_path / "bomb.npz", m), expected)


# ------------------------------------------------------------------------------------- training state


@pytest.fixture(scope="module")
def resumable(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last.npz of a real one-epoch run (a copy: tests write variants beside it)."""
    return copy_of_run(tmp_path_factory, real_cifar_dir, tmp_path_factory.mktemp("state") / "run") / "last.npz"


def _with_state(src: Path, dest: Path, change) -> Path:
    m = _members(src)
    state = json.loads(str(np.lib.format.read_array(io.BytesIO(m["state"]))))
    change(state)
    m["state"] = _npy(np.array(json.dumps(state)))
    return _zip(dest, m)


def _set(**fields):
    return lambda s: s.update(fields)


def _row(**fields):
    return lambda s: s["history"][0].update(fields)


STATE_CASES = [
    (_set(epoch=-1), "state.epoch: expected an integer from 0 to 10000000, got -1"),
    (_set(epoch=10**12), "state.epoch: expected an integer from 0 to 10000000"),
    (_set(epoch="1"), "state.epoch: expected an integer from 0 to 10000000, got '1'"),
    (_set(epoch=True), "state.epoch: expected an integer"),
    (_set(batch=2**70), "state.batch: expected an integer from 0 to"),
    (_set(step=0), "state.step: expected an integer from 1 to"),
    (_set(best_epoch=5), "state.best_epoch: expected an integer from 1 to 1, got 5"),
    (_set(best_val_acc=1.5), "state.best_val_acc: expected a finite number from 0 to 1 or null, got 1.5"),
    (lambda s: s.update(best_val_acc=s["best_val_acc"] / 2), "state.best_val_acc: expected the val_acc of epoch 1"),
    (_set(history=[]), "state.history: expected a list of 1 metrics rows (one per completed epoch), got '0 rows'"),
    (_row(val_acc=float("nan")), "state.history[0].val_acc: expected a finite number from 0 to 1 or null, got nan"),
    (_row(epoch=7), "state.history[0].epoch: expected an integer from 1 to 1, got 7"),
    (lambda s: s["history"][0].pop("lr"), "state.history[0]: expected a mapping of epoch, train_loss"),
    (_row(train_loss=-1.0), "state.history[0].train_loss: expected a finite number at least 0"),
    (_set(partial={"loss": 1.0}), "state.partial: expected {} at an epoch boundary"),
    (_set(batch=3, partial={}), "state.partial: expected the running sums loss, correct, seen, train_seconds"),
    (_set(batch=3, partial={"loss": 1.0, "correct": 5.0, "seen": 0.0, "train_seconds": 1.0}), "state.partial.seen"),
    (_set(evil=1), "state.evil: unknown field"),
    (lambda s: s.pop("step"), "state.step: missing"),
    (_set(format=2), "state.format: expected 1 (the only state format), got 2"),
]


@pytest.mark.parametrize(("change", "expected"), STATE_CASES, ids=[c[1].split(":")[0] + f"-{i}"
                                                                   for i, c in enumerate(STATE_CASES)])
def test_a_damaged_training_state_is_named_before_the_data_loads(resumable: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, change,
                                                                 expected: str) -> None:
    monkeypatch.setenv("CNNCLI_CIFAR10_URL", closed_port_url())  # were the data needed, it would fail differently
    bad = _with_state(resumable, tmp_path / "last.npz", change)
    err = one_line_error(runner.invoke(app, ["train", "--resume", str(bad), "--data-dir", str(tmp_path / "none")]))
    assert err.startswith(f"error: {bad}: {expected}"), err


def test_a_state_beyond_this_runs_epoch_and_an_adam_step_count_that_disagrees(
        resumable: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    sums = {"loss": 30.0, "correct": 200.0, "seen": 2560.0, "train_seconds": 1.0}
    beyond = _with_state(resumable, tmp_path / "beyond.npz",
                         lambda s: s.update(batch=20, step=s["step"] + 20, partial=sums))
    err = one_line_error(train(real_cifar_dir, "--resume", str(beyond), "--epochs", "2"))
    assert f"{beyond}: state.batch: 20 batches done in epoch 2, but an epoch of this run has 15 steps" in err

    cfg = load_config(SEED, ["train.optimizer={type: adam}", "data.limit=2000", "data.val_size=200"])
    model = build_model(cfg.model)
    optim = {"t": np.array(5, np.int64), **{f"{k}.{b}": np.zeros_like(v) for k, v in model.named_params().items()
                                            for b in ("m", "v")}}
    state = json.loads(str(np.lib.format.read_array(io.BytesIO(_members(resumable)["state"]))))
    state.pop("format")
    adam = save_checkpoint(tmp_path / "adam.npz", model, cfg, optim=optim, state=state)  # 15 steps, t = 5
    err = one_line_error(train(real_cifar_dir, "--resume", str(adam), "--epochs", "2"))
    assert f"{adam}: optim.t is 5, but the training state says 15 steps were taken" in err


def test_a_state_written_before_states_had_a_format_number_still_resumes() -> None:
    from cnncli.run.train import _State

    legacy = {"epoch": 0, "batch": 0, "step": 0, "best_val_acc": None, "best_epoch": 0, "history": [], "partial": {}}
    assert _State.from_json(legacy, Path("old.npz")).epoch == 0
    with pytest.raises(CheckpointError, match="state.format: expected 1"):
        _State.from_json({**legacy, "format": 2}, Path("new.npz"))
