"""Progress rendering for the CLI (the only terminal-facing module besides cli.py).

In a terminal: tqdm bars. Not in a terminal (CI logs, `| tee`): plain lines, at most one every few seconds.
Library code never prints; it calls the callbacks made here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 5.0


def is_terminal() -> bool:
    return sys.stderr.isatty()


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@contextmanager
def byte_progress(desc: str) -> Iterator[Callable[[int, int | None], None]]:
    """Yields `update(done_bytes, total_bytes_or_None)` that draws a bar (terminal) or plain lines."""
    if is_terminal():
        bars: list[tqdm] = []  # created on the first update, so that nothing is drawn when nothing happens

        def update(done: int, total: int | None) -> None:
            if not bars:
                bars.append(tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr))
            bar = bars[0]
            if total is not None and bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        try:
            yield update
        finally:
            for bar in bars:
                bar.close()
        return

    start = time.monotonic()
    last = [0.0]

    def update_plain(done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - last[0] < PLAIN_INTERVAL_S and not finished:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        of = f" of {_human_bytes(total)} ({100 * done / total:.0f}%)" if total else ""
        print(f"{desc}: {_human_bytes(done)}{of}, {_human_bytes(rate)}/s", file=sys.stderr, flush=True)

    yield update_plain


class TrainProgress:
    """Renders the training loop's callbacks on stdout.

    Terminal: one tqdm bar per epoch (loss, accuracy, images/s as postfix), then the epoch's line.
    Not a terminal: a plain line every few seconds during an epoch and one line at its end.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = PLAIN_INTERVAL_S) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval
        self.bar: tqdm | None = None
        self.epoch = self.epochs = 0
        self._last_line = 0.0

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_start(self, info: Any) -> None:
        resumed = f", resumed from {info.resumed_from} at epoch {info.start_epoch + 1}" if info.resumed_from else ""
        self._line(
            f"training on {info.n_train:,} images, validating on {info.n_val:,}, testing on {info.n_test:,} "
            f"({info.steps_per_epoch} steps per epoch){resumed}"
        )
        self._line(f"run folder: {info.run_dir}")
        if getattr(info, "cleaned", None):
            self._line(f"removed {len(info.cleaned)} temporary file(s) left by a run killed while saving: "
                       + ", ".join(p.name for p in info.cleaned))

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_batch: int) -> None:
        self.epoch, self.epochs = epoch, epochs
        self._last_line = time.monotonic()
        if self.tty:
            self.bar = tqdm(
                total=steps, initial=start_batch, desc=f"epoch {epoch}/{epochs}", unit="step",
                file=self.stream, leave=False, dynamic_ncols=True,
            )

    def on_batch(self, batch: int, steps: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(batch - self.bar.n)
            if batch == steps or batch % 5 == 0:
                postfix = f"loss {loss:.4f}  acc {100 * acc:.1f}%  {images_per_s:,.0f} img/s"
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval and batch < steps:
            self._last_line = now
            self._line(
                f"epoch {self.epoch}/{self.epochs}  step {batch}/{steps}  loss {loss:.4f}  "
                f"acc {100 * acc:.1f}%  {images_per_s:,.0f} img/s  lr {lr:.4g}"
            )

    def on_validate(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"epoch {self.epoch}/{self.epochs} (validating)")

    def on_epoch_end(self, m: Any, is_best: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        val = f"val loss {m.val_loss:.4f} acc {100 * m.val_acc:.2f}%" if m.val_acc is not None else "no validation"
        best = "  *best*" if is_best and m.val_acc is not None else ""
        self._line(
            f"epoch {m.epoch}/{self.epochs}  train loss {m.train_loss:.4f} acc {100 * m.train_acc:.2f}%  {val}  "
            f"lr {m.lr:.4g}  {m.seconds:.1f} s  ({m.images_per_s:,.0f} img/s){best}"
        )

    def on_test(self) -> None:
        self._line("evaluating the best checkpoint on the test set")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
