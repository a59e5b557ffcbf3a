"""Progress rendering for the CLI (with the other modules of `cnncli/cli/`, the only code that talks to the terminal).

In a terminal: tqdm bars. Not in a terminal (CI logs, `| tee`): plain lines, at most one every few seconds.
Library code never prints; it calls the callbacks made here.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

from cnncli.cli.text import one_line

PLAIN_INTERVAL_S = 5.0


def plain_interval() -> float:
    """Seconds between plain progress lines: $CNNCLI_PROGRESS_SECONDS, else 5."""
    try:
        return max(0.0, float(os.environ.get("CNNCLI_PROGRESS_SECONDS", PLAIN_INTERVAL_S)))
    except ValueError:
        return PLAIN_INTERVAL_S


def is_terminal() -> bool:
    return sys.stderr.isatty()


def _human_bytes(n: float) -> str:
    """Binary units, labelled as such: 512 B, 1.5 KiB, 162.6 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


def _finish(bar: tqdm, failed: bool) -> None:
    """Close a bar; after an exception (Ctrl-C) erase it rather than leave it half drawn."""
    if failed:
        bar.leave = False
    bar.close()


@contextmanager
def _finishing(bars: list[tqdm]) -> Iterator[None]:
    """Close the bars made inside the block: kept when it ends normally, erased when it raises (Ctrl-C)."""
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for bar in bars:
            _finish(bar, failed)


@contextmanager
def byte_progress(desc: str) -> Iterator[Callable[[int, int | None], None]]:
    """Yields `update(done_bytes, total_bytes_or_None)` that draws a bar (terminal) or plain lines."""
    if is_terminal():
        bars: list[tqdm] = []  # created on the first update, so that nothing is drawn when nothing happens
        start = time.monotonic()

        # tqdm's own byte formatting labels 1024-based sizes "MB" (and its rate is 1000-based): the sizes are
        # formatted here, in binary units, and shown through the bar's free-text {unit} field
        def update(done: int, total: int | None) -> None:
            if not bars:
                bars.append(tqdm(desc=desc, file=sys.stderr, bar_format="{desc}: {unit}", unit="", dynamic_ncols=True))
            bar = bars[0]
            if total is not None and bar.total != total:
                bar.total = total
                bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {unit}"
            rate = done / max(time.monotonic() - start, 1e-9)
            of = f" / {_human_bytes(total):>10}" if total else ""
            bar.n = done
            bar.unit = f"{_human_bytes(done):>10}{of}, {_human_bytes(rate):>10}/s"  # fixed widths: the bar stays put
            bar.refresh()

        with _finishing(bars):
            yield update
        return

    start = time.monotonic()
    last = [0.0]

    interval = plain_interval()

    def update_plain(done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - last[0] < interval and not finished:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        of = f" of {_human_bytes(total)} ({100 * done / total:.0f}%)" if total else ""
        print(f"{desc}: {_human_bytes(done)}{of}, {_human_bytes(rate)}/s", file=sys.stderr, flush=True)

    yield update_plain


@contextmanager
def count_progress(desc: str, unit: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """Yields `update(done, total)` for a long count (gradcheck's entries) on stderr: a bar in a terminal
    (erased at the end, and on Ctrl-C), else a line every few seconds ($CNNCLI_PROGRESS_SECONDS); nothing when
    `quiet`."""
    if quiet:
        yield lambda done, total: None
        return
    if is_terminal():
        bars: list[tqdm] = []

        def update(done: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, leave=False,
                                 dynamic_ncols=True, mininterval=0.2))
            bars[0].update(done - bars[0].n)

        with _finishing(bars):
            yield update
        return

    interval = plain_interval()
    start = last = time.monotonic()

    def update_plain(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < interval or done >= total:
            return
        last = now
        print(f"{desc}: {done:,} of {total:,} {unit} ({100 * done / total:.0f}%), {now - start:.0f} s",
              file=sys.stderr, flush=True)

    yield update_plain


# A postfix of fixed width, and a placeholder as wide before the first one: the bar never narrows.
_POSTFIX = "loss {loss:>7}  acc {acc:>5}%  {ips:>7} img/s"


def _postfix(loss: float | None, acc: float | None, ips: float | None) -> str:
    if loss is None or acc is None or ips is None:
        return _POSTFIX.format(loss="–", acc="–", ips="–")
    return _POSTFIX.format(loss=f"{loss:.4f}", acc=f"{100 * acc:.1f}", ips=f"{ips:,.0f}")


class TrainProgress:
    """Renders the training loop's callbacks on stdout.

    Terminal: one tqdm bar per epoch (loss, accuracy, images/s as postfix), then the epoch's line.
    Not a terminal: a plain line every few seconds during an epoch and one line at its end.
    """

    def __init__(self, stream: TextIO | None = None, interval: float | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = plain_interval() if interval is None else interval
        self.bar: tqdm | None = None
        self.epoch = self.epochs = 0
        self._last_line = 0.0

    def _line(self, text: str) -> None:
        text = "\n".join(one_line(part) for part in text.split("\n"))  # paths and names: never raw
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_start(self, info: Any) -> None:
        resumed = f", resumed from {info.resumed_from} at epoch {info.start_epoch + 1}" if info.resumed_from else ""
        if info.resumed_from and info.start_epoch >= info.epochs:
            resumed = f", resumed from {info.resumed_from}: every epoch is done, the test evaluation is left"
        self._line(
            f"training on {info.n_train:,} images, validating on {info.n_val:,}, testing on {info.n_test:,} "
            f"({info.steps_per_epoch} steps per epoch){resumed}"
        )
        self._line(f"run folder: {info.run_dir}")
        if getattr(info, "engine", ""):
            self._line(info.engine)
        if getattr(info, "cleaned", None):
            self._line(f"removed {len(info.cleaned)} temporary file(s) left by a run killed while saving: "
                       + ", ".join(p.name for p in info.cleaned))

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_batch: int) -> None:
        self.epoch, self.epochs = epoch, epochs
        self._last_line = time.monotonic()
        if self.tty:
            # Everything but the bar has a fixed width (counts padded, the postfix reserved from the start), and
            # the bar's width is set once per epoch from the terminal's: nothing moves or narrows as it runs.
            n = len(str(steps))
            desc = f"epoch {epoch}/{epochs}"
            rest = len(desc) + 2 + 5 + 2 + 2 * n + 1 + 16 + 2 + len(_postfix(None, None, None))
            width = max(10, min(40, _columns(self.stream) - 1 - rest))
            self.bar = tqdm(
                total=steps, initial=start_batch, desc=desc, unit="step", file=self.stream, leave=False,
                dynamic_ncols=True, postfix=_postfix(None, None, None),
                bar_format="{desc}: {percentage:3.0f}%|{bar:%d}| {n_fmt:>%d}/{total_fmt} [{elapsed}<{remaining}]"
                           "{postfix}".replace("%d", str(width), 1).replace("%d", str(n), 1),
            )

    def on_batch(self, batch: int, steps: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(batch - self.bar.n)
            if batch == steps or batch % 5 == 0:
                self.bar.set_postfix_str(_postfix(loss, acc, images_per_s), refresh=False)
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
            self.bar.set_postfix_str("validating".ljust(len(_postfix(None, None, None))))

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
