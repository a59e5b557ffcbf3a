"""`.npz` checkpoints: parameters, the resolved config, and (for resuming) the training state.

Layout (every entry a plain array; loaded with allow_pickle=False):
- `<layer>.<param>`: the parameters, e.g. `conv1.W` (16, 3, 3, 3), `conv1.b` (16,), `fc1.W` (10, 4096), `fc1.b`,
  and beside them the layers' buffers (non-trainable state), e.g. `bn1.running_mean`.
- `config`: the resolved config as JSON text (a 0-d unicode array); it holds everything eval needs.
- `classes`: the class names, index = label, as a JSON list of strings (0-d unicode array); written by
  `cnn train` (from the data set), optional (older checkpoints have none: class indices stand in).
- training state, only in checkpoints written by `cnn train`:
  `optim.<param>.<buffer>` (e.g. `optim.conv1.W.momentum`, or Adam's `.m`, `.v` and `optim.t`; with
  train.lookahead, `optim.<param or buffer>.lookahead`, e.g. `optim.bn1.running_mean.lookahead`), and
  `state`: JSON text with `epoch` (epochs completed), `batch` (batches done in the current epoch),
  `step` (optimizer steps so far), `best_val_acc`, `best_epoch`, `history` (one metrics row per epoch),
  `partial` (running sums of an interrupted epoch) and `format` (1). The data order and augmentation of
  every batch derive from (seed, epoch, batch), so these counters are the whole RNG state.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target:
a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.config import Config, config_from_json, config_to_dict
from cnncli.host.atomic import atomic_write
from cnncli.host.errors import CheckpointError, ConfigError, os_reason
from cnncli.nn.model import Sequential, build_model

FORMAT = 1


@dataclass
class Checkpoint:
    """What a checkpoint holds. `state` and `optim` are empty for a parameters-only checkpoint."""

    params: dict[str, np.ndarray]  # parameters and buffers, '<layer>.<key>'
    config: Config
    optim: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()  # the class names (index = label); () when the checkpoint stores none

    @property
    def resumable(self) -> bool:
        return bool(self.state)


def save_checkpoint(
    path: Path,
    model: Sequential,
    config: Config,
    optim: dict[str, np.ndarray] | None = None,
    state: dict[str, Any] | None = None,
    classes: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Write atomically (temp file + fsync + rename). Returns `path`. `classes`: the class names, stored when given."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {**model.named_params(), **model.named_buffers()}
    arrays["config"] = np.array(json.dumps(config_to_dict(config)))
    if classes:
        arrays["classes"] = np.array(json.dumps([str(c) for c in classes]))
    for k, v in (optim or {}).items():
        arrays[f"optim.{k}"] = v
    if state is not None:
        arrays["state"] = np.array(json.dumps({"format": FORMAT, **state}))
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


# Bounds of what a checkpoint member may hold before its data is read (the .npy of a 0-d unicode array stores
# 4 bytes a character): the config as JSON text, the training state (a metrics row per epoch).
MAX_CONFIG_BYTES = 4 * 2**20
MAX_STATE_BYTES = 64 * 2**20
MAX_NPY_HEADER = 10_000  # NumPy's own bound on a .npy header's text
# SGD's and Adam's per-parameter buffers (run/optim.py; Adam's step: 't'), and the lookahead average of every
# parameter and buffer (run/lookahead.py)
OPTIM_BUFFERS = ("momentum", "m", "v", "lookahead")

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


@dataclass(frozen=True)
class _Expect:
    """What a member may hold: its shape (None: 0-d text), the dtype kinds allowed, and the most bytes."""

    shape: tuple[int, ...] | None
    kinds: str  # 'f' floating, 'iu' integers, 'U' text
    what: str


def shown_name(name: str) -> str:
    """A member or field name as a message shows it: as is when plain, quoted (escapes visible) otherwise, cut
    at 80 characters: a hostile name never breaks the one-line message."""
    plain = name.isprintable() and " " not in name and len(name) <= 80
    return name if plain else repr(name if len(name) <= 80 else name[:77] + "...")


def listed(names: list[str], most: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 12 more'."""
    shown = ", ".join(shown_name(n) for n in names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def _open_regular(path: Path) -> Any:
    """The file opened for reading, refusing anything that is not a regular file (a FIFO would block the open
    or the read forever; a device never ends) before and after opening it (O_NONBLOCK: a FIFO swapped in between
    cannot block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {os_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a folder, not a .npz checkpoint")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, "
                              "not a .npz checkpoint file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {os_reason(e)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is not a regular file (it changed while being opened)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, expect: _Expect, path: Path) -> np.ndarray:
    """One member's array, after its header matched `expect` and the zip entry's size matched the header.

    Checked before any data is read: the entry's declared size is at most what `expect` allows; the .npy version
    (1.0 or 2.0), dtype kind (never objects) and shape; and the entry's size equals the header plus shape × itemsize,
    so a compressed member can never expand beyond what its header declares. Then exactly that many bytes are read
    and the end of the entry is checked (which checks its CRC)."""
    where = f"{path}: {key}"
    if expect.shape is not None:
        most = MAX_NPY_HEADER + 16 + int(np.prod(expect.shape, dtype=np.int64)) * 8  # float64 is the widest allowed
    else:
        most = MAX_CONFIG_BYTES if key == "config" else MAX_STATE_BYTES
    if info.file_size > most:
        raise CheckpointError(f"{where}: the entry declares {info.file_size:,} bytes, more than {expect.what} can "
                              f"take ({most:,}); refusing to read it")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
            else:
                raise CheckpointError(f"{where}: .npy format version {version[0]}.{version[1]} is not read here "
                                      "(1.0 and 2.0 are)")
            if dtype.hasobject:
                raise CheckpointError(f"{where}: holds pickled objects, which are never loaded; a checkpoint holds "
                                      "plain arrays")
            if dtype.kind not in expect.kinds or (dtype.kind == "f" and dtype.itemsize > 8):
                raise CheckpointError(f"{where} has dtype {dtype}, expected {expect.what}")
            want = expect.shape if expect.shape is not None else ()
            if tuple(shape) != want:
                raise CheckpointError(f"{where} has shape {tuple(shape)}, the model needs {want}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if info.file_size != f.tell() + nbytes:
                raise CheckpointError(f"{where}: the entry holds {info.file_size - f.tell():,} bytes of data but its "
                                      f"header declares {nbytes:,} ({'×'.join(map(str, shape)) or 'a scalar'} of "
                                      f"{dtype}); the file is damaged or forged")
            data = f.read(nbytes)
            if len(data) != nbytes or f.read(1):
                raise CheckpointError(f"{where}: the entry's data does not match its header")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{where}: not a readable array ({reason})") from None
    arr = np.frombuffer(data, dtype=dtype)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    return np.array(arr, dtype=dtype.newbyteorder("=") if dtype.kind != "U" else dtype, copy=True)


def _text(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], key: str, path: Path) -> str:
    arr = _read_member(zf, infos[key], key, _Expect(None, "U", "JSON text (a 0-d unicode array)"), path)
    return str(arr[()])


def _json(text: str, where: str, bounded: bool = False) -> Any:
    """The JSON text of an entry; `bounded`: read as every config is (nesting, integer sizes; safeload), else
    plain JSON whose fields the reader checks itself (the training state)."""
    from cnncli.host.safeload import load_json

    try:
        return load_json(text) if bounded else json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON, numbers beyond Python's int limit, nesting too deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise CheckpointError(f"{where} is not valid JSON ({reason})") from None


def expected_arrays(config: Config) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter and buffer the config's network has ('conv1.W': (16, 3, 3, 3), …); builds it,
    so the size check of `cnncli.run.memory` refuses an absurd network first."""
    model = build_model(config.model, seed=config.seed)
    return {k: tuple(v.shape) for k, v in {**model.named_params(), **model.named_buffers()}.items()}


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint (never executing code); CheckpointError names the file and what is wrong.

    Treats the file as hostile: only a regular file is opened; the `config` member is read first (bounded) and
    the network it describes gives every other member's name, dtype kind and shape, checked from the member's
    .npy header before its data is read (see `_read_member`); the `state` member must be a JSON object (its
    fields are checked by the training loop, which owns them: cnncli/run/train.py).
    """
    path = Path(path)
    with _open_regular(path) as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise CheckpointError(f"{path}: not a .npz checkpoint (not a zip archive of arrays)") from None
        with zf:
            infos: dict[str, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                name = info.filename
                if not name.endswith(".npy") or info.is_dir():
                    raise CheckpointError(f"{path}: holds {name[:80]!r}, which is not an array (.npy) entry")
                key = name[: -len(".npy")]
                if key in infos:
                    raise CheckpointError(f"{path}: holds the entry {key[:80]!r} twice")
                infos[key] = info
            if "config" not in infos:
                raise CheckpointError(f"{path}: no 'config' entry (the resolved config as JSON text)")
            text = _text(zf, infos, "config", path)
            _json(text, f"{path}: the stored config", bounded=True)
            try:
                config = config_from_json(text, str(path))
                shapes = expected_arrays(config)
            except ConfigError as e:
                msg = str(e)
                raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: stored config: {msg}") from None
            arrays = [k for k in infos if k not in ("config", "state", "classes") and not k.startswith("optim.")]
            missing = [k for k in shapes if k not in infos]
            if missing:
                raise CheckpointError(f"{path}: missing parameter array(s) {listed(missing)}")
            extra = [k for k in arrays if k not in shapes]
            if extra:
                raise CheckpointError(f"{path}: unexpected array(s) {listed(extra)} for this model")
            params = {k: _read_member(zf, infos[k], k, _Expect(shapes[k], "f", "floating point"), path)
                      for k in shapes}
            optim: dict[str, np.ndarray] = {}
            for k in (k for k in infos if k.startswith("optim.")):
                optim[k.removeprefix("optim.")] = _read_member(zf, infos[k], k, _optim_expect(k, shapes, path), path)
            state: dict[str, Any] = {}
            if "state" in infos:
                raw = _json(_text(zf, infos, "state", path), f"{path}: the 'state' entry")
                if not isinstance(raw, dict):
                    raise CheckpointError(f"{path}: the 'state' entry is not a JSON object (got {type(raw).__name__})")
                state = raw
            classes: tuple[str, ...] = ()
            if "classes" in infos:
                names = _json(_text(zf, infos, "classes", path), f"{path}: the 'classes' entry")
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise CheckpointError(f"{path}: the 'classes' entry must be a JSON list of class names (strings)")
                classes = tuple(names)
    return Checkpoint(params=params, config=config, optim=optim, state=state, classes=classes)


def _optim_expect(key: str, shapes: dict[str, tuple[int, ...]], path: Path) -> _Expect:
    """optim.t: Adam's step count, an integer scalar; optim.<param>.<buffer>: the parameter's shape, floating."""
    name = key.removeprefix("optim.")
    if name == "t":
        return _Expect((), "iu", "an integer step count (a scalar)")
    param, _, buffer = name.rpartition(".")
    if buffer not in OPTIM_BUFFERS or param not in shapes:
        raise CheckpointError(f"{path}: unexpected optimizer buffer {shown_name(key)} (expected optim.<parameter>.<"
                              f"{'|'.join(OPTIM_BUFFERS)}> or optim.t)")
    return _Expect(shapes[param], "f", "floating point")


def _cast(got: np.ndarray, like: np.ndarray, key: str, source: Path | str, kinds: str = "f") -> np.ndarray:
    """`got` as `like`'s dtype, refusing another dtype kind and values that are not finite once cast (a float64
    1e300 becomes inf in float32, so finiteness is checked after the cast)."""
    if got.dtype.kind not in kinds:
        want = "floating point" if kinds == "f" else "an integer"
        raise CheckpointError(f"{source}: {key} has dtype {got.dtype}, expected {want}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = got.astype(like.dtype)
    if cast.dtype.kind == "f" and not np.all(np.isfinite(cast)):
        beyond = " once cast to " + str(like.dtype) if np.all(np.isfinite(got)) else ""
        raise CheckpointError(f"{source}: {key} holds NaN or infinite values{beyond}")
    return cast


def apply_params(ckpt: Checkpoint, model: Sequential, source: Path | str) -> None:
    """Copy the checkpoint's parameters and buffers into `model`; missing, extra, mis-shaped, non-float or
    non-finite (after the cast to the model's dtype) arrays are named."""
    expected = {**model.named_params(), **model.named_buffers()}
    missing = [k for k in expected if k not in ckpt.params]
    if missing:
        raise CheckpointError(f"{source}: missing parameter array(s) {listed(missing)}")
    extra = [k for k in ckpt.params if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected array(s) {listed(extra)} for this model")
    cast = {}
    for k, v in expected.items():
        got = ckpt.params[k]
        if got.shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {got.shape}, the model needs {v.shape}")
        cast[k] = _cast(got, v, k, source)
    model.load_params(cast)
    model.load_buffers(cast)


def apply_optim(ckpt: Checkpoint, buffers: dict[str, np.ndarray], source: Path | str,
                step: int | None = None) -> None:
    """Copy optimizer buffers into `buffers` (in place); missing, mis-shaped, wrongly typed or non-finite ones
    are named, and so is an Adam step count `t` that is not the run's `step` (when given)."""
    cast = {}
    for k, v in buffers.items():
        if k not in ckpt.optim:
            raise CheckpointError(f"{source}: missing optimizer buffer optim.{k} (saved with another optimizer?)")
        got = ckpt.optim[k]
        if got.shape != v.shape:
            raise CheckpointError(f"{source}: optim.{k} has shape {got.shape}, expected {v.shape}")
        cast[k] = _cast(got, v, f"optim.{k}", source, "iu" if v.dtype.kind in "iu" else "f")
        if k == "t" and step is not None and int(cast[k]) != step:
            raise CheckpointError(f"{source}: optim.t is {int(cast[k])}, but the training state says {step} steps "
                                  "were taken")
    for k, v in buffers.items():
        v[...] = cast[k]


def model_from_checkpoint(ckpt: Checkpoint, source: Path | str) -> Sequential:
    """The checkpoint's network with its weights (and buffers) loaded, float32, in training mode."""
    model = build_model(ckpt.config.model, seed=ckpt.config.seed)
    apply_params(ckpt, model, source)
    return model


def open_checkpoint(path: Path | str) -> tuple[Checkpoint, Sequential]:
    """Open a checkpoint file for use (eval, trace, plot, predict): (the checkpoint, its network with the weights
    loaded). The one call that turns a file into a model; errors are one-line `CheckpointError`s naming `path`."""
    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt, path)
