"""Lookahead: an exponential moving average of the weights and running statistics that the network is reset to
every few steps (`train.lookahead`, airbench's form; docs/derivations.md#lookahead).

Every `every` steps, after step t of T: d = decay^every · (t/T)^power; avg ← avg + (1 − d)·(θ − avg) for every
parameter and buffer θ; then θ ← avg. After the last step θ ← avg once more. The averages start as the network's
values before the first step and are saved in checkpoints as `optim.<name>.lookahead`, so a resumed run continues
them bit for bit.
"""

from __future__ import annotations

import numpy as np

from cnncli.config import LookaheadConfig
from cnncli.nn.model import Sequential


class Lookahead:
    """The averages `state` ('<name>.lookahead' -> array like the network's) and the rule above."""

    def __init__(self, live: dict[str, np.ndarray], cfg: LookaheadConfig, total_steps: int) -> None:
        """`live`: the arrays the rule averages and writes back, by name (updated in place; any strides)."""
        self.cfg, self.total = cfg, total_steps
        self.live = live
        self.state: dict[str, np.ndarray] = {f"{k}.lookahead": v.copy() for k, v in self.live.items()}

    @classmethod
    def of(cls, model: Sequential, cfg: LookaheadConfig, total_steps: int) -> Lookahead:
        """The lookahead of a network's parameters and buffers (batch-norm running statistics)."""
        return cls({**model.named_params(), **model.named_buffers()}, cfg, total_steps)

    def decay(self, t: int) -> float:
        """d after step t (1-based count of steps done): decay^every · (t/T)^power."""
        return self.cfg.decay ** self.cfg.every * (t / self.total) ** self.cfg.power

    def after_step(self, t: int) -> None:
        """Call after every optimizer step with t = the steps done so far (1 … T)."""
        if t % self.cfg.every == 0:
            d = self.decay(t)
            for k, theta in self.live.items():
                avg = self.state[f"{k}.lookahead"]
                avg += ((1.0 - d) * (theta - avg)).astype(avg.dtype, copy=False)
                theta[...] = avg
        if t == self.total:
            for k, theta in self.live.items():
                theta[...] = self.state[f"{k}.lookahead"]
