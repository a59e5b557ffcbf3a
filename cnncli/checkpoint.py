"""`.npz` checkpoints: parameters, the resolved config, and (for resuming) the training state.

Layout (every entry a plain array; loaded with allow_pickle=False):
- `<layer>.<param>`: the parameters, e.g. `conv1.W` (16, 3, 3, 3), `conv1.b` (16,), `fc1.W` (10, 4096), `fc1.b`,
  and beside them the layers' buffers (non-trainable state), e.g. `bn1.running_mean`.
- `config`: the resolved config as JSON text (a 0-d unicode array); it holds everything eval needs.
- `classes`: the class names, index = label, as a JSON list of strings (0-d unicode array); written by
  `cnn train` (from the data set), optional (older checkpoints have none: class indices stand in).
- training state, only in checkpoints written by `cnn train`:
  `optim.<param>.<buffer>` (e.g. `optim.conv1.W.momentum`, or Adam's `.m`, `.v` and `optim.t`), and
  `state`: JSON text with `epoch` (epochs completed), `batch` (batches done in the current epoch),
  `step` (optimizer steps so far), `best_val_acc`, `best_epoch`, `history` (one metrics row per epoch),
  `partial` (running sums of an interrupted epoch) and `format` (1). The data order and augmentation of
  every batch derive from (seed, epoch, batch), so these counters are the whole RNG state.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target:
a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.atomic import atomic_write
from cnncli.config import Config, config_from_json, config_to_dict
from cnncli.errors import CheckpointError, ConfigError
from cnncli.model import Sequential

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


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint (never executing code); CheckpointError names the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a .npz checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .npz checkpoint (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({e})") from None
    except ValueError as e:  # object arrays need pickle, which is refused
        raise CheckpointError(
            f"{path}: holds pickled objects, which are never loaded; a checkpoint holds plain arrays ({e})"
        ) from None
    if "config" not in arrays:
        raise CheckpointError(f"{path}: no 'config' entry (the resolved config as JSON text)")
    try:
        config = config_from_json(str(arrays.pop("config")), str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    state: dict[str, Any] = {}
    if "state" in arrays:
        try:
            state = json.loads(str(arrays.pop("state")))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: the 'state' entry is not valid JSON ({e})") from None
    classes: tuple[str, ...] = ()
    if "classes" in arrays:
        try:
            names = json.loads(str(arrays.pop("classes")))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: the 'classes' entry is not valid JSON ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{path}: the 'classes' entry must be a JSON list of class names (strings)")
        classes = tuple(names)
    optim = {k.removeprefix("optim."): arrays.pop(k) for k in list(arrays) if k.startswith("optim.")}
    return Checkpoint(params=arrays, config=config, optim=optim, state=state, classes=classes)


def apply_params(ckpt: Checkpoint, model: Sequential, source: Path | str) -> None:
    """Copy the checkpoint's parameters and buffers into `model`; missing, extra or mis-shaped arrays are named."""
    expected = {**model.named_params(), **model.named_buffers()}
    missing = [k for k in expected if k not in ckpt.params]
    if missing:
        raise CheckpointError(f"{source}: missing parameter array(s) {', '.join(missing)}")
    extra = [k for k in ckpt.params if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected array(s) {', '.join(extra)} for this model")
    for k, v in expected.items():
        got = ckpt.params[k]
        if got.shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {got.shape}, the model needs {v.shape}")
        if not np.issubdtype(got.dtype, np.floating):
            raise CheckpointError(f"{source}: {k} has dtype {got.dtype}, expected floating point")
        if not np.all(np.isfinite(got)):
            raise CheckpointError(f"{source}: {k} holds NaN or infinite values")
    model.load_params(ckpt.params)
    model.load_buffers(ckpt.params)


def apply_optim(ckpt: Checkpoint, buffers: dict[str, np.ndarray], source: Path | str) -> None:
    """Copy optimizer buffers into `buffers` (in place); missing or mis-shaped ones are named."""
    for k, v in buffers.items():
        if k not in ckpt.optim:
            raise CheckpointError(f"{source}: missing optimizer buffer optim.{k} (saved with another optimizer?)")
        got = ckpt.optim[k]
        if got.shape != v.shape:
            raise CheckpointError(f"{source}: optim.{k} has shape {got.shape}, expected {v.shape}")
        v[...] = got
