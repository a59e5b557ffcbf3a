"""Progress rendering for the CLI (the only terminal-facing module besides cli.py).

In a terminal: tqdm bars. Not in a terminal (CI logs, `| tee`): plain lines, at most one every few seconds.
Library code never prints; it calls the callbacks made here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
