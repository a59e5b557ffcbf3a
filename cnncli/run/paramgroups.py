"""Per-parameter training rules from `train.param_groups`: a learning-rate multiplier, weight decay on or off,
and frozen parameters (for the whole run, before an epoch, or from an epoch on).

Each group names parameters by a shell-style pattern (`fnmatch`) on the names `cnn summary` and checkpoints
use ('conv1.W', 'bn3.beta'); a parameter follows the first group that matches it and the defaults (scale 1,
the layer's own decay rule, always trained) when none does. A frozen parameter is skipped by the optimizer
entirely: no gradient step, no decay, its momentum left as it was (docs/derivations.md#optimisers).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from cnncli.config import ParamGroupConfig
from cnncli.host.errors import ConfigError


@dataclass(frozen=True)
class ParamRules:
    """What `resolve` made of the groups for one network's parameters."""

    lr_scale: dict[str, float] = field(default_factory=dict)  # only the parameters with a scale ≠ 1
    decay: frozenset[str] = frozenset()  # the parameters weight decay applies to
    windows: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # trains in [from, until) epochs

    def frozen_at(self, epoch: int) -> frozenset[str]:
        """The parameters not updated in epoch `epoch` (0-based)."""
        return frozenset(name for name, (start, stop) in self.windows.items()
                         if epoch < start or (stop is not None and epoch >= stop))


def _shown(names: Iterable[str], most: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f", … ({len(names)} in all)" if len(names) > most else "")


def resolve(names: Collection[str], default_decay: Collection[str], groups: tuple[ParamGroupConfig, ...],
            where: str = "train.param_groups") -> ParamRules:
    """The rules for the parameters `names` (in order), weight decay by default on `default_decay`.

    ConfigError (one line, naming the group's key) for an empty pattern, a pattern that matches no parameter
    (a misspelt name would otherwise silently train as usual), or an empty training window."""
    owner: dict[str, int] = {}
    for i, g in enumerate(groups):
        key = f"{where}[{i}]"
        if not g.match:
            raise ConfigError(f"{key}.match: missing; a pattern on parameter names such as 'bn*.beta' or 'conv1.*'")
        if g.trains_until is not None and g.trains_until <= g.trains_from:
            raise ConfigError(f"{key}.trains_until: {g.trains_until} is not after trains_from {g.trains_from}; "
                              "the parameters would never train (use frozen: true for that)")
        hits = [n for n in names if fnmatch.fnmatchcase(n, g.match)]
        if not hits:
            raise ConfigError(f"{key}.match: {g.match!r} matches no parameter of this network (its parameters: "
                              f"{_shown(names)})")
        for n in hits:
            owner.setdefault(n, i)
    lr_scale: dict[str, float] = {}
    decay = set(default_decay)
    windows: dict[str, tuple[int, int | None]] = {}
    for n, i in owner.items():
        g = groups[i]
        if g.lr_scale != 1.0:
            lr_scale[n] = g.lr_scale
        if g.decay is True:
            decay.add(n)
        elif g.decay is False:
            decay.discard(n)
        if g.frozen:
            windows[n] = (0, 0)
        elif g.trains_from or g.trains_until is not None:
            windows[n] = (g.trains_from, g.trains_until)
    return ParamRules(lr_scale=lr_scale, decay=frozenset(decay & set(names)), windows=windows)
