"""Helpers shared by several test files: checkpoint comparison, a training stopped at a given step, and a URL
nobody listens on."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import numpy as np

from cnncli.run.train import Callbacks


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, loaded without pickle."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def assert_same_training_state(a: Path, b: Path) -> None:
    """Parameters and optimizer buffers bit-identical; counters and per-epoch numbers equal (not the timings)."""
    x, y = arrays(a), arrays(b)
    assert set(x) == set(y)
    for k in x:
        if k in ("config", "state"):
            continue
        assert x[k].dtype == y[k].dtype, k
        assert np.array_equal(x[k], y[k]), f"{k} differs"
    sx, sy = json.loads(str(x["state"])), json.loads(str(y["state"]))
    for k in ("epoch", "batch", "step", "best_epoch", "best_val_acc"):
        assert sx[k] == sy[k], k
    untimed = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in sx["history"]]
    assert untimed == [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in sy["history"]]


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 at a port that was free a moment ago: connecting is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


class StopAt(Callbacks):
    """Training callbacks that send SIGINT (Ctrl-C) at (epoch, batch): the run stops there as a user's would."""

    def __init__(self, at: tuple[int, int] | None) -> None:
        self.at, self.epoch = at, 0

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_batch: int) -> None:
        self.epoch = epoch

    def on_batch(self, batch: int, steps: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        if (self.epoch, batch) == self.at:
            signal.raise_signal(signal.SIGINT)
