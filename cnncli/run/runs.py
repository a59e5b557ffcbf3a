"""Run folders: the `run.json` record that `cnn train` keeps, and finding and summarising runs under a folder.

`run.json` (written atomically by the training loop at the start, on every stop and at the end):
`state` is one of running / finished / interrupted / failed / pruned; beside it the config name, the
`--set` overrides, planned and completed epochs, the best validation accuracy and its epoch, the test
accuracy and loss of best.npz, the summed epoch times (`seconds`), `stopped_early` (the epoch early
stopping ended the run after, or null), `error` (the one-line reason of a failure), `host` / `pid`
of the process writing it, and `data_dir`, the data folder the run read (`cnn plot` and `cnn eval` of its
checkpoints use it when no --data-dir is given). A folder still marked `running` whose process is gone
(same host, no such pid) is reported as interrupted: it was killed before it could say so.

A run folder is any folder with a `config.yaml` and a `metrics.csv`, `run.json` or `last.npz`; folders are
searched recursively, so a sweep folder lists each of its trials. Nothing here prints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnncli.host.atomic import atomic_write
from cnncli.host.errors import CnnError
from cnncli.host.files import read_regular
from cnncli.host.safeload import load_json, load_yaml

MAX_RECORD_BYTES = 16 * 1024**2  # run.json, overrides.json, sweep.json, config.yaml: kilobytes; larger is damage
RUN_FILE = "run.json"
OVERRIDES_FILE = "overrides.json"
STATES = ("running", "finished", "interrupted", "failed", "pruned")
FORMAT = 1


def write_run_file(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write `run_dir/run.json` atomically with `record` plus format, host, pid and the time."""
    payload = {
        "format": FORMAT,
        **record,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(run_dir) / RUN_FILE
    with atomic_write(path, binary=False) as f:
        f.write(json.dumps(payload, indent=1) + "\n")
    return path


def _read_small_text(path: Path) -> str | None:
    """The UTF-8 text of a regular file of at most MAX_RECORD_BYTES, else None (never blocks on a pipe)."""
    try:
        return read_regular(path, MAX_RECORD_BYTES, "run record").decode("utf-8")
    except (OSError, UnicodeDecodeError):  # NotRegularFile and TooLarge are OSErrors too
        return None


def recorded_data_dir(run_dir: Path) -> Path | None:
    """The data folder the run in `run_dir` read (`data_dir` of its run.json), when it still is a folder."""
    record = read_json_file(Path(run_dir) / RUN_FILE) or {}
    folder = record.get("data_dir")
    if isinstance(folder, str) and folder and "\0" not in folder and Path(folder).is_dir():
        return Path(folder)
    return None


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is missing, unreadable, hostile (too large, too deep,
    huge integers: cnncli/host/safeload.py) or not an object."""
    text = _read_small_text(path)
    if text is None:
        return None
    try:
        data = load_json(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def process_alive(host: str | None, pid: Any) -> bool | None:
    """True / False for a process on this host; None when it runs elsewhere (or the record has no pid)."""
    if host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------- discovery


@dataclass
class RunSummary:
    """One run folder, as `cnn runs` shows it."""

    path: Path
    config: str
    overrides: list[str]
    epochs_done: int
    epochs: int | None  # planned
    best_epoch: int | None
    best_val_acc: float | None
    test_acc: float | None
    seconds: float  # summed epoch times
    state: str
    stopped_early: int | None = None
    error: str | None = None
    history: list[dict[str, float | None]] = field(default_factory=list, repr=False)  # metrics.csv rows

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        d["path"] = str(self.path if root is None else _relative(self.path, root))
        return d


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any(
        (path / name).is_file() for name in ("metrics.csv", RUN_FILE, "last.npz")
    )


def find_runs(root: Path) -> list[Path]:
    """Every run folder at or below `root` (hidden folders skipped), sorted by path."""
    root = Path(root)
    if not root.exists():
        raise CnnError(f"{root}: folder not found")
    if not root.is_dir():
        raise CnnError(f"{root}: not a folder")
    found = []
    for folder, dirs, _files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if is_run_folder(Path(folder)):
            found.append(Path(folder))
    return sorted(found)


def _float(text: str | None) -> float | None:
    try:
        v = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return v if v is None or math.isfinite(v) else None


def read_history(run_dir: Path) -> list[dict[str, float | None]]:
    """metrics.csv as a list of rows (numbers, None where empty); [] when there is none or it is unreadable."""
    text = _read_small_text(Path(run_dir) / "metrics.csv")
    if text is None:
        return []
    rows = []
    try:
        for row in csv.DictReader(text.splitlines()):
            rows.append({k: _float(v) for k, v in row.items() if isinstance(k, str) and k and isinstance(v, str)})
    except csv.Error:  # a damaged file (a field beyond csv's size limit, a NUL byte)
        return []
    return [r for r in rows if r.get("epoch") is not None]


def read_config_raw(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as plain data ({} when it cannot be read, or is hostile: cnncli/host/safeload.py)."""
    text = _read_small_text(Path(run_dir) / "config.yaml")
    if text is None:
        return {}
    try:
        raw = load_yaml(text)
    except yaml.YAMLError:
        return {}
    return raw if isinstance(raw, dict) else {}


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _text_or_none(v: Any, limit: int = 500) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def summarize_run(run_dir: Path) -> RunSummary:
    """Read one run folder (config.yaml, metrics.csv, run.json, overrides.json) into a `RunSummary`."""
    run_dir = Path(run_dir)
    raw = read_config_raw(run_dir)
    record = read_json_file(run_dir / RUN_FILE) or {}
    history = read_history(run_dir)
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    # every field of a record is checked for its kind: a damaged or hostile run.json lists as far as it can
    epochs = _int_or_none(record.get("epochs", train.get("epochs")))
    overrides = record.get("overrides")
    if not isinstance(overrides, list):
        overrides = (read_json_file(run_dir / OVERRIDES_FILE) or {}).get("overrides", [])
    overrides = [o for o in overrides if isinstance(o, str)] if isinstance(overrides, list) else []
    vals = [(r["val_acc"], int(r["epoch"])) for r in history if r.get("val_acc") is not None]
    best_val, best_epoch = max(vals, key=lambda v: (v[0], -v[1])) if vals else (None, None)
    if best_epoch is None and (_int_or_none(record.get("best_epoch")) or 0) > 0:
        best_epoch = record["best_epoch"]
    state = record.get("state")
    if state == "running" and process_alive(record.get("host"), record.get("pid")) is False:
        state = "interrupted"
    if state not in STATES:
        state = "finished" if isinstance(epochs, int) and len(history) >= epochs else "interrupted"
    return RunSummary(
        path=run_dir,
        config=_text_or_none(raw.get("name", record.get("config")), 200) or "?",
        overrides=overrides,
        epochs_done=len(history),
        epochs=epochs,
        best_epoch=best_epoch,
        best_val_acc=best_val,
        test_acc=record.get("test_acc") if isinstance(record.get("test_acc"), int | float) and not isinstance(
            record.get("test_acc"), bool) else None,
        seconds=sum(r.get("seconds") or 0.0 for r in history),
        state=state,
        stopped_early=_int_or_none(record.get("stopped_early")),
        error=_text_or_none(record.get("error")),
        history=history,
    )


def list_runs(root: Path) -> list[RunSummary]:
    return [summarize_run(p) for p in find_runs(root)]


# ------------------------------------------------------------------------------------------ grouping


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'optimizer': {'lr': 0.1}}, 'model': {'layers': [{...}]}} -> {'train.optimizer.lr': 0.1,
    'model.layers[0].type': ...}: the key paths that `--set` takes."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


IGNORED_IN_GROUPS = ("seed", "name", "train.tensorboard")


def group_runs(runs: list[RunSummary]) -> list[tuple[str, list[RunSummary]]]:
    """Runs whose configs are equal but for the seed, as (label, runs), ordered by the values that differ.

    The label names the config values that differ between the groups (`train.optimizer.lr=0.01`), or the
    config name when there is a single group.
    """
    flats = [flatten(read_config_raw(r.path)) for r in runs]
    keys: dict[str, list[int]] = {}
    order: list[str] = []
    for i, f in enumerate(flats):
        ident = json.dumps({k: v for k, v in f.items() if k not in IGNORED_IN_GROUPS}, sort_keys=True, default=str)
        if ident not in keys:
            keys[ident] = []
            order.append(ident)
        keys[ident].append(i)
    firsts = [flats[keys[k][0]] for k in order]
    all_keys = sorted({k for f in firsts for k in f} - set(IGNORED_IN_GROUPS))
    varying = [k for k in all_keys if len({json.dumps(f.get(k), default=str) for f in firsts}) > 1]
    def rank(first: dict[str, Any]) -> tuple:
        return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0, str(v))
                     for v in (first.get(k) for k in varying))

    pairs = sorted(zip(order, firsts, strict=True), key=lambda p: rank(p[1]))  # by the varying values
    groups = []
    for ident, first in pairs:
        members = [runs[i] for i in keys[ident]]
        if varying:
            label = " ".join(f"{short_key(k, varying)}={_show(first.get(k))}" for k in varying)
        else:
            label = members[0].config
        groups.append((label, members))
    return groups


def short_key(key: str, keys: list[str]) -> str:
    """The shortest dotted suffix of `key` that no other of `keys` ends with ('train.optimizer.lr' -> 'lr')."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in keys):
            return suffix
    return key


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
