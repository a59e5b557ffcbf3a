"""Optimizers (SGD with momentum / Nesterov / weight decay, Adam) and learning-rate schedules.

Optimizers update the model's parameter arrays in place from `model.named_grads()` and keep their buffers
in a flat dict keyed '<param>.<buffer>' ('conv1.W.momentum'), so a checkpoint stores them as arrays.
Weight decay (an L2 term λ·θ added to the gradient) applies to the parameters each layer lists in its `decay`
(weights 'W', not biases; batch-norm's γ, β neither); buffers are never seen by the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

from cnncli.config import AdamConfig, OptimizerConfig, ScheduleConfig, SGDConfig
from cnncli.host.errors import ConfigError


def _decayed(params: dict[str, np.ndarray], decay: Collection[str] | None) -> frozenset[str]:
    """The parameters weight decay applies to: `decay` (a model's `Sequential.decayed()`, from each layer's
    `decay` keys), or when None every '*.W', the built-in layers' rule."""
    return frozenset(decay) if decay is not None else frozenset(k for k in params if k.endswith(".W"))


def decay_coefficient(cfg: OptimizerConfig, decayed: bool, lr_scale: float = 1.0) -> float:
    """c with g = ∂L/∂θ + c·θ for a parameter with learning-rate multiplier `lr_scale`: λ for a decayed
    parameter (L2), or λ/(lr·lr_scale) when the decay is decoupled (so that the step's lr·s·lr_scale·c = λ·s,
    s the schedule's factor); 0 for the others."""
    wd = cfg.weight_decay
    if not wd or not decayed:
        return 0.0
    if cfg.decoupled_weight_decay:
        return wd / (cfg.lr * lr_scale)
    return wd


class _PerParam:
    """What SGD and Adam share: per-parameter learning-rate scales (`lr_scale`, cnncli/run/paramgroups.py) and the
    weight decay coefficient of each parameter."""

    cfg: SGDConfig | AdamConfig
    decay: frozenset[str]
    lr_scale: dict[str, float]

    def decay_coefficient(self, name: str) -> float:
        """c with g = ∂L/∂θ + c·θ (`decay_coefficient` below)."""
        return decay_coefficient(self.cfg, name in self.decay, self.lr_scale.get(name, 1.0))


class SGD(_PerParam):
    """v ← μ·v + g;  θ ← θ − lr·(g + μ·v) with Nesterov, θ ← θ − lr·v without (PyTorch's convention).

    g is the gradient plus weight decay c·θ for decayed parameters (`decay_coefficient`); lr is multiplied by
    the parameter's `lr_scale`; parameters in `frozen` are left alone (no step, momentum kept).
    """

    def __init__(self, params: dict[str, np.ndarray], cfg: SGDConfig, decay: Collection[str] | None = None,
                 lr_scale: dict[str, float] | None = None) -> None:
        self.cfg = cfg
        self.decay = _decayed(params, decay)
        self.lr_scale = dict(lr_scale or {})
        self.state: dict[str, np.ndarray] = {}
        if cfg.momentum > 0:
            self.state = {f"{k}.momentum": np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float,
             frozen: Collection[str] = frozenset()) -> None:
        mu = self.cfg.momentum
        for name, theta in params.items():
            if name in frozen:
                continue
            g = grads[name]
            c = self.decay_coefficient(name)
            if c:
                g = g + c * theta
            if mu > 0:
                v = self.state[f"{name}.momentum"]
                v *= mu
                v += g
                step = g + mu * v if self.cfg.nesterov else v
            else:
                step = g
            theta -= (lr * self.lr_scale.get(name, 1.0) * step).astype(theta.dtype, copy=False)


class Adam(_PerParam):
    """m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; θ ← θ − lr·m̂ / (√v̂ + ε), with bias-corrected m̂, v̂."""

    def __init__(self, params: dict[str, np.ndarray], cfg: AdamConfig, decay: Collection[str] | None = None,
                 lr_scale: dict[str, float] | None = None) -> None:
        self.cfg = cfg
        self.decay = _decayed(params, decay)
        self.lr_scale = dict(lr_scale or {})
        self.state: dict[str, np.ndarray] = {"t": np.zeros((), dtype=np.int64)}
        for k, v in params.items():
            self.state[f"{k}.m"] = np.zeros_like(v)
            self.state[f"{k}.v"] = np.zeros_like(v)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float,
             frozen: Collection[str] = frozenset()) -> None:
        b1, b2 = self.cfg.betas
        eps = self.cfg.eps
        self.state["t"] += 1
        t = int(self.state["t"])
        c1, c2 = 1 - b1**t, 1 - b2**t
        for name, theta in params.items():
            if name in frozen:
                continue
            g = grads[name]
            c = self.decay_coefficient(name)
            if c:
                g = g + c * theta
            m, v = self.state[f"{name}.m"], self.state[f"{name}.v"]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            theta -= (lr * self.lr_scale.get(name, 1.0) * (m / c1) / (np.sqrt(v / c2) + eps)).astype(
                theta.dtype, copy=False)


Optimizer = SGD | Adam


def make_optimizer(
    params: dict[str, np.ndarray], cfg: OptimizerConfig, decay: Collection[str] | None = None,
    lr_scale: dict[str, float] | None = None,
) -> Optimizer:
    """The optimizer of `cfg` over `params`; weight decay on the names in `decay` (see `_decayed`), learning
    rates multiplied by `lr_scale[name]` (cnncli/run/paramgroups.py)."""
    if isinstance(cfg, SGDConfig):
        return SGD(params, cfg, decay, lr_scale)
    return Adam(params, cfg, decay, lr_scale)


def mode_of(metric: str) -> str:
    """'max' for accuracies, 'min' for losses: the direction in which `metric` improves."""
    return "max" if metric.endswith("_acc") else "min"


def improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` (anything beats None)."""
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def plateau_lr(base_lr: float, cfg: ScheduleConfig, monitored: Sequence[float]) -> float:
    """The plateau schedule's learning rate after the epochs whose `cfg.monitor` values are `monitored`.

    Replays the rule over the history, so the result depends on the recorded values only (a resumed run
    gets the same learning rate): an epoch that does not improve on the best value so far by more than
    min_delta adds one to a counter, an improving one resets it; when the counter reaches `patience`,
    the learning rate is multiplied by `factor` (never below min_lr) and the counter restarts.
    """
    lr, best, waited = base_lr, None, 0
    mode = mode_of(cfg.monitor)
    for value in monitored:
        if improves(value, best, mode, cfg.min_delta):
            best, waited = value, 0
            continue
        waited += 1
        if waited >= cfg.patience:
            lr, waited = max(lr * cfg.factor, cfg.min_lr), 0
    return lr


def check_schedule(cfg: ScheduleConfig, where: str = "train.schedule") -> None:
    """ConfigError (one line, naming the key) for a piecewise schedule whose points are not [fraction, factor]
    pairs with fractions rising from 0 to 1."""
    if cfg.type != "piecewise":
        return
    pts = cfg.points
    if len(pts) < 2:
        raise ConfigError(f"{where}.points: a piecewise schedule needs at least two [fraction, factor] points, "
                          f"got {len(pts)}")
    for i, p in enumerate(pts):
        if len(p) != 2:
            raise ConfigError(f"{where}.points[{i}]: expected [fraction of the run, factor], got {list(p)}")
    fractions = [p[0] for p in pts]
    if fractions[0] != 0 or fractions[-1] != 1:
        raise ConfigError(f"{where}.points: the fractions must start at 0 and end at 1, got {fractions}")
    for i in range(1, len(pts)):
        if fractions[i] <= fractions[i - 1]:
            raise ConfigError(f"{where}.points[{i}]: fraction {fractions[i]} does not rise above {fractions[i - 1]}")


def piecewise_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """The factor of the piecewise-linear schedule at step `step` of `total_steps`: linear between the points
    (fraction·total_steps, factor)."""
    xs = [p[0] * total_steps for p in cfg.points]
    return float(np.interp(step, xs, [p[1] for p in cfg.points]))


def learning_rate(
    base_lr: float,
    cfg: ScheduleConfig,
    step: int,
    steps_per_epoch: int,
    epochs: int,
    monitored: Sequence[float] = (),
    total_steps: int | None = None,
) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `epochs` epochs (of `total_steps`
    steps when given, else epochs·steps_per_epoch).

    Warm-up ramps linearly over the first warmup_epochs·steps_per_epoch steps, reaching base_lr at its end
    (step s gets base_lr·(s+1)/warmup_steps). Then: constant; step (×gamma every step_size epochs); cosine
    from base_lr down to min_lr at the end of the run; plateau, from `monitored` (the value of
    cfg.monitor of each epoch completed so far, see `plateau_lr`); or piecewise, base_lr times the factor
    interpolated between cfg.points (fractions of the run's steps).
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.type == "constant":
        return base_lr
    if cfg.type == "step":
        return base_lr * cfg.gamma ** (step // steps_per_epoch // cfg.step_size)
    if cfg.type == "plateau":
        return plateau_lr(base_lr, cfg, monitored)
    run = total_steps if total_steps is not None else epochs * steps_per_epoch
    if cfg.type == "piecewise":
        return base_lr * piecewise_factor(cfg, step, run)
    total = max(run - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
