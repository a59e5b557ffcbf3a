"""Issue 26's training-side pieces: per-parameter learning-rate scales, weight decay on/off per group,
decoupled weight decay, frozen parameters (the run, before an epoch, from an epoch on), label smoothing in the
loop — hand-worked optimizer steps and short runs on real CIFAR-10 slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cnncli.run.train import train
from helpers import arrays as _arrays

from cnncli.config import ParamGroupConfig, SGDConfig, load_config
from cnncli.host.errors import ConfigError
from cnncli.run.optim import SGD
from cnncli.run.paramgroups import resolve

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "configs" / "seed.yaml"


def _one(value: float) -> dict[str, np.ndarray]:
    return {"p": np.array([value])}


def test_lr_scale_multiplies_the_nesterov_step_by_hand() -> None:
    # θ = 1, g = 2, lr 0.1, μ 0.9, scale 64: v = 2, step g + μv = 3.8, θ = 1 − 0.1·64·3.8 = −23.32
    params = _one(1.0)
    opt = SGD(params, SGDConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0), decay=(), lr_scale={"p": 64})
    opt.step(params, _one(2.0), 0.1)
    assert params["p"][0] == pytest.approx(-23.32, rel=1e-14)
    assert opt.state["p.momentum"][0] == 2.0


def test_frozen_parameters_are_not_touched_and_keep_their_momentum() -> None:
    params = {"a": np.array([1.0]), "b": np.array([1.0])}
    opt = SGD(params, SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.5), decay=("a", "b"))
    opt.step(params, {"a": np.array([2.0]), "b": np.array([2.0])}, 0.1)
    b_before, v_before = params["b"].copy(), opt.state["b.momentum"].copy()
    opt.step(params, {"a": np.array([2.0]), "b": np.array([2.0])}, 0.1, frozen={"b"})
    assert params["b"] == b_before and opt.state["b.momentum"] == v_before
    assert params["a"] != params["b"]


def test_decoupled_decay_takes_lambda_times_the_schedule_factor_whatever_the_lr_and_its_scale() -> None:
    # no gradient, no momentum: one step removes λ·s of θ, with s = lr / base lr = 0.5, for any lr_scale
    for scale in (1.0, 4.0, 64.0):
        params = _one(1.0)
        cfg = SGDConfig(lr=0.5, momentum=0.0, weight_decay=0.01, decoupled_weight_decay=True)
        SGD(params, cfg, decay=("p",), lr_scale={"p": scale}).step(params, _one(0.0), 0.25)
        assert params["p"][0] == pytest.approx(1 - 0.01 * 0.5, rel=1e-15)
    # coupled (L2): the same λ is scaled by the step's lr and the scale: 1 − 0.25·4·0.01
    params = _one(1.0)
    SGD(params, SGDConfig(lr=0.5, momentum=0.0, weight_decay=0.01), decay=("p",), lr_scale={"p": 4.0}).step(
        params, _one(0.0), 0.25)
    assert params["p"][0] == pytest.approx(1 - 0.25 * 4 * 0.01, rel=1e-15)


NAMES = ["whiten.W", "whiten.b", "conv1.W", "bn1.beta", "bn2.beta", "fc1.W"]


def test_groups_resolve_first_match_wins_and_set_scale_decay_and_windows() -> None:
    groups = (
        ParamGroupConfig(match="whiten.W", frozen=True),
        ParamGroupConfig(match="whiten.b", trains_until=3, decay=True),
        ParamGroupConfig(match="bn*.beta", lr_scale=64, decay=True),
        ParamGroupConfig(match="*", decay=False, lr_scale=2),  # conv1.W, fc1.W only: the others matched before
    )
    rules = resolve(NAMES, {"whiten.W", "conv1.W", "fc1.W"}, groups)
    assert rules.lr_scale == {"bn1.beta": 64, "bn2.beta": 64, "conv1.W": 2, "fc1.W": 2}
    assert rules.decay == {"whiten.W", "whiten.b", "bn1.beta", "bn2.beta"}
    assert rules.frozen_at(0) == {"whiten.W"} and rules.frozen_at(2) == {"whiten.W"}
    assert rules.frozen_at(3) == {"whiten.W", "whiten.b"}
    late = resolve(NAMES, set(), (ParamGroupConfig(match="fc1.*", trains_from=2, trains_until=4),))
    assert [bool(late.frozen_at(e)) for e in range(6)] == [True, True, False, False, True, True]


@pytest.mark.parametrize("group, message", [
    (ParamGroupConfig(match="bn9.*"), r"train.param_groups\[0\].match: 'bn9.\*' matches no parameter .*bn1.beta"),
    (ParamGroupConfig(match=""), r"train.param_groups\[0\].match: missing"),
    (ParamGroupConfig(match="*", trains_from=3, trains_until=3), r"trains_until: 3 is not after trains_from 3"),
])
def test_group_mistakes_are_one_line_config_errors(group: ParamGroupConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(NAMES, set(), (group,))


# ------------------------------------------------------------------------------------------ in the loop

SMALL = ("data.limit=600", "data.val_size=100", "train.batch_size=100", "train.epochs=2")


def test_frozen_and_late_frozen_parameters_in_a_real_run(real_cifar_dir: Path, tmp_path: Path) -> None:
    groups = "[{match: conv1.W, frozen: true}, {match: conv1.b, trains_until: 1}, {match: fc1.*, lr_scale: 0.5}]"
    cfg = load_config(SEED, [*SMALL, f"train.param_groups={groups}", "train.label_smoothing=0.1"])
    train(load_config(SEED, [*SMALL, "train.epochs=1", f"train.param_groups={groups}",
                             "train.label_smoothing=0.1"]), tmp_path / "one", real_cifar_dir)
    train(cfg, tmp_path / "two", real_cifar_dir)
    init = _init_params(cfg)
    one, two = _arrays(tmp_path / "one" / "last.npz"), _arrays(tmp_path / "two" / "last.npz")
    assert np.array_equal(two["conv1.W"], init["conv1.W"])  # frozen for the run
    assert not np.array_equal(one["conv1.b"], init["conv1.b"])  # trained in epoch 0 …
    assert np.array_equal(two["conv1.b"], one["conv1.b"])  # … and not after it
    assert not np.array_equal(two["fc1.W"], one["fc1.W"])


def _init_params(cfg) -> dict[str, np.ndarray]:
    from cnncli.nn.model import build_model

    return {k: v.copy() for k, v in build_model(cfg.model, seed=cfg.seed).named_params().items()}
