"""The engine's micro-batch sizes, fitted to the machine the tool runs on.

A micro-batch is the slice of a batch one worker thread computes at a time (`cnncli/engine/executor.py`). Its best
size depends on the machine (cache sizes, cores, the BLAS build) and on the network's shapes, so it is
measured: each candidate size is timed on random data of the config's shape, in interleaved rounds, and the
fastest median wins. The result is cached per machine and network shape in ``tune.json`` under the cache
folder (``$CNNCLI_CACHE``, else ``$XDG_CACHE_HOME/cnncli``, else ``~/.cache/cnncli``); `cnn bench --tune`
measures again. ``CNNCLI_TUNE=0`` turns the automatic calibration off (the built-in defaults are used).

The training micro-batch changes the order in which a batch's gradients are summed, so a run records the
sizes it trained with (its checkpoints' state) and a resumed run uses those, whatever the cache says now.
With a batch-norm in training mode the engine runs one micro-batch per worker (the batch statistics are
shared between them), and with a layer that couples the whole batch one micro-batch in all: then the
training size is not a choice and is not measured.

No output here: the CLI renders a `Tuning`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.engine import engine_for, loss_and_grads, predict
from cnncli.engine.executor import EVAL_MICRO_BATCH, TRAIN_MICRO_BATCH
from cnncli.host.blas import blas_info, worker_threads
from cnncli.nn.model import Sequential

CACHE_FILE = "tune.json"
MAX_CACHE_BYTES = 1 << 20  # a larger (or unreadable, or malformed) cache is ignored and rewritten
TRAIN_CANDIDATES = (8, 12, 16, 24, 32, 48, 64)
EVAL_CANDIDATES = (8, 12, 20, 32, 50, 80)
MAX_MICRO_BATCH = 4096  # a stored size beyond this (or below 1) is not one this module chose


def valid_size(value: Any) -> bool:
    """A micro-batch size as the cache and a run's state hold it: an int (not a bool) in 1 … MAX_MICRO_BATCH."""
    return type(value) is int and 1 <= value <= MAX_MICRO_BATCH


@dataclass
class Tuning:
    """The micro-batch sizes the engine uses, and where they come from."""

    train_micro_batch: int
    eval_micro_batch: int
    source: str  # "measured" (just now), "cache" (measured earlier on this machine), "run" (a resumed run's),
    # "default" (not measured: CNNCLI_TUNE=0 or nothing to choose)
    why: str  # one sentence for people
    when: str = ""  # UTC time of the measurement
    train_ms: dict[int, float] = field(default_factory=dict)  # candidate -> median ms per training step
    eval_ms: dict[int, float] = field(default_factory=dict)  # candidate -> median ms per 1,000 images

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_ms"] = {str(k): v for k, v in self.train_ms.items()}
        d["eval_ms"] = {str(k): v for k, v in self.eval_ms.items()}
        return d

    def apply(self, model: Sequential) -> None:
        engine = engine_for(model)
        engine.train_micro_batch, engine.eval_micro_batch = self.train_micro_batch, self.eval_micro_batch


def cache_dir() -> Path:
    env = os.environ.get("CNNCLI_CACHE", "").strip()
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cnncli"


def enabled() -> bool:
    return os.environ.get("CNNCLI_TUNE", "1").strip().lower() not in ("0", "no", "false", "off")


def machine_key() -> str:
    """What makes timings of one machine comparable: processor model, usable processors, BLAS, NumPy."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    blas = blas_info()
    parts = [model, str(worker_threads()), str(blas.get("internal_api")), str(blas.get("version")),
             str(blas.get("architecture")), np.__version__]
    return " | ".join(parts)


def shape_key(model: Sequential, batch: int, eval_batch: int) -> str:
    """The network's stages and shapes, its dtype, the batch sizes and the worker threads, hashed."""
    engine = engine_for(model)
    dtype = next(iter(model.named_params().values())).dtype if model.named_params() else np.float32
    desc = {
        "input": list(model.input_shape),
        "stages": [[s.label, list(s.in_shape), list(s.out_shape)] for s in engine.stages],
        "params": {k: list(v.shape) for k, v in model.named_params().items()},
        "dtype": str(dtype), "batch": batch, "eval_batch": eval_batch, "threads": engine.threads or worker_threads(),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache, or {} when it is missing, too large, unreadable or not what this module writes."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(raw: Any) -> Tuning | None:
    """A cached entry checked field by field (a hand-edited or damaged one is ignored)."""
    if not isinstance(raw, dict):
        return None
    try:
        t, e = raw["train_micro_batch"], raw["eval_micro_batch"]
        if not (valid_size(t) and valid_size(e)):
            return None
        return Tuning(t, e, "cache", str(raw.get("why", ""))[:300], str(raw.get("when", ""))[:40],
                      {int(k): float(v) for k, v in dict(raw.get("train_ms", {})).items()},
                      {int(k): float(v) for k, v in dict(raw.get("eval_ms", {})).items()})
    except (KeyError, TypeError, ValueError):
        return None


def cached(model: Sequential, batch: int, eval_batch: int) -> Tuning | None:
    data = _read_cache(cache_dir() / CACHE_FILE)
    machine = data.get(machine_key())
    return _entry(machine.get(shape_key(model, batch, eval_batch))) if isinstance(machine, dict) else None


def store(model: Sequential, batch: int, eval_batch: int, tuning: Tuning) -> Path | None:
    """Add the entry to the cache (atomically: a temporary file renamed over it). None if it cannot be written:
    the cache only saves time, so a read-only home costs a calibration per run, not an error."""
    folder = cache_dir()
    path = folder / CACHE_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        machine = data.setdefault(machine_key(), {})
        if not isinstance(machine, dict):
            machine = data[machine_key()] = {}
        entry = tuning.to_dict()
        entry.pop("source", None)
        machine[shape_key(model, batch, eval_batch)] = entry
        fd, tmp = tempfile.mkstemp(prefix=".tune.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return None
    return path


def training_is_fixed(model: Sequential) -> str | None:
    """Why the training micro-batch is not a choice for this network, or None."""
    engine = engine_for(model)
    if engine.whole_batch():
        return "a layer couples the whole batch in training (one micro-batch)"
    if engine.synced():
        return "batch-norm shares its batch statistics between the workers (one micro-batch per worker)"
    return None


def _time(fn: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - start) / calls


def measure(model: Sequential, batch: int, eval_batch: int, rounds: int = 5, seconds: float = 0.15,
            seed: int = 0) -> Tuning:
    """Time every candidate micro-batch size on random data of the network's shape, interleaved: in each of
    `rounds` rounds every candidate runs once (after one untimed call the first time), as many calls as fit
    in about `seconds`; the fastest median wins. The model's parameters, buffers (batch-norm's running
    statistics) and mode are left as they were; its gradients are overwritten."""
    engine = engine_for(model)
    rng = np.random.default_rng(seed)
    threads = engine_for(model).threads or worker_threads()
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, model.output_shape[0], size=batch)
    saved = {k: v.copy() for k, v in model.named_buffers().items()}
    fixed = training_is_fixed(model)
    train_c = [] if fixed else sorted({c for c in (*TRAIN_CANDIDATES, -(-batch // threads)) if c <= batch})
    # inference: a whole evaluation batch per call, as `cnn eval` runs it, per 1,000 images (a batch of two
    # micro-batches per worker made the hand-over to the workers count for small sizes and favoured big ones)
    eval_c = sorted({c for c in (*EVAL_CANDIDATES, -(-eval_batch // threads)) if c <= eval_batch})
    xe = rng.standard_normal((eval_batch, *model.input_shape)).astype(np.float32)
    train_runs: dict[int, list[float]] = {c: [] for c in train_c}
    eval_runs: dict[int, list[float]] = {c: [] for c in eval_c}
    calls: dict[tuple[str, int], int] = {}
    was = model.training
    try:
        for _ in range(rounds):
            model.train()
            for c in train_c:
                engine.train_micro_batch = c

                def step() -> None:
                    loss_and_grads(model, x, y)

                if ("t", c) not in calls:
                    calls["t", c] = max(1, int(seconds / max(_time(step, 1) / 1000, 1e-6)))
                train_runs[c].append(_time(step, calls["t", c]))
            model.eval()
            for c in eval_c:
                engine.eval_micro_batch = c

                def infer() -> None:
                    predict(model, xe)

                if ("e", c) not in calls:
                    calls["e", c] = max(1, int(seconds / max(_time(infer, 1) / 1000, 1e-6)))
                eval_runs[c].append(_time(infer, calls["e", c]) * 1000 / len(xe))
    finally:
        model.train(was)
        model.load_buffers(saved)
    train_ms = {c: statistics.median(v) for c, v in train_runs.items()}
    eval_ms = {c: statistics.median(v) for c, v in eval_runs.items()}
    best_t = min(train_ms, key=lambda c: train_ms[c]) if train_ms else TRAIN_MICRO_BATCH
    best_e = min(eval_ms, key=lambda c: eval_ms[c]) if eval_ms else EVAL_MICRO_BATCH
    if train_ms:
        why_t = (f"training {best_t} ({train_ms[best_t]:.1f} ms per step of {batch}, fastest of "
                 f"{', '.join(map(str, train_c))})")
    else:
        why_t = f"training: {fixed}"
    why_e = f"inference {best_e} ({eval_ms[best_e]:.1f} ms per 1,000 images, fastest of {', '.join(map(str, eval_c))})"
    return Tuning(best_t, best_e, "measured", f"{why_t}; {why_e}, on {threads} worker thread(s)",
                  time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), train_ms, eval_ms)


def default(reason: str) -> Tuning:
    return Tuning(TRAIN_MICRO_BATCH, EVAL_MICRO_BATCH, "default", reason)


def for_model(model: Sequential, batch: int, eval_batch: int, retune: bool = False) -> Tuning:
    """The sizes for this network on this machine: cached, else measured now and cached (unless
    CNNCLI_TUNE=0). Applies them to the model's engine."""
    tuning = None if retune else cached(model, batch, eval_batch)
    if tuning is None and (retune or enabled()):
        tuning = measure(model, batch, eval_batch)
        store(model, batch, eval_batch, tuning)
    if tuning is None:
        tuning = default("not measured (CNNCLI_TUNE=0): the built-in sizes")
    tuning.apply(model)
    return tuning


def from_state(model: Sequential, engine_state: dict[str, Any]) -> Tuning | None:
    """The sizes a run recorded in its checkpoint's state (`{"train_micro_batch": …, "eval_micro_batch": …}`)."""
    t, e = engine_state.get("train_micro_batch"), engine_state.get("eval_micro_batch")
    if not (valid_size(t) and valid_size(e)):
        return None
    tuning = Tuning(t, e, "run", "the sizes this run was trained with (its checkpoint's state)")
    tuning.apply(model)
    return tuning
