"""Sweeps on Optuna (the optional `sweep` extra): a search space over config key paths, trials run by worker
processes, each trial an ordinary run folder, the study in a journal file or any Optuna storage.

The search space uses the key paths of `--set`: a grid (`train.optimizer.lr=0.003,0.01`, run with Optuna's
GridSampler, the seeds being one more grid dimension `seed`) or sampled values (`loguniform:1e-4:1e-1`,
`uniform:a:b`, `int:a:b`, `choice:a,b,c`, TPE; each sampled point is repeated once per seed by enqueuing
copies). A sweep's identity is its base config (after `--set`), search space, seeds and metric: a study
started with another identity is refused, so re-running the same command continues the same study.

Trials. Each trial is a run folder `trial-NNNN` (N the Optuna trial number) under the sweep folder holding
`overrides.json` (the trial's `--set` strings and parameters) beside what `cnn train` writes; the trial's
results go to the study as user attributes too (best epoch, test accuracy, time, folder, host), so
`cnn sweep show` works from the storage alone. A trial that ends by pruning is PRUNED in the study and
`pruned` in its run.json.

Stopping and continuing. Ctrl-C or SIGTERM to `cnn sweep` is passed to each worker as one Ctrl-C: the
running trial saves a resumable last.npz after its current step, is marked FAIL with outcome
"interrupted", and the worker exits. A worker process that died without saying so (killed, machine
restarted) is found by its host and pid (same machine) or, on a database storage, by Optuna's heartbeat.
Every such cut-off trial is re-queued with the same parameters: when the re-queued trial runs on the
machine that holds its folder, it resumes from last.npz there (bit for bit, as `cnn train --resume`);
elsewhere it is rerun from the start in a new folder. Finished trials (complete, pruned, failed) are never
run again. Two processes handed the same grid point (Optuna's grid sampler can do that to concurrent
workers, and re-queued trials can) are resolved by the trial with the lower number, unless the higher one
had already claimed it; the other is marked FAIL with outcome "duplicate" and not shown.

Workers are subprocesses (`python -m cnncli.run.sweep`) that read their job from the environment and report
events as JSON lines on their standard output; nothing here prints to the terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnncli.config import MONITORED, Config, config_to_dict, load_config, parse_yaml, resolve_config
from cnncli.host.atomic import atomic_write
from cnncli.host.errors import CnnError, ConfigError
from cnncli.host.files import NotRegularFile, check_writable
from cnncli.host.safeload import describe, show
from cnncli.run.runs import OVERRIDES_FILE, process_alive, read_json_file

INSTALL_HINT = "Optuna is not installed; sweeps need the sweep extra: pip install 'cnncli[sweep]'"
SWEEP_FILE = "sweep.json"
JOURNAL_FILE = "study.journal"
METRICS = MONITORED  # what a sweep may optimise: the metrics early stopping may monitor
SAMPLE_KINDS = ("loguniform", "uniform", "int", "choice")
PRUNERS = ("median", "asha")
JOB_ENV = "CNNCLI_SWEEP_JOB"
HEARTBEAT_S, GRACE_S = 30, 120  # database storages: a RUNNING trial silent for GRACE_S is failed as cut off
ATTR = "cnncli"  # the study's user attribute holding the sweep's identity


class SweepUnavailable(CnnError):
    """Optuna is missing: the message says what to install."""


def require_optuna() -> Any:
    """The optuna module (its logging quietened to warnings); SweepUnavailable when it is not installed."""
    try:
        import optuna
    except ImportError:
        raise SweepUnavailable(INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ------------------------------------------------------------------------------------------ search space


@dataclass(frozen=True)
class Dimension:
    """One searched key: a grid (`values`) or a sampled range / choice."""

    key: str
    kind: str  # "grid" or one of SAMPLE_KINDS
    values: tuple[Any, ...] = ()  # grid and choice
    low: float | int | None = None
    high: float | int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "values": list(self.values), "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, d: Any, where: str = "dimension") -> Dimension:
        """From `to_json`'s mapping, every field checked (it may come from a damaged or hostile sweep.json)."""
        _check_fields(d, where, {"key": str, "kind": str, "values": list, "low": (int, float, type(None)),
                                 "high": (int, float, type(None))}, required=("key", "kind"))
        for i, v in enumerate(d.get("values") or ()):
            if not (v is None or isinstance(v, str | int | float | bool)):
                raise ConfigError(f"{where}.values[{i}]: expected a single value, got {describe(v)}")
        return cls(d["key"], d["kind"], tuple(d.get("values") or ()), d.get("low"), d.get("high"))

    def describe(self) -> str:
        if self.kind == "grid":
            return f"{self.key}={','.join(_text(v) for v in self.values)}"
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(_text(v) for v in self.values)}"
        return f"{self.key}={self.kind}:{_text(self.low)}:{_text(self.high)}"


def _text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else ("null" if v is None else str(v).lower() if isinstance(v, bool)
                                                  else str(v))


def _split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets or quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _scalars(option: str, item: str, texts: list[str]) -> tuple[Any, ...]:
    values = []
    for t in texts:
        if not t:
            raise ConfigError(f"{option} {item!r}: an empty value; separate values with single commas")
        try:
            v = parse_yaml(t)
        except yaml.YAMLError:
            raise ConfigError(f"{option} {item!r}: cannot read the value {t!r}") from None
        if not (v is None or isinstance(v, str | int | float | bool)):
            raise ConfigError(f"{option} {item!r}: {t!r} is not a single value (a number, word, true/false)")
        values.append(v)
    if len(set(map(json.dumps, values))) != len(values):
        raise ConfigError(f"{option} {item!r}: a value is repeated")
    return tuple(values)


def _key_of(option: str, item: str) -> tuple[str, str]:
    key, eq, rest = item.partition("=")
    key = key.strip()
    if not eq or not key or not rest.strip():
        example = "train.optimizer.lr=0.003,0.01" if option == "--grid" else "train.optimizer.lr=loguniform:1e-4:1e-1"
        raise ConfigError(f"{option} {item!r}: expected key.path=values, e.g. {option} {example}")
    if key == "name":
        raise ConfigError(f"{option} {item!r}: the config's name is not a searchable key")
    return key, rest.strip()


def parse_grid(item: str) -> Dimension:
    """'train.optimizer.lr=0.003,0.01' -> a grid dimension of the values (parsed as YAML scalars)."""
    key, rest = _key_of("--grid", item)
    return Dimension(key, "grid", _scalars("--grid", item, _split_top(rest)))


def parse_sample(item: str) -> Dimension:
    """'key=loguniform:1e-4:1e-1' | 'key=uniform:a:b' | 'key=int:a:b' | 'key=choice:a,b,c' -> a dimension."""
    key, rest = _key_of("--sample", item)
    kind, colon, args = rest.partition(":")
    kind = kind.strip()
    if kind not in SAMPLE_KINDS or not colon:
        raise ConfigError(f"--sample {item!r}: expected one of {', '.join(k + ':…' for k in SAMPLE_KINDS)} "
                          f"after '=', got {rest!r}")
    if key == "seed":
        raise ConfigError(f"--sample {item!r}: seeds are not sampled; use --seeds K to repeat each point")
    if kind == "choice":
        values = _scalars("--sample", item, _split_top(args))
        if len(values) < 2:
            raise ConfigError(f"--sample {item!r}: choice needs at least two values")
        return Dimension(key, kind, values)
    bounds = args.split(":")
    if len(bounds) != 2:
        raise ConfigError(f"--sample {item!r}: {kind} needs two bounds, {kind}:LOW:HIGH")
    try:
        lo, hi = (float(b) if kind != "int" else int(b) for b in bounds)
    except ValueError:
        what = "integers" if kind == "int" else "numbers"
        raise ConfigError(f"--sample {item!r}: the bounds must be {what}, got {':'.join(bounds)}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"--sample {item!r}: LOW must be below HIGH, got {_text(lo)} and {_text(hi)}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"--sample {item!r}: loguniform needs LOW > 0, got {_text(lo)}")
    return Dimension(key, kind, (), lo, hi)


def override(key: str, value: Any) -> str:
    """A `--set` string for one value (JSON is valid YAML and keeps strings strings)."""
    return f"{key}={json.dumps(value)}"


# ---------------------------------------------------------------------------------------------- the spec


@dataclass
class SweepSpec:
    """What a sweep runs. `identity()` is what must match to continue a study."""

    config: str  # absolute path of the YAML config
    config_name: str
    sets: list[str]
    grid: list[Dimension]
    sample: list[Dimension]
    seeds: list[int]
    metric: str
    mode: str  # "max" | "min"
    base_hash: str  # of the resolved base config (after --set)
    layers: list[str] = field(default_factory=list)
    tensorboard: bool = False

    @property
    def is_grid(self) -> bool:
        return not self.sample

    @property
    def seed_in_grid(self) -> bool:
        return any(d.key == "seed" for d in self.grid)

    def grid_space(self) -> dict[str, list[Any]]:
        space = {d.key: list(d.values) for d in self.grid}
        space.setdefault("seed", list(self.seeds))
        return space

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid_space().values())

    def keys(self) -> list[str]:
        return [d.key for d in self.grid + self.sample]

    def overrides(self, params: dict[str, Any], seed: int) -> list[str]:
        """The trial's `--set` strings: the sweep's own, then one per searched key, then the seed."""
        return [*self.sets, *(override(k, v) for k, v in params.items() if k != "seed"), f"seed={seed}"]

    def identity(self) -> dict[str, Any]:
        return {
            "config": self.config_name, "base": self.base_hash, "grid": [d.to_json() for d in self.grid],
            "sample": [d.to_json() for d in self.sample], "seeds": self.seeds, "metric": self.metric,
            "mode": self.mode,
        }  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [x.to_json() for x in self.grid]
        d["sample"] = [x.to_json() for x in self.sample]
        return d

    @classmethod
    def from_json(cls, d: Any) -> SweepSpec:
        """From `to_json`'s mapping, every field checked: ConfigError names the key and the kind of its value."""
        _check_fields(d, "spec", {"config": str, "config_name": str, "sets": list, "grid": list, "sample": list,
                                  "seeds": list, "metric": str, "mode": str, "base_hash": str, "layers": list,
                                  "tensorboard": bool},
                      required=("config", "config_name", "sets", "grid", "sample", "seeds", "metric", "mode",
                                "base_hash"))
        for key, kind in (("sets", str), ("seeds", int), ("layers", str)):
            for i, v in enumerate(d.get(key, [])):
                if not isinstance(v, kind) or isinstance(v, bool):
                    raise ConfigError(f"spec.{key}[{i}]: expected {'an integer' if kind is int else 'a string'}, "
                                      f"got {describe(v)}")
        d = dict(d)
        d["grid"] = [Dimension.from_json(x, f"spec.grid[{i}]") for i, x in enumerate(d.get("grid", []))]
        d["sample"] = [Dimension.from_json(x, f"spec.sample[{i}]") for i, x in enumerate(d.get("sample", []))]
        return cls(**d)

    def describe(self) -> str:
        dims = " ".join(d.describe() for d in self.grid + self.sample)
        seeds = f" over {len(self.seeds)} seeds" if len(self.seeds) > 1 and not self.seed_in_grid else ""
        return f"{self.config_name}: {dims}{seeds}, {self.metric} ({self.mode})"


def _check_fields(d: Any, where: str, kinds: dict[str, Any], required: tuple[str, ...]) -> None:
    """ConfigError unless `d` is a mapping of known keys, each holding a value of its kind (bool is no number)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {describe(d)}")
    for key in d:
        if key not in kinds:
            raise ConfigError(f"{where}: unknown key {show(key)}")
    for key in required:
        if key not in d:
            raise ConfigError(f"{where}.{key}: missing")
    for key, kind in kinds.items():
        if key in d:
            v = d[key]
            wrong = not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                        else (kind,)))
            if wrong:
                raise ConfigError(f"{where}.{key}: expected {_KIND_WORDS.get(kind, 'another kind')}, got "
                                  f"{describe(v)}")


_KIND_WORDS: dict[Any, str] = {str: "a string", list: "a list", bool: "true or false",
                               (int, float, type(None)): "a number or null"}


def _config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def build_spec(
    config: Path,
    sets: list[str],
    grid_items: list[str],
    sample_items: list[str],
    seeds: int,
    metric: str,
    mode: str | None,
    layers: list[Path] | None = None,
    tensorboard: bool = False,
) -> tuple[SweepSpec, Config]:
    """Parse and check the search space against the config: every grid value and both ends of every range
    must give a valid config (ConfigError naming the option otherwise). Returns the spec and the base config."""
    if metric not in METRICS:
        raise ConfigError(f"--metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    if mode is None:
        mode = "max" if metric.endswith("_acc") else "min"
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode: must be max or min, got {mode!r}")
    if seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {seeds}")
    grid = [parse_grid(g) for g in grid_items]
    sample = [parse_sample(s) for s in sample_items]
    if grid and sample:
        raise ConfigError("--grid and --sample exclude each other: a sweep is a grid or a sampled search; "
                          "use choice:a,b in --sample for a discrete key of a sampled search")
    if not grid and not sample:
        raise ConfigError("no search space: give --grid key=v1,v2 or --sample key=loguniform:LOW:HIGH")
    keys = [d.key for d in grid + sample]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ConfigError(f"{dup}: searched twice; give each key once")
    if "seed" in keys and seeds > 1:
        raise ConfigError("--grid seed=… and --seeds exclude each other: the grid already lists the seeds")
    base = load_config(config, sets)

    def check(option: str, d: Dimension, value: Any) -> None:
        item = override(d.key, value)
        try:
            load_config(config, [*sets, item])
        except ConfigError as e:
            msg = str(e)
            if msg.startswith(f"--set {item}: "):  # the value came from the --grid/--sample, not from a --set
                rest = msg.removeprefix(f"--set {item}: ")
                msg = rest if rest.startswith(d.key) else f"{d.key}: {rest}"
            raise ConfigError(f"{option} {d.describe()}: {msg}") from None

    for d in grid:
        for v in d.values:
            check("--grid", d, v)
    for d in sample:
        for v in (d.values if d.kind == "choice" else (d.low, d.high)):
            check("--sample", d, v)
    grid_seeds = next((list(d.values) for d in grid if d.key == "seed"), None)
    spec = SweepSpec(
        config=str(resolve_config(config).resolve()), config_name=base.name, sets=list(sets), grid=grid, sample=sample,
        seeds=grid_seeds or [base.seed + i for i in range(seeds)], metric=metric, mode=mode,
        base_hash=_config_hash(base), layers=[str(Path(p).resolve()) for p in layers or []], tensorboard=tensorboard,
    )  # fmt: skip
    if metric.startswith("val_") and base.data.val_size == 0:
        raise ConfigError(f"--metric {metric}: needs a validation set, but data.val_size is 0")
    return spec, base


def default_name(spec: SweepSpec) -> str:
    """'<config>-sweep-<hash>': the same command gives the same name (so it continues), another sweep another."""
    digest = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()[:6]
    return f"{spec.config_name}-sweep-{digest}"


def target_trials(spec: SweepSpec, trials: int | None) -> int:
    """How many trials the study should hold: the grid (or its first `trials`), or trials × seeds."""
    if spec.is_grid:
        return spec.grid_size if trials is None else min(trials, spec.grid_size)
    if trials is None:
        raise ConfigError("--trials: give the number of points to sample with --sample (each runs once per seed)")
    return trials * len(spec.seeds)


# ------------------------------------------------------------------------------------------------ storage


def masked_url(url: str) -> str:
    """The storage URL without its password (what sweep.json keeps and messages show)."""
    return re.sub(r"^([A-Za-z][\w+.-]*://[^:/@]*):[^@/]*@", r"\1@", url)


def with_driver(url: str) -> str:
    """'postgresql://…' names the psycopg (3) driver that the sweep extra installs, whatever SQLAlchemy's default."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str | None, sweep_dir: Path) -> Any:
    """The Optuna storage: the journal file in the sweep folder by default; a database URL (RDBStorage with a
    heartbeat); or the path of a journal file. ConfigError names --storage when it cannot be opened."""
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None or "://" not in url:
        path = Path(url) if url else Path(sweep_dir) / JOURNAL_FILE
        try:
            check_writable(path)  # a FIFO would block Optuna's reader, /dev/zero would be read without end
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except NotRegularFile as e:
            raise ConfigError(f"--storage {path}: is {e.kind}, not a journal file (a regular file or a new "
                              "path)") from None
        except OSError as e:
            raise ConfigError(f"--storage {path}: cannot open the journal file ({e.strerror or e})") from None
    last: Exception | None = None
    for attempt in range(5):  # several machines may create the tables at the same moment
        try:
            return optuna.storages.RDBStorage(with_driver(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                              engine_kwargs={"pool_pre_ping": True})
        except ImportError as e:
            raise ConfigError(f"--storage {masked_url(url)}: the database driver is missing ({e}); "
                              "pip install 'cnncli[sweep]'") from None
        except Exception as e:  # noqa: BLE001  (SQLAlchemy's errors: bad URL, refused connection, a race)
            last = e
            if type(e).__name__ not in ("IntegrityError", "ProgrammingError"):  # not two creators racing
                break
            time.sleep(0.5 * (attempt + 1))
    msg = str(last).strip().splitlines()[0] if last and str(last).strip() else repr(last)
    raise ConfigError(f"--storage {masked_url(url)}: cannot open the storage ({msg})")


def open_study(storage: Any, name: str, spec: SweepSpec | None, create: bool = True) -> Any:
    """Create or load study `name`. With a spec, a study started by another sweep is refused (ConfigError)."""
    optuna = require_optuna()
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ConfigError(f"{name}: no such study in the storage") from None
    assert spec is not None
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction="maximize" if spec.mode == "max" else "minimize")
    mine = spec.identity()
    theirs = study.user_attrs.get(ATTR)
    if theirs is None:
        study.set_user_attr(ATTR, mine)
        study.set_user_attr("cnncli_spec", spec.to_json())
    elif theirs != mine:
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        raise ConfigError(
            f"--name {name}: the study holds another sweep (its {', '.join(diff)} differ); give another --name, "
            "or repeat the command that started it"
        )
    return study


def write_sweep_file(sweep_dir: Path, spec: SweepSpec, name: str, storage_url: str | None) -> Path:
    """sweep.json: the spec, the study name and where the study lives (no password)."""
    if storage_url and "://" not in storage_url:
        storage_url = str(Path(storage_url).resolve())  # a journal file named relative to where the command ran
    payload = {"format": 1, "name": name, "storage": masked_url(storage_url) if storage_url else None,
               "spec": spec.to_json()}
    path = Path(sweep_dir) / SWEEP_FILE
    with atomic_write(path, binary=False) as f:
        f.write(json.dumps(payload, indent=1) + "\n")
    return path


@dataclass
class SweepPlace:
    """Where a sweep's study is: its folder (None when only a storage URL was given), storage, name."""

    sweep_dir: Path | None
    storage_url: str | None  # None: the journal file in sweep_dir
    name: str
    spec: SweepSpec | None


def locate(target: str, storage: str | None, runs_root: Path = Path("runs")) -> SweepPlace:
    """A sweep by folder, by name under runs/, or by name in `storage`; ConfigError says what was tried."""
    for folder in (Path(target), runs_root / target):
        info = read_json_file(folder / SWEEP_FILE)
        if info is not None:
            try:
                spec = SweepSpec.from_json(info["spec"]) if "spec" in info else None
                for key in ("storage", "name"):
                    if not isinstance(info.get(key), str | type(None)):
                        raise ConfigError(f"{key}: expected a string, got {describe(info[key])}")
            except ConfigError as e:
                raise ConfigError(f"{folder / SWEEP_FILE}: {e}") from None
            return SweepPlace(folder, storage or info.get("storage"), str(info.get("name") or folder.name), spec)
    if Path(target).is_dir():
        raise ConfigError(f"{target}: not a sweep folder (no {SWEEP_FILE})")
    if storage:
        return SweepPlace(None, storage, target, None)
    raise ConfigError(f"{target}: no sweep folder by that path or under {runs_root}/; for a study on a server give "
                      "--storage URL")


# ------------------------------------------------------------------------------------- trial bookkeeping


def _states() -> Any:
    return require_optuna().trial.TrialState


def _outcome(t: Any) -> str | None:
    return t.user_attrs.get("outcome")


def _cut_off(t: Any) -> bool:
    """A FAIL trial that did not finish on its own (Ctrl-C, killed, stale heartbeat): it is re-queued."""
    return t.state == _states().FAIL and _outcome(t) in (None, "interrupted")


def _counts(t: Any) -> bool:
    """Whether the trial holds its slot: finished for good, running, or queued."""
    s = _states()
    if t.state in (s.COMPLETE, s.PRUNED, s.RUNNING, s.WAITING):
        return True
    return t.state == s.FAIL and _outcome(t) in ("failed", "diverged")


def slot_of(spec: SweepSpec, params: dict[str, Any], number: int, attrs: dict[str, Any]) -> str:
    """What a trial stands for: its grid point, or (sampled) the point's first trial and the seed."""
    if spec.is_grid:
        return json.dumps({k: params.get(k) for k in sorted(spec.grid_space())}, sort_keys=True)
    return f"{attrs.get('origin', number)}:{attrs.get('seed', spec.seeds[0])}"


def _fixed_params(t: Any) -> dict[str, Any]:
    return dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})


def recover(study: Any) -> int:
    """Fail the RUNNING trials of processes on this host that are gone (their slot is then re-queued), and
    stale trials of a database storage's heartbeat. Returns how many were found."""
    optuna = require_optuna()
    found = 0
    with contextlib.suppress(Exception):
        optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(_states().RUNNING,)):
        if process_alive(t.user_attrs.get("host"), t.user_attrs.get("pid")) is False:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "outcome", "interrupted")
                study.tell(t.number, state=_states().FAIL)
                found += 1
            except Exception:  # noqa: BLE001,S110  (another process got there first)
                pass
    return found


def requeue_cut_off(study: Any) -> int:
    """Enqueue one retry (same parameters, same folder attributes) for every cut-off trial without one."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    n = 0
    for t in trials:
        if _cut_off(t) and t.number not in retried:
            keep = {k: t.user_attrs[k] for k in ("slot", "run_dir", "host", "seed", "origin") if k in t.user_attrs}
            study.enqueue_trial(_fixed_params(t), user_attrs={**keep, "retry_of": t.number})
            n += 1
    return n


def wants_more(study: Any, target: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state == _states().WAITING for t in trials):
        return True
    return sum(_counts(t) for t in trials) < target


def pending(study: Any, target: int) -> int:
    """Trials still to run: queued ones, cut-off ones to re-queue, and the rest up to `target`."""
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state == _states().WAITING for t in trials)  # counted below too: they hold their slots
    return waiting + max(0, target - sum(_counts(t) for t in trials))


def is_duplicate(study: Any, number: int, slot: str) -> bool:
    """Whether another trial already holds `slot`: a lower-numbered one, or a higher-numbered one that passed
    this check first (its `claimed`, written right after the check). Two machines can be handed the same grid
    point at once (Optuna's GridSampler says so of concurrent workers), and the lower-numbered trial may write
    its slot only after the higher one was checked: then the lower one yields."""
    return any(
        t.number != number and t.user_attrs.get("slot") == slot and _counts(t)
        and (t.number < number or bool(t.user_attrs.get("claimed")))
        for t in study.get_trials(deepcopy=False)
    )


# ----------------------------------------------------------------------------------------- the table


@dataclass
class TrialRow:
    number: int
    state: str  # finished / pruned / failed / diverged / interrupted / running / waiting
    params: dict[str, Any]  # searched keys (seed excluded)
    seed: int | None
    value: float | None  # the metric's best epoch value
    best_epoch: int | None
    epochs_done: int | None
    test_acc: float | None
    seconds: float | None
    run_dir: str | None
    host: str | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


STATE_NAMES = {"COMPLETE": "finished", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting"}


def trial_rows(study: Any, spec: SweepSpec | None) -> list[TrialRow]:
    """The study's trials as rows, best first by the metric; duplicates and superseded cut-off trials left out."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    maximize = study.direction.name == "MAXIMIZE"
    rows = []
    for t in trials:
        ua = t.user_attrs
        if _outcome(t) == "duplicate" or (_cut_off(t) and t.number in retried):
            continue
        state = STATE_NAMES.get(t.state.name) or (_outcome(t) or "interrupted")
        if state == "running" and process_alive(ua.get("host"), ua.get("pid")) is False:
            state = "interrupted"
        params = _fixed_params(t)
        seed = params.pop("seed", ua.get("seed"))
        value = t.value if t.state.name == "COMPLETE" else ua.get("value")
        rows.append(TrialRow(t.number, state, params, seed, value, ua.get("best_epoch"), ua.get("epochs_done"),
                             ua.get("test_acc"), ua.get("seconds"), ua.get("run_dir"), ua.get("host"),
                             ua.get("error")))
    order = {"finished": 0, "pruned": 1, "running": 2, "waiting": 3, "interrupted": 4, "diverged": 5, "failed": 6}

    def key(r: TrialRow) -> tuple:
        has = r.value is not None and r.state in ("finished", "pruned")
        v = (-r.value if maximize else r.value) if has and r.value is not None else 0.0
        return (order.get(r.state, 9) if not (has and r.state == "finished") else -1, v, r.number)

    return sorted(rows, key=key)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    done = [r for r in rows if r.state == "finished" and r.value is not None]
    return done[0] if done else None


@dataclass
class PointSummary:
    params: dict[str, Any]
    n: int
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    test_mean: float | None


def point_summaries(rows: list[TrialRow], maximize: bool) -> list[PointSummary]:
    """Finished trials grouped by their searched values (seeds pooled): mean and spread of the metric."""
    groups: dict[str, list[TrialRow]] = {}
    for r in rows:
        if r.state == "finished" and r.value is not None:
            groups.setdefault(json.dumps(r.params, sort_keys=True), []).append(r)
    out = []
    for members in groups.values():
        vals = [r.value for r in members if r.value is not None]
        tests = [r.test_acc for r in members if r.test_acc is not None]
        out.append(PointSummary(members[0].params, len(vals), statistics.fmean(vals),
                                statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                statistics.fmean(tests) if tests else None))
    return sorted(out, key=lambda p: -p.mean if maximize else p.mean)


# ------------------------------------------------------------------------------------------- the worker


def _emit_to(fd: int) -> Callable[[dict[str, Any]], None]:
    stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            stream.write(json.dumps(event) + "\n")
            stream.flush()

    return emit


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """On a database storage, record the trial's heartbeat while it runs (so other machines can tell it is alive)."""
    record = getattr(storage, "record_heartbeat", None)
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if record is None or not interval:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):
                record(trial_id)
            if done.wait(interval):
                return

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join(timeout=5)


def _best_of(history: list[Any], metric: str, mode: str) -> tuple[float | None, int | None]:
    vals = [(getattr(m, metric), m.epoch) for m in history if getattr(m, metric) is not None]
    if not vals:
        return None, None
    pick = max if mode == "max" else min
    best = pick(v for v, _ in vals)
    return best, next(e for v, e in vals if v == best)


def worker_main() -> int:
    """Entry point of a worker process: run trials until the study needs none or a stop is asked for."""
    job = json.loads(os.environ[JOB_ENV])
    events_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the event stream
    emit = _emit_to(events_fd)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"cnncli\.")
    stop = threading.Event()
    ppid = os.getppid()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, lambda s, f: signal.raise_signal(signal.SIGINT))
    code = 0
    try:
        code = _work(job, emit, stop, ppid)
    except CnnError as e:
        emit({"event": "error", "message": str(e)})
        code = 1
    finally:
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        except (ImportError, OSError):
            peak = None
        emit({"event": "exit", "worker": job["index"], "peak_rss_mb": peak, "pid": os.getpid()})
    return code


def _work(job: dict[str, Any], emit: Callable[[dict[str, Any]], None], stop: threading.Event, ppid: int) -> int:
    optuna = require_optuna()
    from cnncli.host.errors import TrainingDiverged
    from cnncli.run.checkpoint import load_checkpoint
    from cnncli.run.train import Callbacks, StopRun, TrainingInterrupted, train

    spec = SweepSpec.from_json(job["spec"])
    sweep_dir, data = Path(job["sweep_dir"]), Path(job["data"])
    if spec.layers:
        from cnncli.nn.registry import load_layer_file  # type: ignore[import-not-found]

        for p in spec.layers:
            load_layer_file(Path(p))
    storage = open_storage(job.get("storage"), sweep_dir)
    if spec.is_grid:

        class _Grid(optuna.samplers.GridSampler):
            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                """No study.stop(): the worker loop decides when the grid is done (re-queued trials carry no
                grid id, which GridSampler's own end test would trip over)."""

        sampler: Any = _Grid(spec.grid_space(), seed=0)
    else:
        sampler = optuna.samplers.TPESampler(constant_liar=True)
    pruner: Any = optuna.pruners.NopPruner()
    if job.get("prune") == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=max(2, len(spec.seeds)), n_warmup_steps=0)
    elif job.get("prune") == "asha":
        pruner = optuna.pruners.SuccessiveHalvingPruner()
    study = optuna.load_study(study_name=job["name"], storage=storage, sampler=sampler, pruner=pruner)
    host, target = socket.gethostname(), int(job["target"])

    def stopping() -> bool:
        return stop.is_set() or os.getppid() != ppid

    class TrialCallbacks(Callbacks):
        def __init__(self, trial: Any, epochs: int) -> None:
            self.trial, self.epochs, self.forwarded, self.history = trial, epochs, False, []

        def on_batch(self, *args: Any) -> None:
            if stopping() and not self.forwarded:  # a stop asked before the loop's own Ctrl-C handler was up
                self.forwarded = True
                signal.raise_signal(signal.SIGINT)

        def on_epoch_end(self, m: Any, is_best: bool) -> None:
            self.history.append(m)
            value = getattr(m, spec.metric)
            emit({"event": "epoch", "trial": self.trial.number, "epoch": m.epoch, "value": value})
            if value is None:
                return
            self.trial.report(value, m.epoch)
            if m.epoch < self.epochs and self.trial.should_prune():  # not after the last epoch: nothing to save
                raise StopRun("pruned", f"pruned after epoch {m.epoch}")

    while not stopping():
        recover(study)
        requeue_cut_off(study)
        if not wants_more(study, target):
            break
        trial = study.ask()
        ua = dict(trial.user_attrs)
        if spec.is_grid:
            space = spec.grid_space()
            params = {k: trial.suggest_categorical(k, space[k]) for k in space}
            seed = int(params["seed"])
        else:
            params = {}
            for d in spec.sample:
                if d.kind == "choice":
                    params[d.key] = trial.suggest_categorical(d.key, list(d.values))
                elif d.kind == "int":
                    params[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high))
                else:
                    params[d.key] = trial.suggest_float(d.key, float(d.low), float(d.high), log=d.kind == "loguniform")
            seed = int(ua.get("seed", spec.seeds[0]))
            if "origin" not in ua:  # a freshly sampled point: queue its other seeds
                trial.set_user_attr("origin", trial.number)
                trial.set_user_attr("seed", seed)
                for s in spec.seeds[1:]:
                    study.enqueue_trial(params, user_attrs={"origin": trial.number, "seed": s,
                                                            "slot": f"{trial.number}:{s}"})
                ua.update(origin=trial.number, seed=seed)
        slot = slot_of(spec, params, trial.number, ua)
        trial.set_user_attr("slot", slot)
        trial.set_user_attr("pid", os.getpid())
        if is_duplicate(study, trial.number, slot):
            trial.set_user_attr("outcome", "duplicate")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        trial.set_user_attr("claimed", True)  # a lower-numbered trial writing this slot from now on yields
        earlier = Path(ua["run_dir"]) if ua.get("run_dir") and ua.get("host") == host else None
        resume_from = earlier / "last.npz" if earlier is not None and (earlier / "last.npz").is_file() else None
        run_dir = earlier if resume_from is not None else sweep_dir / f"trial-{trial.number:04d}"
        trial.set_user_attr("host", host)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        overrides = spec.overrides(params, seed)
        if spec.tensorboard:
            overrides.append("train.tensorboard=true")
        shown = {k: v for k, v in params.items() if k != "seed"}
        emit({"event": "start", "trial": trial.number, "params": shown, "seed": seed, "run_dir": str(run_dir),
              "resumed": resume_from is not None, "worker": job["index"]})
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / OVERRIDES_FILE, binary=False) as f:
            f.write(json.dumps({"study": job["name"], "trial": trial.number, "params": shown, "seed": seed,
                                "overrides": overrides, "retry_of": ua.get("retry_of")}, indent=1) + "\n")
        t0 = time.perf_counter()
        state, value, best_epoch, test_acc, error = "finished", None, None, None, None
        cb = TrialCallbacks(trial, 0)
        try:
            with _heartbeat(study._storage, trial._trial_id):
                cfg = load_config(spec.config, overrides)
                cb.epochs = cfg.train.epochs
                resume = load_checkpoint(resume_from) if resume_from is not None else None
                if resume is not None and not resume.resumable:
                    resume, resume_from = None, None
                if stopping():
                    raise KeyboardInterrupt
                result = train(cfg, run_dir, data, resume=resume, resume_path=resume_from, callbacks=cb,
                               overrides=overrides)
            value, best_epoch = _best_of(result.history, spec.metric, spec.mode)
            test_acc = result.test.accuracy if result.test else None
            history = result.history
        except StopRun:
            state, history = "pruned", cb.history
            value, best_epoch = _best_of(history, spec.metric, spec.mode)
        except (TrainingInterrupted, KeyboardInterrupt):
            state, history = "interrupted", cb.history
        except TrainingDiverged as e:
            state, history, error = "diverged", cb.history, str(e)
        except CnnError as e:
            state, history, error = "failed", cb.history, str(e)
        epochs_done = len(history) if state != "finished" else len(result.history)
        seconds = time.perf_counter() - t0
        if resume_from is not None:  # the earlier, cut-off attempts' time in this folder
            before = next((t for t in study.get_trials(deepcopy=False) if t.number == ua.get("retry_of")), None)
            seconds += float((before.user_attrs.get("seconds") if before else None) or 0.0)
        attrs = {"best_epoch": best_epoch, "test_acc": test_acc, "epochs_done": epochs_done,
                 "seconds": round(seconds, 3), "value": value, "error": error}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        ts = optuna.trial.TrialState
        if state == "finished" and value is None:
            state, error = "failed", f"no {spec.metric} was recorded"
            trial.set_user_attr("error", error)
        if state == "finished":
            study.tell(trial, value)
            if spec.tensorboard:
                from cnncli.run.tb import write_hparams

                metrics = {spec.metric: value}
                if test_acc is not None:
                    metrics["test_acc"] = test_acc
                write_hparams(run_dir, {**shown, "seed": seed}, metrics)
        elif state == "pruned":
            study.tell(trial, state=ts.PRUNED)
        else:
            trial.set_user_attr("outcome", state)
            study.tell(trial, state=ts.FAIL)
        emit({"event": "end", "trial": trial.number, "state": state, "value": value, "best_epoch": best_epoch,
              "test_acc": test_acc, "seconds": time.perf_counter() - t0, "error": error, "run_dir": str(run_dir)})
        if state == "interrupted":
            break
    return 0


# --------------------------------------------------------------------------------------- the coordinator


@dataclass
class SweepOutcome:
    interrupted: bool
    signal: int | None  # the signal that stopped it
    ran: int  # trials that ended in this run
    peaks_mb: list[float]  # peak resident memory of each worker
    seconds: float
    errors: list[str]


def threads_per_worker(workers: int) -> int:
    """Engine threads per worker: the usable CPUs shared out, at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(workers, 1))


def run_sweep(
    sweep_dir: Path,
    spec: SweepSpec,
    name: str,
    storage_url: str | None,
    data_folder: Path,
    target: int,
    workers: int,
    threads: int,
    prune: str | None,
    on_event: Callable[[dict[str, Any]], None],
) -> SweepOutcome:
    """Start `workers` worker processes (each with `threads` engine threads) and relay their events to
    `on_event` until they finish. Ctrl-C / SIGTERM here is passed on to each worker as one Ctrl-C (a second
    one aborts their trials at once, a third kills them); returns what happened."""
    t0 = time.perf_counter()
    job = {"spec": spec.to_json(), "sweep_dir": str(Path(sweep_dir).resolve()), "storage": storage_url,
           "data": str(Path(data_folder).resolve()), "name": name, "target": target, "prune": prune}
    env_base = dict(os.environ)
    for var in ("CNNCLI_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env_base[var] = str(threads)
    procs: list[subprocess.Popen] = []
    events: queue.Queue = queue.Queue()

    def reader(p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                events.put(json.loads(line))
        events.put({"event": "_closed"})

    for i in range(workers):
        env = {**env_base, JOB_ENV: json.dumps({**job, "index": i})}
        p = subprocess.Popen([sys.executable, "-m", "cnncli.run.sweep"], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL,
                             env=env, text=True, encoding="utf-8", start_new_session=True)
        procs.append(p)
        threading.Thread(target=reader, args=(p,), daemon=True).start()

    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL if len(received) >= 3 else signal.SIGINT)
        on_event({"event": "stopping", "signal": signum, "count": len(received)})

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    closed, ran, peaks, errors = 0, 0, [], []
    try:
        while closed < len(procs):
            try:
                ev = events.get(timeout=0.5)
            except queue.Empty:
                continue
            kind = ev.get("event")
            if kind == "_closed":
                closed += 1
                continue
            if kind == "end":
                ran += 1
            elif kind == "exit" and ev.get("peak_rss_mb") is not None:
                peaks.append(float(ev["peak_rss_mb"]))
            elif kind == "error":
                errors.append(str(ev.get("message")))
            on_event(ev)
        for p in procs:
            p.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [p.returncode for p in procs if p.returncode not in (0, None)]
    if failed and not errors and not received:
        errors.append(f"{len(failed)} worker process(es) exited with code {failed[0]} (see the messages above)")
    return SweepOutcome(bool(received), received[0] if received else None, ran, peaks, time.perf_counter() - t0,
                        errors)


def prepare(
    spec: SweepSpec,
    sweep_dir: Path,
    name: str,
    storage_url: str | None,
) -> Any:
    """Open (or start) the study, write sweep.json and recover this host's cut-off trials; returns the study."""
    info = read_json_file(Path(sweep_dir) / SWEEP_FILE)
    if info is not None and info.get("name") not in (None, name):
        raise ConfigError(f"--out {sweep_dir}: holds the sweep {show(info.get('name'))}; give another --out")
    if info is not None and "spec" in info:
        try:
            theirs = SweepSpec.from_json(info["spec"])
        except ConfigError as e:
            raise ConfigError(f"--out {sweep_dir}: {SWEEP_FILE} is damaged ({e}); give another --out") from None
        if theirs.identity() != spec.identity():
            raise ConfigError(f"--out {sweep_dir}: holds another sweep ({theirs.describe()}); give another --out")
    storage = open_storage(storage_url, sweep_dir)
    study = open_study(storage, name, spec)
    write_sweep_file(sweep_dir, spec, name, storage_url)
    recover(study)
    return study


if __name__ == "__main__":
    sys.exit(worker_main())
