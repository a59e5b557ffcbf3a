"""Issue 26's training-side pieces: per-parameter learning-rate scales, weight decay on/off per group,
decoupled weight decay, frozen parameters (the run, before an epoch, from an epoch on), label smoothing in the
loop — hand-worked optimizer steps and short runs on real CIFAR-10 slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import arrays as _arrays

from cnncli.config import ParamGroupConfig, SGDConfig, load_config
from cnncli.host.errors import ConfigError
from cnncli.run.optim import SGD
from cnncli.run.paramgroups import resolve
from cnncli.run.train import train

ROOT = Path(__file__).resolve().parents[2]
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


# ----------------------------------------------------------------------------------- schedules and length


def test_piecewise_schedule_is_the_linear_interpolation_between_its_points() -> None:
    from cnncli.config import ScheduleConfig
    from cnncli.run.optim import learning_rate

    cfg = ScheduleConfig(type="piecewise", points=((0.0, 0.2), (0.23, 1.0), (1.0, 0.07)))
    total, knee = 476, 0.23 * 476  # the knee at step 109.48

    def by_hand(s: float) -> float:
        if s <= knee:
            return 0.2 + (1.0 - 0.2) * s / knee
        return 1.0 + (0.07 - 1.0) * (s - knee) / (total - knee)

    for s in (0, 1, 50, 109, 110, 300, 475, 476, 500):
        assert learning_rate(1.5, cfg, s, 48, 10, (), total) == pytest.approx(1.5 * by_hand(min(s, total)), rel=1e-12)


@pytest.mark.parametrize("points, message", [
    (((0.0, 1.0),), "at least two"),
    (((0.0, 1.0, 2.0), (1.0, 0.5)), r"points\[0\]: expected \[fraction of the run, factor\]"),
    (((0.1, 1.0), (1.0, 0.5)), "must start at 0 and end at 1"),
    (((0.0, 1.0), (0.5, 1.0), (0.5, 0.2), (1.0, 0.1)), r"points\[2\]: fraction 0.5 does not rise above 0.5"),
])
def test_piecewise_points_mistakes_are_named(points, message: str) -> None:
    from cnncli.config import ScheduleConfig
    from cnncli.run.optim import check_schedule

    with pytest.raises(ConfigError, match=message):
        check_schedule(ScheduleConfig(type="piecewise", points=points))


def test_run_length_with_steps_and_drop_last() -> None:
    from cnncli.config import TrainConfig
    from cnncli.run.train import run_length

    assert run_length(TrainConfig(batch_size=1024, drop_last=True, steps=476), 50000) == (48, 10, 476)
    assert run_length(TrainConfig(batch_size=1024, epochs=3), 50000) == (49, 3, 147)
    assert run_length(TrainConfig(batch_size=1024, drop_last=True, epochs=2), 50000) == (48, 2, 96)
    with pytest.raises(ConfigError, match="make no whole batch"):
        run_length(TrainConfig(batch_size=1024, drop_last=True), 1000)


# ------------------------------------------------------------------------------------------ augmentation


def test_alternating_flips_complement_each_other_epoch_by_epoch() -> None:
    from cnncli.data.preprocess import alternating_flips

    e0, e1, e2 = (alternating_flips(7, e, 10000) for e in range(3))
    assert np.array_equal(e1, ~e0) and np.array_equal(e2, e0)
    assert 4700 < e0.sum() < 5300  # a random half
    assert not np.array_equal(alternating_flips(8, 0, 10000), e0)  # the seed matters


def test_reflect_padded_crops_read_the_mirrored_image_at_the_drawn_offsets() -> None:
    from cnncli.config import AugmentConfig
    from cnncli.data.preprocess import augment

    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (5, 2, 6, 7), dtype=np.uint8)
    cfg = AugmentConfig(flip=False, crop_padding=2, pad_mode="reflect")
    out = augment(x, cfg, np.random.default_rng(3))
    offsets = np.random.default_rng(3).integers(0, 5, size=(5, 2))  # what augment draws first

    def mirror(k: int, size: int) -> int:  # reflect without repeating the edge: −1 -> 1, size -> size − 2
        return -k if k < 0 else (2 * (size - 1) - k if k >= size else k)

    for n, c, i, j in np.ndindex(*x.shape):
        di, dj = offsets[n]
        assert out[n, c, i, j] == x[n, c, mirror(i + di - 2, 6), mirror(j + dj - 2, 7)]
    flips = np.array([True, False, True, False, False])
    flipped = augment(x, AugmentConfig(flip=True, crop_padding=0), np.random.default_rng(0), flips)
    np.testing.assert_array_equal(flipped[flips], x[flips][..., ::-1])
    np.testing.assert_array_equal(flipped[~flips], x[~flips])


# ---------------------------------------------------------------------------------------------- lookahead


def test_lookahead_by_hand() -> None:
    from cnncli.config import LookaheadConfig
    from cnncli.run.lookahead import Lookahead

    class _Net:  # the two dicts Lookahead reads
        def __init__(self) -> None:
            self.p = {"w": np.array([1.0])}
            self.b = {"bn.running_mean": np.array([0.0])}

        def named_params(self):
            return self.p

        def named_buffers(self):
            return self.b

    net = _Net()
    la = Lookahead.of(net, LookaheadConfig(every=2, decay=0.5, power=1.0), total_steps=5)  # avg starts at 1, 0
    w, rm = net.p["w"], net.b["bn.running_mean"]
    w[0], rm[0] = 3.0, 2.0  # after step 1: not a multiple of 2, nothing happens
    la.after_step(1)
    assert (w[0], rm[0]) == (3.0, 2.0)
    w[0], rm[0] = 5.0, 4.0
    la.after_step(2)  # d = 0.5²·(2/5) = 0.1: avg = 1 + 0.9·(5 − 1) = 4.6, rm: 0 + 0.9·4 = 3.6; the net takes them
    assert w[0] == pytest.approx(4.6) and rm[0] == pytest.approx(3.6)
    w[0] = 10.0
    la.after_step(4)  # d = 0.25·0.8 = 0.2: avg = 4.6 + 0.8·5.4 = 8.92
    assert w[0] == pytest.approx(8.92)
    w[0] = 0.0
    la.after_step(5)  # the last step: the net takes the average, unchanged
    assert w[0] == pytest.approx(8.92) and la.state["w.lookahead"][0] == pytest.approx(8.92)


# ------------------------------------------------------------------------- the recipe on a small slice

NARROW = [f"model.layers[{i}].out_channels={c}" for i, c in ((2, 8), (6, 8), (9, 16), (13, 16), (16, 16), (20, 16))]
SLICE = ["data.limit=600", "train.batch_size=100", "train.steps=9", "model.layers[0].whiten=200",
         "train.lookahead.every=2", "train.eval_batch_size=500"]


def test_airbench_recipe_on_a_slice_resumes_bit_exactly_mid_epoch_with_the_lookahead(
        real_cifar_dir: Path, tmp_path: Path) -> None:
    import math

    from helpers import StopAt, assert_same_training_state

    from cnncli.data import load_dataset, make_splits
    from cnncli.data.preprocess import Normalizer
    from cnncli.nn.datainit import second_moment, whitening_weights
    from cnncli.run.checkpoint import load_checkpoint
    from cnncli.run.train import TrainingInterrupted

    cfg = load_config("airbench94", NARROW + SLICE)
    whole, split = tmp_path / "whole", tmp_path / "split"
    result = train(cfg, whole, real_cifar_dir)
    assert [m.epoch for m in result.history] == [1, 2] and math.isfinite(result.history[-1].train_loss)
    ck = load_checkpoint(whole / "last.npz")
    assert ck.state["step"] == 9 and "bn1.running_mean.lookahead" in ck.optim and "fc1.W.lookahead" in ck.optim
    # the frozen whitening conv holds the whitening of the first 200 normalised training images
    data = load_dataset(ck.config.data, real_cifar_dir)
    train_x = make_splits(data.train_x, data.train_y, val_size=0, limit=600, seed=0).train_x
    want = whitening_weights(second_moment(iter([Normalizer(ck.config.data.normalize, 3)(train_x[:200])]), 2),
                             3, 2, 5e-4)
    np.testing.assert_allclose(ck.params["whiten.W"], want, rtol=1e-5, atol=1e-6)
    # after the last step the network is the lookahead average
    for k, v in ck.params.items():
        np.testing.assert_array_equal(v, ck.optim[f"{k}.lookahead"])

    with pytest.raises(TrainingInterrupted):
        train(cfg, split, real_cifar_dir, callbacks=StopAt((1, 3)))  # after step 3: the lookahead moved at step 2
    part = load_checkpoint(split / "last.npz")
    assert (part.state["epoch"], part.state["batch"]) == (0, 3)
    train(part.config, split, real_cifar_dir, resume=part, resume_path=split / "last.npz")
    assert_same_training_state(whole / "last.npz", split / "last.npz")
