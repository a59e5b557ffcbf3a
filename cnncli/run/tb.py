"""TensorBoard event files for a run (the optional `tensorboard` extra: tensorboardX).

Written into the run folder itself, so `tensorboard --logdir runs/` shows every run, and a sweep folder
shows each trial as a run. Every value goes at the global step (optimizer steps so far):
- each step: `step/loss`, `step/accuracy` (of that batch) and `step/lr`;
- each epoch: `epoch/train_loss`, `epoch/train_acc`, `epoch/val_loss`, `epoch/val_acc`, `epoch/lr`
  (the numbers of metrics.csv) and `epoch/epoch`;
- each epoch, per parameter tensor (`conv1.W`, ...): histograms `weights/<p>` and `grads/<p>` (the
  gradient of the epoch's last batch), L2 norms `norm/weights/<p>`, `norm/grads/<p>`, and
  `update_ratio/<p>` = ‖Δθ‖ / ‖θ‖ of the epoch's last update (healthy training sits near 1e-3; far above
  means a learning rate that explodes, far below one that learns nothing).
A resumed run opens a new event file with `purge_step` at the resume point, so TensorBoard drops what
the stopped process had written past it. `write_hparams` adds a trial's hyper-parameters and results
for the HParams view.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncli.host.errors import CnnError, StorageError, os_reason

if TYPE_CHECKING:  # pragma: no cover
    from cnncli.nn.model import Sequential

INSTALL_HINT = "tensorboardX is not installed; TensorBoard logging needs the tensorboard extra: " \
    "pip install 'cnncli[tensorboard]'"
EPOCH_TAGS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


class TensorBoardUnavailable(CnnError):
    """tensorboardX is missing: the message says what to install."""


def require_writer() -> Any:
    """tensorboardX's SummaryWriter class; TensorBoardUnavailable (one line) when it is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise TensorBoardUnavailable(INSTALL_HINT) from None
    return SummaryWriter


def _open_writer(writer_cls: Any, run_dir: Path, **options: Any) -> Any:
    """A SummaryWriter on `run_dir`; an OSError creating its event file (the name taken by a folder, a full
    disk, no permission) is a `StorageError` naming the file, not a traceback from inside tensorboardX."""
    try:
        return writer_cls(logdir=str(run_dir), **options)
    except OSError as e:
        where = e.filename or run_dir
        raise StorageError(f"{where}: cannot write the TensorBoard event file: {os_reason(e)}", e.errno,
                           e.strerror) from None


class TensorBoardLog:
    """The training loop's TensorBoard writer: `snapshot()` before an epoch's last update, `step()` after
    every update, `epoch()` after every epoch, `close()` at the end."""

    def __init__(self, run_dir: Path, model: Sequential, purge_step: int | None = None) -> None:
        writer_cls = require_writer()
        self.model = model
        self.writer = _open_writer(writer_cls, run_dir, purge_step=purge_step, flush_secs=30)
        self._before: dict[str, np.ndarray] | None = None

    def snapshot(self) -> None:
        """Keep a copy of the parameters, to measure the next update."""
        self._before = {k: v.copy() for k, v in self.model.named_params().items()}

    def step(self, step: int, loss: float, accuracy: float, lr: float) -> None:
        w = self.writer
        w.add_scalar("step/loss", loss, step)
        w.add_scalar("step/accuracy", accuracy, step)
        w.add_scalar("step/lr", lr, step)

    def epoch(self, metrics: Any, step: int) -> None:
        """Epoch scalars (an `EpochMetrics`) and per-parameter histograms, norms and update ratios."""
        w = self.writer
        w.add_scalar("epoch/epoch", metrics.epoch, step)
        for tag in EPOCH_TAGS:
            value = getattr(metrics, tag)
            if value is not None:
                w.add_scalar(f"epoch/{tag}", value, step)
        grads = self.model.named_grads()
        for name, theta in self.model.named_params().items():
            w.add_histogram(f"weights/{name}", theta, step)
            w_norm = float(np.linalg.norm(theta))
            w.add_scalar(f"norm/weights/{name}", w_norm, step)
            g = grads.get(name)
            if g is not None:
                w.add_histogram(f"grads/{name}", g, step)
                w.add_scalar(f"norm/grads/{name}", float(np.linalg.norm(g)), step)
            if self._before is not None and name in self._before:
                before = self._before[name]
                ratio = float(np.linalg.norm(theta - before)) / max(float(np.linalg.norm(before)), 1e-12)
                w.add_scalar(f"update_ratio/{name}", ratio, step)
        self._before = None
        w.flush()

    def close(self) -> None:
        self.writer.close()


def write_hparams(run_dir: Path, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """Record a trial's hyper-parameters and result metrics in `run_dir` for TensorBoard's HParams view.

    `hparams` values are numbers, strings or booleans; `metrics` are written as scalars `hparams/<name>`
    in the same run, which is where the view reads them.
    """
    writer_cls = require_writer()
    from tensorboardX.summary import hparams as hparams_summary

    plain = {k: (v if isinstance(v, bool | int | float | str) else str(v)) for k, v in hparams.items()}
    tagged = {f"hparams/{k}": float(v) for k, v in metrics.items()}
    exp, ssi, sei = hparams_summary(plain, tagged)
    with _open_writer(writer_cls, run_dir) as w:
        w.file_writer.add_summary(exp)
        w.file_writer.add_summary(ssi)
        w.file_writer.add_summary(sei)
        for k, v in tagged.items():
            w.add_scalar(k, v)
