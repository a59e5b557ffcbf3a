"""Gradient flow of a training run, recorded without TensorBoard (`gradflow.json` in the run folder; `cnn plot`).

Per epoch, for every parameter tensor θ (`conv1.W`, …):
- `grad_norm`: the mean over the epoch's steps of ‖∂L/∂θ‖₂ (L the batch's mean loss; every step, one dot
  product per tensor);
- `update_ratio`: the mean over the sampled steps of ‖Δθ‖₂ / ‖θ‖₂ (θ before the step; steps where θ = 0, such
  as biases that start at 0, left out), Δθ the optimizer's whole update of that step (learning rate, momentum
  and weight decay included); around 1e-3 is the usual healthy value;
- `weight_norm`: ‖θ‖₂ at the epoch's end.
For every ReLU the training engine fuses (`Engine.watch_relus`): its output units — a channel of an image
tensor (the unit is dead when the channel is 0 at every position), a feature of a vector — and how many of
them never took a value > 0 on any training image of the epoch (`dead`). A ReLU followed by a max-pool is
seen after the pool; a channel fires somewhere before the pool exactly when it does after it (the pool takes
maxima), except in rows or columns the pool's windows leave out. ReLUs the engine does not fuse (inside a
residual block, a user's layer) are not counted.
The per-step loss: the batch loss at `points` steps spread evenly over each epoch (a bounded sample).

Recording only reads the training state, so it never changes a result; a resumed epoch records the steps run
after the resume (`steps` says how many). Library code: never prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.host.atomic import atomic_write
from cnncli.host.errors import CnnError
from cnncli.nn.model import Sequential

FILE = "gradflow.json"
POINTS = 50  # sampled steps per epoch: per-step loss and update ratio
FORMAT = 1


@dataclass
class FlowRecord:
    """One epoch: per parameter {'grad_norm', 'update_ratio', 'weight_norm'}; per ReLU (by its tensor's name,
    A¹, a¹, …) {'units', 'dead', 'fraction', 'layer'}; loss_steps [(global step, batch loss)]."""

    epoch: int
    steps: int  # steps this record covers (fewer than steps_per_epoch for a resumed epoch)
    steps_per_epoch: int
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    dead: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss_steps: list[tuple[int, float]] = field(default_factory=list)


def sample_steps(steps: int, points: int = POINTS) -> set[int]:
    """The 0-based batches of an epoch of `steps` that are sampled: ≤ `points`, evenly spread, first and last in."""
    if steps <= points:
        return set(range(steps))
    return {int(round(i * (steps - 1) / (points - 1))) for i in range(points)}


class FlowRecorder:
    """Collects an epoch's numbers from the training loop: `start_epoch`, then around each optimizer step
    `before_step(b)` and `after_step(b, step, loss)`, then `end_epoch()` -> FlowRecord."""

    def __init__(self, model: Sequential, steps_per_epoch: int, points: int = POINTS) -> None:
        from cnncli.nn.trace import name_tensors

        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self.sampled = sample_steps(steps_per_epoch, points)
        names = name_tensors(model)
        self._relu_name = {id(layer): names[i].output.text for i, layer in enumerate(model.layers)}
        self._index = {id(layer): i for i, layer in enumerate(model.layers)}
        from cnncli import engine

        self._engine = engine.engine_for(model)  # the engine that trains the model (cnncli/engine)
        self._engine.watch_relus(True)
        self._epoch = 0
        self._reset()

    def _reset(self) -> None:
        self._grad_sum: dict[str, float] = {}
        self._ratio_sum: dict[str, float] = {}
        self._ratio_n: dict[str, int] = {}
        self._steps = 0
        self._loss: list[tuple[int, float]] = []
        self._before: dict[str, np.ndarray] | None = None

    def start_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (1-based) begins (or resumes)."""
        self._epoch = epoch
        self._reset()
        if self._engine is not None:
            self._engine.relu_activity()  # drop what earlier passes (a validation, a tuning) left

    def before_step(self, b: int) -> None:
        if b in self.sampled:
            self._before = {k: v.copy() for k, v in self.model.named_params().items()}

    def after_step(self, b: int, step: int, loss: float) -> None:
        """After the optimizer's update of batch b (0-based in the epoch), global step `step` (1-based).
        Norms of weights or gradients that overflowed come out as inf or NaN, quietly (the loop reports the
        divergence itself)."""
        with np.errstate(all="ignore"):
            self._after_step(b, step, loss)

    def _after_step(self, b: int, step: int, loss: float) -> None:
        self._steps += 1
        for k, g in self.model.named_grads().items():
            flat = g.reshape(-1)
            self._grad_sum[k] = self._grad_sum.get(k, 0.0) + math.sqrt(float(np.dot(flat, flat)))
        if self._before is not None:
            for k, theta in self.model.named_params().items():
                before = self._before[k]
                base = float(np.linalg.norm(before))
                if base > 0:  # a tensor of zeros (biases at the start) has no ratio yet
                    self._ratio_sum[k] = self._ratio_sum.get(k, 0.0) + float(np.linalg.norm(theta - before)) / base
                    self._ratio_n[k] = self._ratio_n.get(k, 0) + 1
            self._loss.append((step, float(loss)))
            self._before = None

    def end_epoch(self) -> FlowRecord:
        with np.errstate(all="ignore"):
            return self._end_epoch()

    def _end_epoch(self) -> FlowRecord:
        rec = FlowRecord(self._epoch, self._steps, self.steps_per_epoch)
        for k, theta in self.model.named_params().items():
            rec.params[k] = {
                "grad_norm": self._grad_sum.get(k, 0.0) / max(self._steps, 1),
                "update_ratio": self._ratio_sum[k] / self._ratio_n[k] if self._ratio_n.get(k) else math.nan,
                "weight_norm": float(np.linalg.norm(theta)),
            }
        if self._engine is not None:
            for layer, peak in self._engine.relu_activity():
                name = self._relu_name.get(id(layer), layer.name or layer.kind)
                dead = int(np.count_nonzero(peak <= 0))
                rec.dead[name] = {"units": int(peak.size), "dead": dead, "fraction": dead / max(peak.size, 1),
                                  "layer": self._index.get(id(layer), -1)}
        rec.loss_steps = list(self._loss)
        return rec


# --------------------------------------------------------------------------------------------- the file


def to_json(records: list[FlowRecord]) -> str:
    rows = []
    for r in records:
        d = asdict(r)
        d["params"] = {k: {m: (None if not math.isfinite(v) else v) for m, v in p.items()} for k, p in r.params.items()}
        d["loss_steps"] = [[int(s), float(v)] for s, v in r.loss_steps]
        rows.append(d)
    return json.dumps({"format": FORMAT, "epochs": rows}, ensure_ascii=False) + "\n"


def write_flow(run_dir: Path, records: list[FlowRecord]) -> None:
    with atomic_write(Path(run_dir) / FILE, binary=False) as f:
        f.write(to_json(records))


class FlowFileError(CnnError):
    """gradflow.json is missing or not what cnn train writes; the message names the file and the fault."""


def earlier_records(run_dir: Path, epochs: int) -> list[FlowRecord]:
    """A resumed run's records of its first `epochs` completed epochs from its gradflow.json; none when the file
    is missing or unreadable (the diagnostics restart there; the training itself does not depend on them)."""
    try:
        return [r for r in read_flow(run_dir) if r.epoch <= epochs]
    except FlowFileError:
        return []


def read_flow(run_dir: Path) -> list[FlowRecord]:
    """The records of `run_dir/gradflow.json`, every field checked; FlowFileError names the file and the fault."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise FlowFileError(f"{path}: not found (cnn train writes it after every epoch unless train.gradflow is "
                            "false)")
    try:
        if path.stat().st_size > 64 * 2**20:
            raise FlowFileError(f"{path}: larger than 64 MiB, not a gradflow file")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FlowFileError(f"{path}: cannot read ({e})") from None

    def bad(where: str, what: str) -> FlowFileError:
        return FlowFileError(f"{path}: {where}: {what}")

    def num(v: Any, where: str, none: bool = False) -> float:
        if v is None and none:
            return math.nan
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise bad(where, f"expected a finite number, got {str(v)[:40]!r}")
        return float(v)

    def integer(v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(where, f"expected a whole number ≥ 0, got {str(v)[:40]!r}")
        return v

    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("epochs"), list):
        raise bad("format", f"expected {{\"format\": {FORMAT}, \"epochs\": [...]}}")
    records = []
    for i, row in enumerate(doc["epochs"]):
        w = f"epochs[{i}]"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), dict) for k in ("params", "dead")) \
                or not isinstance(row.get("loss_steps"), list):
            raise bad(w, "expected a mapping with params, dead and loss_steps")
        params = {}
        for k, p in row["params"].items():
            if not isinstance(p, dict):
                raise bad(f"{w}.params.{k[:40]!r}", "expected a mapping")
            params[str(k)] = {m: num(p.get(m), f"{w}.params.{k[:40]!r}.{m}", none=True)
                              for m in ("grad_norm", "update_ratio", "weight_norm")}
        dead = {}
        for k, d in row["dead"].items():
            if not isinstance(d, dict):
                raise bad(f"{w}.dead.{k[:40]!r}", "expected a mapping")
            dead[str(k)] = {"units": integer(d.get("units"), f"{w}.dead.units"),
                            "dead": integer(d.get("dead"), f"{w}.dead.dead"),
                            "fraction": num(d.get("fraction"), f"{w}.dead.fraction"),
                            "layer": int(num(d.get("layer", -1), f"{w}.dead.layer"))}
        loss = []
        for j, pair in enumerate(row["loss_steps"]):
            if not isinstance(pair, list) or len(pair) != 2:
                raise bad(f"{w}.loss_steps[{j}]", "expected [step, loss]")
            loss.append((integer(pair[0], f"{w}.loss_steps[{j}]"), num(pair[1], f"{w}.loss_steps[{j}]")))
        records.append(FlowRecord(integer(row.get("epoch"), f"{w}.epoch"), integer(row.get("steps"), f"{w}.steps"),
                                  integer(row.get("steps_per_epoch"), f"{w}.steps_per_epoch"), params, dead, loss))
    if not records:
        raise bad("epochs", "no epoch recorded yet")
    return records
