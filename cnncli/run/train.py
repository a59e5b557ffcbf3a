"""The training loop: epochs of shuffled, augmented mini-batches; validation; checkpoints; resume.

Reproducibility: the data order of epoch e comes from `default_rng([seed, e])` and the augmentation of batch
b of epoch e from `default_rng([seed, e, b])`, so (seed, epoch, batch) is the whole random state, and a run
stopped after any batch resumes bit-for-bit. Ctrl-C and SIGTERM are deferred to the end of the running step
(the update is never half-applied; cnncli/host/signals.py); a second one aborts at once, but never inside a
checkpoint write.

Early stopping and the plateau schedule are functions of the recorded per-epoch history (which the
checkpoint stores), so a resumed run stops after the same epoch and uses the same learning rates as one
that was never stopped. `run.json` in the run folder says how the run ended (see cnncli/run/runs.py).

No output here: progress goes to a `Callbacks` object (the CLI renders it).
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cnncli import data as data_mod
from cnncli import engine
from cnncli.config import (
    Config,
    EarlyStoppingConfig,
    TrainConfig,
    build_with_overrides,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from cnncli.data.preprocess import Normalizer, alternating_flips, augment
from cnncli.engine import calibrate
from cnncli.host.atomic import atomic_write, stale_temp_files
from cnncli.host.errors import CheckpointError, CnnError, ConfigError, StorageError, TrainingDiverged, os_reason
from cnncli.host.names import RUN_NAME, check_name
from cnncli.host.signals import signal_name, stop_signals
from cnncli.nn.datainit import initialise_from_data
from cnncli.nn.model import Sequential, build_model
from cnncli.run import paramgroups
from cnncli.run.checkpoint import (
    Checkpoint,
    apply_optim,
    apply_params,
    load_checkpoint,
    save_checkpoint,
    shown_name,
)
from cnncli.run.evaluate import EvalResult, evaluate
from cnncli.run.lookahead import Lookahead
from cnncli.run.memory import check_training
from cnncli.run.optim import check_schedule, improves, learning_rate, make_optimizer, mode_of
from cnncli.run.runs import RUN_FILE, read_json_file, write_run_file

METRIC_FIELDS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s",
)  # fmt: skip


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float  # the learning rate of the epoch's last step
    seconds: float  # wall time of the epoch, validation included
    images_per_s: float  # training images per second of the epoch's training part


@dataclass
class RunInfo:
    """What the loop knows before the first step, for the renderer."""

    run_dir: Path
    n_train: int
    n_val: int
    n_test: int
    steps_per_epoch: int
    start_epoch: int  # 0-based index of the first epoch to run
    start_batch: int
    epochs: int
    data_folder: Path
    resumed_from: Path | None
    engine: str = ""  # the engine's micro-batch sizes and where they come from (cnncli/engine/calibrate.py)
    cleaned: list[Path] = field(default_factory=list)  # temporary files a killed run left, removed at the start


@dataclass
class TrainResult:
    run_dir: Path
    last_path: Path
    best_path: Path
    history: list[EpochMetrics]
    best_epoch: int
    best_val_acc: float | None
    test: EvalResult | None
    seconds: float
    test_plain: EvalResult | None = None  # with train.tta: the test without test-time augmentation
    stopped_early: int | None = None  # the epoch early stopping ended the run after


class Callbacks:
    """Progress hooks; every method is optional. Called from the training thread."""

    def on_start(self, info: RunInfo) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_batch: int) -> None: ...

    def on_batch(self, batch: int, steps: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        """After each step: running mean loss and accuracy of the epoch so far."""

    def on_validate(self) -> None: ...

    def on_epoch_end(self, metrics: EpochMetrics, is_best: bool) -> None: ...

    def on_test(self) -> None: ...


class StopRun(Exception):  # noqa: N818  (a request, not an error)
    """Raised by a callback (e.g. a sweep's pruner in `on_epoch_end`) to end the run; run.json records `state`
    ("pruned"), and train() re-raises it to the caller."""

    def __init__(self, state: str, reason: str = "") -> None:
        super().__init__(reason or state)
        self.state = state


def stops_early(values: Sequence[float], cfg: EarlyStoppingConfig) -> bool:
    """Whether early stopping ends a run whose `cfg.metric` took `values`, epoch by epoch, so far.

    An epoch improves when it beats the best earlier value by more than min_delta (upwards for accuracies,
    downwards for losses); the run stops once the last `patience` epochs in a row did not improve.
    """
    best, waited = None, 0
    mode = mode_of(cfg.metric)
    for value in values:
        if improves(value, best, mode, cfg.min_delta):
            best, waited = value, 0
        else:
            waited += 1
    return waited >= cfg.patience


def _check_monitors(cfg: Config, n_val: int) -> None:
    """Early stopping and the plateau schedule may watch validation numbers only when there is a validation set."""
    watched = []
    if cfg.train.early_stopping is not None:
        watched.append(("train.early_stopping.metric", cfg.train.early_stopping.metric))
    if cfg.train.schedule.type == "plateau":
        watched.append(("train.schedule.monitor", cfg.train.schedule.monitor))
    for key, metric in watched:
        if metric.startswith("val_") and n_val == 0:
            raise ConfigError(f"{key}: {metric} needs a validation set, but data.val_size is 0")


@contextmanager
def _recorded(record: Callable[..., None]) -> Iterator[None]:
    """run.json says 'running' inside the block, and how it ended when an exception leaves it."""
    record("running")
    try:
        yield
    except StopRun as e:
        record(e.state)
        raise
    except BaseException as e:
        state = "interrupted" if isinstance(e, TrainingInterrupted | KeyboardInterrupt) else "failed"
        try:
            record(state, error=None if state == "interrupted" else (str(e) if isinstance(e, CnnError) else repr(e)))
        except StorageError:  # a full disk fails this write too: the error that stopped the run is the one to show
            pass
        raise


class TrainingInterrupted(CnnError):
    """Ctrl-C or SIGTERM (`signum`): a resumable checkpoint was saved at `path`."""

    def __init__(self, path: Path, epoch: int, batch: int, signum: int | None = None) -> None:
        what = "interrupted" if signum in (None, signal.SIGINT) else f"stopped by {signal_name(signum)}"
        super().__init__(f"{what} at epoch {epoch}, batch {batch}; resumable checkpoint saved to {path}")
        self.path, self.epoch, self.batch = path, epoch, batch
        self.signum = signum if signum is not None else signal.SIGINT


class TestInterrupted(TrainingInterrupted):
    """Ctrl-C or SIGTERM during the final test evaluation: training is complete and saved (last.npz holds the
    last epoch, best.npz the best); run.json says `interrupted` with `test_pending`, and `--resume` of
    last.npz runs the test evaluation and finishes the run."""

    def __init__(self, path: Path, best: Path, epochs: int, signum: int | None = None) -> None:
        what = "interrupted" if signum in (None, signal.SIGINT) else f"stopped by {signal_name(signum)}"
        CnnError.__init__(self, f"{what} during the test evaluation; training is complete and saved ({epochs} "
                          f"epoch(s): last epoch in {path}, best in {best}); the test accuracy is not measured yet: "
                          "resuming runs the evaluation and finishes the run")
        self.path, self.epoch, self.batch = path, epochs, 0
        self.signum = signum if signum is not None else signal.SIGINT


def evaluation_pending(run_dir: Path) -> bool:
    """Whether the run in `run_dir` was stopped during its final test evaluation (its run.json says so)."""
    record = read_json_file(Path(run_dir) / RUN_FILE) or {}
    return record.get("state") == "interrupted" and record.get("test_pending") is True


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path, binary=False) as f:
        f.write(text)


def metrics_csv(history: list[EpochMetrics]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for m in history:
        row = asdict(m)
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    return buf.getvalue()


@dataclass
class _State:
    """The mutable training state that goes into a checkpoint's `state` entry."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in the current epoch
    step: int = 0  # optimizer steps so far
    best_val_acc: float | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=dict)  # running sums of the current epoch
    engine: dict[str, int] = field(default_factory=dict)  # the micro-batch sizes the run trains with

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: Path) -> _State:
        """The state of a checkpoint's `state` entry, every field checked (a checkpoint is hostile until then);
        CheckpointError names the file and the field. What depends on the data (batch < steps per epoch) is
        checked by `train` once the data is loaded."""
        return _check_state(d, source)


_STATE_KEYS = ("format", "epoch", "batch", "step", "best_val_acc", "best_epoch", "history", "partial")
_PARTIAL_KEYS = ("loss", "correct", "seen", "train_seconds")
MAX_EPOCHS = 10**7  # more completed epochs than any run makes: a forged counter


def _check_state(d: Any, source: Path) -> _State:
    def bad(key: str, want: str, got: Any) -> CheckpointError:
        shown = repr(got)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return CheckpointError(f"{source}: state.{key}: expected {want}, got {shown}")

    def integer(key: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(key, f"an integer from {lo} to {hi}", value)
        return value

    def number(key: str, value: Any, lo: float = 0.0, hi: float = math.inf, none: bool = False) -> float | None:
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not lo <= value <= hi:
            span = f"from {lo:g} to {hi:g}" if math.isfinite(hi) else f"at least {lo:g}"
            raise bad(key, f"a finite number {span}" + (" or null" if none else ""), value)
        return float(value)

    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: the training state is not a JSON object")
    unknown = [k for k in d if k not in (*_STATE_KEYS, "engine")]
    if unknown:
        raise CheckpointError(f"{source}: state.{shown_name(unknown[0])}: unknown field (fields: "
                              f"{', '.join(_STATE_KEYS)})")
    if "format" not in d:  # checkpoints written before the state had a format number are format 1
        d = {"format": 1, **d}
    missing = [k for k in _STATE_KEYS if k not in d]
    if missing:
        raise CheckpointError(f"{source}: state.{missing[0]}: missing; the training state is incomplete")
    if d["format"] != 1 or isinstance(d["format"], bool):
        raise bad("format", "1 (the only state format)", d["format"])
    epoch = integer("epoch", d["epoch"], 0, MAX_EPOCHS)
    batch = integer("batch", d["batch"], 0, 2**62)
    step = integer("step", d["step"], epoch + batch, 2**62)  # every epoch took at least one step
    best_epoch = integer("best_epoch", d["best_epoch"], 1 if epoch else 0, epoch)
    best_val_acc = number("best_val_acc", d["best_val_acc"], 0.0, 1.0, none=True)
    history = d["history"]
    if not isinstance(history, list) or len(history) != epoch:
        n = len(history) if isinstance(history, list) else None
        raise bad("history", f"a list of {epoch} metrics rows (one per completed epoch)",
                  f"{n} rows" if n is not None else history)
    rows = []
    for i, row in enumerate(history):
        key = f"history[{i}]"
        if not isinstance(row, dict) or set(row) != set(METRIC_FIELDS):
            raise bad(key, f"a mapping of {', '.join(METRIC_FIELDS)}", row)
        integer(f"{key}.epoch", row["epoch"], i + 1, i + 1)
        for name in ("train_loss", "lr", "seconds", "images_per_s"):
            number(f"{key}.{name}", row[name])
        number(f"{key}.train_acc", row["train_acc"], 0.0, 1.0)
        number(f"{key}.val_loss", row["val_loss"], none=True)
        number(f"{key}.val_acc", row["val_acc"], 0.0, 1.0, none=True)
        if (row["val_loss"] is None) != (row["val_acc"] is None):
            raise bad(f"{key}.val_acc", "a value exactly when val_loss has one", row["val_acc"])
        rows.append(dict(row))
    if best_epoch and rows[best_epoch - 1]["val_acc"] != best_val_acc:
        raise bad("best_val_acc", f"the val_acc of epoch {best_epoch} (state.best_epoch), "
                  f"{rows[best_epoch - 1]['val_acc']!r}", best_val_acc)
    partial = d["partial"]
    if not isinstance(partial, dict):
        raise bad("partial", "a mapping", partial)
    if batch == 0 and partial:
        raise bad("partial", "{} at an epoch boundary (state.batch is 0)", partial)
    if batch:
        if set(partial) != set(_PARTIAL_KEYS):
            raise bad("partial", f"the running sums {', '.join(_PARTIAL_KEYS)} of the epoch in progress", partial)
        sums = {k: number(f"partial.{k}", partial[k]) for k in _PARTIAL_KEYS}
        assert all(v is not None for v in sums.values())
        if not 0 < sums["seen"] <= 2**62 or sums["correct"] > sums["seen"]:  # type: ignore[operator]
            raise bad("partial.seen", "images seen so far (more than 0, at least partial.correct)", sums["seen"])
        partial = sums
    sizes = d.get("engine", {})  # optional (older checkpoints have none): the run's micro-batch sizes
    if not isinstance(sizes, dict) or (sizes and set(sizes) != {"train_micro_batch", "eval_micro_batch"}):
        raise bad("engine", "a mapping of train_micro_batch, eval_micro_batch", sizes)
    for key, value in sizes.items():
        integer(f"engine.{key}", value, 1, calibrate.MAX_MICRO_BATCH)
    return _State(epoch=epoch, batch=batch, step=step, best_val_acc=best_val_acc, best_epoch=best_epoch,
                  history=rows, partial=dict(partial), engine=dict(sizes))


def check_fits_data(model: Sequential, cfg: Config, data_folder: Path) -> None:
    """The network takes the data set's images and gives one score per class, or ConfigError in one line:
    `model.input_shape` with both shapes, or the layer that sets the output count with both numbers. Reads no
    image (`data.dataset_shape`: static, or a folder data set's class sub-folders listed)."""
    shape, n_classes = data_mod.dataset_shape(cfg.data, data_folder)
    title = f"the image folder {data_folder}" if cfg.data.dataset == "folder" else data_mod.TITLES[cfg.data.dataset]
    if model.input_shape != tuple(shape):
        raise ConfigError(
            f"model.input_shape = {list(model.input_shape)} does not match the images of {title}, {list(shape)}; "
            "leave model.input_shape out to take it from the data set"
        )
    if model.output_shape == (n_classes,):
        return
    shapes = [model.input_shape]
    for layer in model.layers:
        shapes.append(layer.output_shape(shapes[-1]))
    i = len(model.layers) - 1  # the last layer that changes the shape sets the output count
    while i > 0 and shapes[i + 1] == shapes[i]:
        i -= 1
    layer = model.layers[i]
    hint = f"; set its out_features to {n_classes}" if hasattr(layer.options, "out_features") else ""
    raise ConfigError(
        f"model.layers[{i}] ({layer.name or layer.kind}): gives {model.output_shape[0]} outputs, but {title} has "
        f"{n_classes} classes{hint}"
    )


def run_length(tc: TrainConfig, n_train: int) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total steps) of a run on n_train images: ⌈n/B⌉ steps an epoch, or ⌊n/B⌋ with
    train.drop_last (the incomplete last batch left out); train.steps, when set, is the total and the last
    epoch stops after what remains of it, else train.epochs whole epochs. ConfigError when no batch is whole."""
    steps = n_train // tc.batch_size if tc.drop_last else math.ceil(n_train / tc.batch_size)
    if steps == 0:
        raise ConfigError(f"train.drop_last: the {n_train} training images make no whole batch of "
                          f"train.batch_size = {tc.batch_size}")
    total = tc.steps if tc.steps is not None else tc.epochs * steps
    return steps, math.ceil(total / steps), total


def _engine_line(model: Sequential, tuning: calibrate.Tuning) -> str:
    """What the progress output says about the engine's micro-batches (cnncli/engine/calibrate.py)."""
    fixed = calibrate.training_is_fixed(model)
    training = f"training: {fixed}" if fixed else f"{tuning.train_micro_batch} images to train"
    return f"micro-batches ({tuning.source}): {training}; {tuning.eval_micro_batch} images to infer"


def default_run_dir(cfg: Config, root: Path = Path("runs")) -> Path:
    """root/<config name>-<timestamp>; ConfigError when the name is not a folder name (cnncli/host/names.py)."""
    check_name(cfg.name, "name", RUN_NAME, " (the config's name: its name: key, else its file's name)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{cfg.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{cfg.name}-{stamp}-{n}"
    return path


def train(
    cfg: Config,
    run_dir: Path,
    data_folder: Path,
    resume: Checkpoint | None = None,
    resume_path: Path | None = None,
    init: Checkpoint | None = None,
    init_path: Path | None = None,
    callbacks: Callbacks | None = None,
    overrides: Sequence[str] | None = None,
) -> TrainResult:
    """Train `cfg`'s model on the data set `cfg.data` names, found in `data_folder` (from `ensure_dataset`).

    Writes into `run_dir`: config.yaml, metrics.csv, last.npz (after every epoch, and on Ctrl-C), best.npz
    (best validation accuracy; the last epoch when there is no validation set), run.json (the run's state;
    `overrides`, the `--set` strings, are recorded there), and TensorBoard event files when
    train.tensorboard is on. Raises TrainingDiverged on a NaN/inf loss (last.npz keeps the last good epoch),
    TrainingInterrupted after saving on Ctrl-C or SIGTERM, and passes on a callback's StopRun. StorageError (a
    full disk, a folder that cannot be written) names the file; the previous checkpoint is kept.
    """
    cb = callbacks or Callbacks()
    t_start = time.perf_counter()
    tc = cfg.train

    model = build_model(cfg.model, seed=cfg.seed)
    check_schedule(tc.schedule)
    check_fits_data(model, cfg, data_folder)  # before the data set is read
    dataset = data_mod.load_dataset(cfg.data, data_folder)
    splits = data_mod.make_splits(
        dataset.train_x, dataset.train_y, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed
    )
    # data.normalize: auto -> the statistics of the training split, stored in the run's config and checkpoints
    cfg = replace(cfg, data=data_mod.resolve_normalization(cfg.data, splits.train_x))

    normalizer = Normalizer(cfg.data.normalize, model.input_shape[0])
    if resume is None and init is None:  # a conv's `whiten` init, from the first training images
        initialise_from_data(model.layers, lambda a, b: normalizer(splits.train_x[a:b]))
    params = model.named_params()
    rules = paramgroups.resolve(list(params), model.decayed(), tc.param_groups)
    optimizer = make_optimizer(params, tc.optimizer, rules.decay, rules.lr_scale)
    state = _State()

    if resume is not None:
        source = resume_path or Path("checkpoint")
        state = _State.from_json(resume.state, source)
        apply_params(resume, model, source)
        apply_optim(resume, optimizer.state, source, step=state.step)
    elif init is not None:
        apply_params(init, model, init_path or Path("init checkpoint"))

    # the micro-batch sizes: the resumed run's own (they order the gradient sums), else fitted to this machine
    tuning = (calibrate.from_state(model, state.engine) if resume is not None else None) or calibrate.for_model(
        model, tc.batch_size, tc.eval_batch_size)
    state.engine = {"train_micro_batch": tuning.train_micro_batch, "eval_micro_batch": tuning.eval_micro_batch}
    _check_monitors(cfg, len(splits.val_x))
    if tc.tensorboard:
        from cnncli.run.tb import TensorBoardLog, require_writer

        require_writer()  # before anything is written
    lock = lock_run_dir(run_dir)  # held until training ends: one run per folder
    cleaned = remove_stale_temp_files(run_dir)  # safe now: no other run writes here
    _write_text_atomic(run_dir / "config.yaml", config_to_yaml(cfg))
    last_path, best_path = run_dir / "last.npz", run_dir / "best.npz"

    n_train = len(splits.train_x)
    steps, epochs, total_steps = run_length(tc, n_train)
    if state.batch >= steps:
        raise CheckpointError(f"{resume_path}: state.batch: {state.batch} batches done in epoch {state.epoch + 1}, "
                              f"but an epoch of this run has {steps} steps (data.limit or train.batch_size changed?)")

    lookahead = Lookahead.of(model, tc.lookahead, total_steps) if tc.lookahead is not None else None
    if lookahead is not None and resume is not None:
        apply_optim(resume, lookahead.state, resume_path or Path("checkpoint"))

    def save(path: Path) -> None:
        optim = {**optimizer.state, **(lookahead.state if lookahead is not None else {})}
        save_checkpoint(path, model, cfg, optim=optim, state=state.to_json(), classes=dataset.classes)

    history = [EpochMetrics(**h) for h in state.history]
    es = tc.early_stopping
    stopped_early = None
    if es is not None and len(history) < epochs and stops_early([getattr(m, es.metric) for m in history], es):
        stopped_early = len(history)  # a run that early stopping ended, resumed: nothing left to train

    def record(run_state: str, **extra: Any) -> None:
        write_run_file(run_dir, {
            "state": run_state, "config": cfg.name, "overrides": list(overrides or []), "epochs": epochs,
            "epochs_done": len(history), "best_epoch": state.best_epoch, "best_val_acc": state.best_val_acc,
            "test_acc": None, "test_loss": None, "seconds": sum(m.seconds for m in history),
            "stopped_early": stopped_early, "error": None, "data_dir": str(Path(data_folder).resolve()), **extra,
        })  # fmt: skip

    tb = None
    if tc.tensorboard:
        tb = TensorBoardLog(run_dir, model, purge_step=state.step if resume is not None else None)
    tb_ctx = closing(tb) if tb is not None else nullcontext()
    flow, flow_records = None, []
    if tc.gradflow:  # gradient norms, update ratios, dead ReLUs, step losses: gradflow.json (cnncli/run/gradflow.py)
        from cnncli.run.gradflow import FlowRecorder, earlier_records, write_flow

        flow = FlowRecorder(model, steps)
        flow_records = earlier_records(run_dir, state.epoch) if resume is not None else []
    # exits in reverse: once the loop leaves with an exception (deferring), later signals are ignored while
    # run.json records how it ended
    with closing(lock), stop_signals() as stop, _recorded(record), stop.deferring(), tb_ctx:
        cb.on_start(  # inside: from the first line it prints, a signal is a stop request
            RunInfo(run_dir, n_train, len(splits.val_x), len(dataset.test_x), steps, state.epoch, state.batch,
                    epochs, data_folder, resume_path, cleaned=cleaned,
                    engine=_engine_line(model, tuning))
        )
        for epoch in range(state.epoch, epochs):
            steps_now = min(steps, total_steps - epoch * steps)  # train.steps may end the last epoch early
            if stopped_early is not None:
                break
            monitored = [getattr(m, tc.schedule.monitor) for m in history]  # the plateau schedule's input
            t_epoch = time.perf_counter() - state.partial.get("train_seconds", 0.0)  # a resumed epoch's earlier part
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
            aug = cfg.data.augment
            flips = alternating_flips(cfg.seed, epoch, n_train) if aug.flip and aug.flip_mode == "alternate" else None
            sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "train_seconds": 0.0}
            if state.batch:
                sums.update(state.partial)
            cb.on_epoch_start(epoch + 1, epochs, steps_now, state.batch)
            if flow is not None:
                flow.start_epoch(epoch + 1)
            lr = learning_rate(tc.optimizer.lr, tc.schedule, state.step, steps, epochs, monitored, total_steps)
            frozen = rules.frozen_at(epoch)  # train.param_groups: parameters not updated in this epoch
            t_train = time.perf_counter()
            for b in range(state.batch, steps_now):
                idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                xb = splits.train_x[idx]
                yb = splits.train_y[idx]
                flip = None if flips is None else flips[idx]
                xb = augment(xb, aug, np.random.default_rng([cfg.seed, epoch, b]), flip)
                lr = learning_rate(tc.optimizer.lr, tc.schedule, state.step, steps, epochs, monitored, total_steps)
                model.set_step(cfg.seed, epoch, b)  # dropout's masks: a function of the step alone
                loss, z = engine.loss_and_grads(model, normalizer(xb), yb, tc.label_smoothing)
                if not math.isfinite(loss):
                    kept = f"last good checkpoint: {last_path}" if last_path.exists() else "no checkpoint was saved"
                    raise TrainingDiverged(
                        f"the loss became {loss} at epoch {epoch + 1}, batch {b + 1} (learning rate {lr:.4g}); "
                        f"lower train.optimizer.lr, the usual suspect; {kept}"
                    )
                if tb is not None and b == steps_now - 1:
                    tb.snapshot()  # to measure the epoch's last update
                if flow is not None:
                    flow.before_step(b)
                optimizer.step(params, model.named_grads(), lr, frozen)
                state.step += 1
                if flow is not None:
                    flow.after_step(b, state.step, loss)
                if lookahead is not None:
                    lookahead.after_step(state.step)
                state.batch = b + 1
                correct = float(np.count_nonzero(z.argmax(axis=1) == yb))
                sums["loss"] += loss * len(idx)
                sums["correct"] += correct
                sums["seen"] += len(idx)
                if tb is not None:
                    tb.step(state.step, loss, correct / len(idx), lr)
                elapsed = sums["train_seconds"] + time.perf_counter() - t_train
                cb.on_batch(b + 1, steps_now, sums["loss"] / sums["seen"], sums["correct"] / sums["seen"],
                            sums["seen"] / max(elapsed, 1e-9), lr)
                if stop.is_set() and b + 1 < steps_now:
                    sums["train_seconds"] = elapsed
                    state.partial = sums
                    with stop.shielded():
                        save(last_path)
                    raise TrainingInterrupted(last_path, epoch + 1, b + 1, stop.signum)
            sums["train_seconds"] += time.perf_counter() - t_train

            val = None
            if len(splits.val_x):
                cb.on_validate()
                val = evaluate(model, splits.val_x, splits.val_y, normalizer, tc.eval_batch_size, dataset.classes)
            metrics = EpochMetrics(
                epoch=epoch + 1,
                train_loss=sums["loss"] / sums["seen"],
                train_acc=sums["correct"] / sums["seen"],
                val_loss=val.loss if val else None,
                val_acc=val.accuracy if val else None,
                lr=lr,
                seconds=time.perf_counter() - t_epoch,
                images_per_s=sums["seen"] / max(sums["train_seconds"], 1e-9),
            )
            history.append(metrics)
            state.history = [asdict(m) for m in history]
            state.epoch, state.batch, state.partial = epoch + 1, 0, {}
            is_best = val is None or state.best_val_acc is None or val.accuracy > state.best_val_acc
            if is_best:
                state.best_val_acc = val.accuracy if val else None
                state.best_epoch = epoch + 1
            if flow is not None:
                flow_records.append(flow.end_epoch())
            with stop.shielded():  # the epoch's files are written together, never cut by a signal
                save(last_path)
                if is_best:
                    save(best_path)
                _write_text_atomic(run_dir / "metrics.csv", metrics_csv(history))
                if flow is not None:
                    write_flow(run_dir, flow_records)
            if tb is not None:
                tb.epoch(metrics, state.step)
            cb.on_epoch_end(metrics, is_best)
            if es is not None and epoch + 1 < epochs and stops_early([getattr(m, es.metric) for m in history], es):
                stopped_early = epoch + 1
                break
            if stop.is_set() and epoch + 1 < epochs:
                raise TrainingInterrupted(last_path, epoch + 1, steps_now, stop.signum)

    test = test_plain = None
    if len(dataset.test_x) and best_path.exists():
        try:
            cb.on_test()
            best = load_checkpoint(best_path)
            apply_params(best, model, best_path)
            test = evaluate(model, dataset.test_x, dataset.test_y, normalizer, tc.eval_batch_size, dataset.classes,
                            tc.tta)
            if tc.tta != "none":
                test_plain = evaluate(model, dataset.test_x, dataset.test_y, normalizer, tc.eval_batch_size,
                                      dataset.classes)
        except KeyboardInterrupt:  # every epoch is saved; a --resume runs the test evaluation and finishes
            signum = stop.signum
            with suppress(StorageError):
                record("interrupted", test_pending=True)
            raise TestInterrupted(last_path, best_path, len(history), signum) from None
    record("finished", test_acc=test.accuracy if test else None, test_loss=test.loss if test else None)
    return TrainResult(
        run_dir=run_dir,
        last_path=last_path,
        best_path=best_path,
        history=history,
        best_epoch=state.best_epoch,
        best_val_acc=state.best_val_acc,
        test=test,
        seconds=time.perf_counter() - t_start,
        stopped_early=stopped_early,
        test_plain=test_plain,
    )


LOCK_NAME = ".cnn-train.lock"
RUN_FILES = ("last.npz", "best.npz", "metrics.csv")  # a folder holding any of them holds a run


def lock_run_dir(run_dir: Path) -> Any:
    """Create the run folder if needed and take its lock (an flock on `.cnn-train.lock` in it) for as long as
    the returned file stays open; ConfigError when another `cnn train` holds it, StorageError when the folder
    cannot be made or written. Where flock does not exist, no lock."""
    check_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{run_dir}: cannot create the run folder: {os_reason(e)}", e.errno, e.strerror) from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return io.StringIO()
    try:
        f = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - kept open: the lock lives as long as the file
    except OSError as e:
        raise StorageError(f"{run_dir / LOCK_NAME}: cannot open the run folder's lock: {os_reason(e)}", e.errno,
                           e.strerror) from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"{run_dir}: another cnn train is running in this run folder; wait for it or choose "
                          "another --out") from None
    return f


def refuse_earlier_run(out_dir: Path) -> None:
    """ConfigError when `out_dir` holds an earlier run (a checkpoint or metrics.csv): a new run never replaces it
    unless asked (--overwrite)."""
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held:
        hint = f"continue it with --resume {out_dir / 'last.npz'}, " if "last.npz" in held else ""
        raise ConfigError(f"{out_dir}: holds an earlier run ({', '.join(held)}); {hint}choose another --out, "
                          "or pass --overwrite to replace it")


# Files of a run folder written through atomic_write; their temporary files (.<name>.<random>.tmp) left by a kill
ATOMIC_FILES = ("last.npz", "best.npz", "metrics.csv", "config.yaml", RUN_FILE, "gradflow.json")

_KINDS = {stat.S_IFREG: "a file", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that cannot hold a run, without creating it: the path (or a folder above it) is a file,
    a FIFO, a device or a broken link, or its nearest existing folder cannot be written (read-only, no
    permission). StorageError names the path and the OS reason. Cheap: meant to run before any data loads."""
    run_dir = Path(run_dir)
    for p in (run_dir, *run_dir.parents):
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(p):
                raise StorageError(f"{run_dir}: {'' if p == run_dir else f'{p} '}is a symbolic link to a missing "
                                   "target") from None
            continue
        except OSError as e:
            raise StorageError(f"{run_dir}: cannot use {p}: {os_reason(e)}", e.errno, e.strerror) from None
        if not stat.S_ISDIR(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a folder")
            where = "is" if p == run_dir else f"lies under {p}, which is"
            raise StorageError(f"{run_dir}: {where} {kind}, not a folder; choose another --out")
        break
    else:  # pragma: no cover - the root always exists
        return
    try:  # can a file be made there? (what the run does next; catches read-only file systems and permissions)
        fd, probe = tempfile.mkstemp(prefix=".cnn-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "cannot write in the run folder" if p == run_dir else f"cannot create the run folder in {p}"
        raise StorageError(f"{run_dir}: {what}: {os_reason(e)}", e.errno, e.strerror) from None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temporary files of `ATOMIC_FILES` that a process killed during a write left in `run_dir`
    (call it holding the folder's lock); returns them."""
    stale = stale_temp_files(run_dir, ATOMIC_FILES)
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@dataclass
class RunPlan:
    """What `cnn train` is asked to do, resolved: the config, the run folder, and what it starts from."""

    cfg: Config
    run_dir: Path
    resume: Checkpoint | None = None
    resume_path: Path | None = None
    init: Checkpoint | None = None
    init_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know (an ignored option)


def plan_run(
    config: Path | None,
    overrides: list[str],
    *,
    out_dir: Path | None = None,
    resume: Path | None = None,
    init: Path | None = None,
    overwrite: bool = False,
) -> RunPlan:
    """Resolve `cnn train`'s options into a `RunPlan`.

    --resume continues a run from its checkpoint, with the stored config (overrides re-applied, e.g. more
    epochs) and its folder; --init starts a new run of `config` from a checkpoint's weights; otherwise a new
    run of `config`. A new run refuses a folder that holds an earlier run unless `overwrite`.
    ConfigError / CheckpointError name what is wrong.
    """
    if resume is not None and init is not None:
        raise ConfigError("--resume and --init exclude each other: --resume continues a run, --init starts a new one")
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if not ckpt.resumable:
            raise ConfigError(f"{resume}: holds no training state (parameters only); start from it with --init")
        cfg = build_with_overrides(config_to_dict(ckpt.config), overrides, str(resume), name=ckpt.config.name)
        _State.from_json(ckpt.state, resume)  # every field, before any data loads
        notes = [f"--resume uses the config stored in {resume}; ignoring --config"] if config is not None else []
        check_run_dir(out_dir or resume.parent)  # before any data loads: a bad folder fails fast
        check_training(cfg)  # and a network or batch too large for the memory (overrides may change them)
        return RunPlan(cfg, out_dir or resume.parent, resume=ckpt, resume_path=resume, notes=notes)
    if config is None:
        raise ConfigError("no config: give --config PATH (e.g. configs/seed.yaml) or --resume CHECKPOINT")
    cfg = load_config(config, overrides)
    init_ckpt = load_checkpoint(init) if init is not None else None
    if out_dir is not None and not overwrite:
        refuse_earlier_run(out_dir)
    run_dir = out_dir or default_run_dir(cfg)
    check_run_dir(run_dir)  # before any data loads: a bad folder fails fast
    check_training(cfg)  # and a network or batch too large for the memory
    return RunPlan(cfg, run_dir, init=init_ckpt, init_path=init)


def run_plan(
    plan: RunPlan, data_folder: Path, callbacks: Callbacks | None = None, overrides: Sequence[str] | None = None
) -> TrainResult:
    """`train` what `plan` says (`overrides`: the --set strings, recorded in run.json)."""
    return train(plan.cfg, plan.run_dir, data_folder, resume=plan.resume, resume_path=plan.resume_path,
                 init=plan.init, init_path=plan.init_path, callbacks=callbacks, overrides=overrides)
