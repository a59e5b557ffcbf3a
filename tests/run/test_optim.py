"""Optimizers and learning-rate schedules against numbers worked out by hand (never against the code itself).

SGD follows PyTorch: v ← μv + g; θ ← θ − lr·(g + μv) with Nesterov, θ ← θ − lr·v without; weight decay λθ is
added to the gradient of weights ('*.W') only. Adam: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
θ ← θ − lr·m̂/(√v̂ + ε) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ).

Every expected value below is written out as a literal, with the arithmetic that gives it in a comment.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnncli.config import AdamConfig, ScheduleConfig, SGDConfig
from cnncli.run.optim import SGD, Adam, learning_rate, make_optimizer


def _params(w: float = 1.0, b: float = 1.0, dtype: type = np.float64) -> dict[str, np.ndarray]:
    return {"fc1.W": np.full((2, 3), w, dtype=dtype), "fc1.b": np.full((2,), b, dtype=dtype)}


def _grads(g: float, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, g) for k, v in params.items()}


def _run(opt, params, grads_seq, lr):
    """Apply the steps; return the value of W and b (all entries equal) after each one."""
    out = []
    for g in grads_seq:
        opt.step(params, _grads(g, params), lr)
        w, b = params["fc1.W"], params["fc1.b"]
        assert np.all(w == w.flat[0]) and np.all(b == b.flat[0])
        out.append((float(w.flat[0]), float(b.flat[0])))
    return out


# ------------------------------------------------------------------------------------------------ SGD


def test_make_optimizer_picks_the_class() -> None:
    p = _params()
    assert isinstance(make_optimizer(p, SGDConfig()), SGD)
    assert isinstance(make_optimizer(p, AdamConfig()), Adam)


def test_sgd_plain() -> None:
    p = _params(w=1.0, b=-2.0)
    opt = make_optimizer(p, SGDConfig(momentum=0.0, nesterov=False, weight_decay=0.0))
    assert opt.state == {}  # no momentum buffer without momentum
    steps = _run(opt, p, [0.5, -0.25], lr=0.1)
    # θ1 = 1 − 0.1·0.5 = 0.95, θ2 = 0.95 + 0.1·0.25 = 0.975;  b: −2 − 0.05 = −2.05, −2.05 + 0.025 = −2.025
    assert steps[0] == pytest.approx((0.95, -2.05), abs=1e-12)
    assert steps[1] == pytest.approx((0.975, -2.025), abs=1e-12)


def test_sgd_momentum_heavy_ball() -> None:
    p = _params()
    opt = make_optimizer(p, SGDConfig(momentum=0.9, nesterov=False, weight_decay=0.0))
    steps = _run(opt, p, [0.5, -0.25, 0.1], lr=0.1)
    # v1 = 0.5,             θ1 = 1 − 0.1·0.5 = 0.95
    # v2 = 0.45 − 0.25 = 0.2, θ2 = 0.95 − 0.02 = 0.93
    # v3 = 0.18 + 0.1 = 0.28, θ3 = 0.93 − 0.028 = 0.902
    assert [w for w, _ in steps] == pytest.approx([0.95, 0.93, 0.902], abs=1e-12)
    assert [b for _, b in steps] == pytest.approx([0.95, 0.93, 0.902], abs=1e-12)
    assert set(opt.state) == {"fc1.W.momentum", "fc1.b.momentum"}
    np.testing.assert_allclose(opt.state["fc1.W.momentum"], 0.28, atol=1e-12)


def test_sgd_nesterov_pytorch_convention() -> None:
    p = _params()
    opt = make_optimizer(p, SGDConfig(momentum=0.9, nesterov=True, weight_decay=0.0))
    steps = _run(opt, p, [0.5, -0.25, 0.1], lr=0.1)
    # v1 = 0.5,  θ1 = 1 − 0.1·(0.5 + 0.9·0.5) = 1 − 0.095 = 0.905
    # v2 = 0.2,  θ2 = 0.905 − 0.1·(−0.25 + 0.18) = 0.905 + 0.007 = 0.912
    # v3 = 0.28, θ3 = 0.912 − 0.1·(0.1 + 0.252) = 0.912 − 0.0352 = 0.8768
    assert [w for w, _ in steps] == pytest.approx([0.905, 0.912, 0.8768], abs=1e-12)
    np.testing.assert_allclose(opt.state["fc1.W.momentum"], 0.28, atol=1e-12)


def test_sgd_weight_decay_on_weights_only_plain() -> None:
    p = _params()
    opt = make_optimizer(p, SGDConfig(momentum=0.0, nesterov=False, weight_decay=0.01))
    (w, b), = _run(opt, p, [0.5], lr=0.1)
    assert w == pytest.approx(0.949, abs=1e-12)  # 1 − 0.1·(0.5 + 0.01·1)
    assert b == pytest.approx(0.95, abs=1e-12)  # 1 − 0.1·0.5: no decay on biases


def test_sgd_weight_decay_with_nesterov_uses_current_theta() -> None:
    p = _params()
    opt = make_optimizer(p, SGDConfig(momentum=0.9, nesterov=True, weight_decay=0.1))
    steps = _run(opt, p, [0.5, 0.5], lr=0.1)
    # W: g1 = 0.5 + 0.1·1 = 0.6,         v1 = 0.6,    W1 = 1 − 0.1·(0.6 + 0.54) = 0.886
    #    g2 = 0.5 + 0.1·0.886 = 0.5886,  v2 = 0.54 + 0.5886 = 1.1286,
    #    W2 = 0.886 − 0.1·(0.5886 + 0.9·1.1286) = 0.886 − 0.160434 = 0.725566
    # b: v1 = 0.5, b1 = 0.905; v2 = 0.95, b2 = 0.905 − 0.1·(0.5 + 0.855) = 0.7695
    assert steps[0] == pytest.approx((0.886, 0.905), abs=1e-12)
    assert steps[1] == pytest.approx((0.725566, 0.7695), abs=1e-12)


def test_sgd_updates_in_place_and_keeps_float32() -> None:
    p = _params(dtype=np.float32)
    live = dict(p)
    opt = make_optimizer(p, SGDConfig())
    opt.step(p, _grads(0.5, p), 0.1)
    for k, v in p.items():
        assert v is live[k]  # the model's own arrays are updated
        assert v.dtype == np.float32
        assert opt.state[f"{k}.momentum"].dtype == np.float32


# ----------------------------------------------------------------------------------------------- Adam


def test_adam_three_steps_with_bias_correction() -> None:
    p = _params()
    opt = make_optimizer(p, AdamConfig(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    # t=1: m = 0.05, v = 0.00025, m̂ = 0.05/0.1 = 0.5, v̂ = 0.00025/0.001 = 0.25,
    #      θ1 = 1 − 0.1·0.5/(0.5 + 1e-8) = 0.900000002
    # t=2: m = 0.045 − 0.025 = 0.02, v = 0.00024975 + 0.0000625 = 0.00031225,
    #      m̂ = 0.02/0.19 = 0.1052631579, v̂ = 0.00031225/0.001999 = 0.1562031016, √v̂ = 0.3952254...
    #      θ2 = 0.900000002 − 0.1·0.1052631579/0.3952254 = 0.8733662987
    # t=3: m = 0.018 + 0.01 = 0.028, v = 0.00031193775 + 0.00001 = 0.00032193775,
    #      m̂ = 0.028/0.271 = 0.1033210332, v̂ = 0.00032193775/0.002997001 = 0.1074199675
    #      θ3 = 0.8733662987 − 0.1·0.1033210332/0.3277498551 = 0.8418419430
    steps = _run(opt, p, [0.5, -0.25, 0.1], lr=0.1)
    assert [w for w, _ in steps] == pytest.approx([0.900000002, 0.8733662987, 0.8418419430], abs=1e-9)
    assert [b for _, b in steps] == pytest.approx([0.900000002, 0.8733662987, 0.8418419430], abs=1e-9)
    assert int(opt.state["t"]) == 3
    np.testing.assert_allclose(opt.state["fc1.W.m"], 0.028, atol=1e-12)
    np.testing.assert_allclose(opt.state["fc1.W.v"], 0.00032193775, atol=1e-15)


def test_adam_first_step_is_lr_whatever_the_gradient_scale() -> None:
    """With bias correction m̂/√v̂ = g/|g| on step 1, so θ moves by lr (without it: by lr·0.1/√0.001 ≈ 3.16·lr)."""
    for g in (1e-4, 1.0, 300.0):
        p = _params()
        opt = make_optimizer(p, AdamConfig(eps=1e-12))
        (w, _), = _run(opt, p, [g], lr=0.01)
        assert w == pytest.approx(0.99, abs=1e-9)


def test_adam_weight_decay_on_weights_only() -> None:
    p = _params(w=2.0, b=2.0)
    opt = make_optimizer(p, AdamConfig(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5))
    # W: g = 0 + 0.5·2 = 1 → first step −lr·1/(1 + 1e-8): 2 − 0.1/(1 + 1e-8) = 1.900000001;
    # b: g = 0 → m = v = 0 → no move.
    (w, b), = _run(opt, p, [0.0], lr=0.1)
    assert w == pytest.approx(1.900000001, abs=1e-12)
    assert b == 2.0


# -------------------------------------------------------------------------------------------- schedules


def _sched(**kw) -> ScheduleConfig:
    return ScheduleConfig(**kw)


def test_constant_schedule() -> None:
    cfg = _sched(type="constant", warmup_epochs=0)
    assert [learning_rate(0.05, cfg, s, 10, 3) for s in (0, 1, 9, 10, 29, 30)] == [0.05] * 6


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs() -> None:
    cfg = _sched(type="step", warmup_epochs=0, step_size=2, gamma=0.5)
    # 10 steps per epoch: epochs 1-2 (steps 0-19) 0.1, epochs 3-4 (20-39) 0.05, epochs 5-6 (40-59) 0.025
    expected = {0: 0.1, 9: 0.1, 19: 0.1, 20: 0.05, 39: 0.05, 40: 0.025, 59: 0.025, 60: 0.0125}
    for s, lr in expected.items():
        assert learning_rate(0.1, cfg, s, 10, 8) == pytest.approx(lr, rel=1e-12), s


def test_cosine_schedule_closed_form_down_to_min_lr() -> None:
    cfg = _sched(type="cosine", warmup_epochs=0, min_lr=0.001)
    base, spe, epochs = 0.1, 10, 4  # 40 steps in all
    # lr(s) = min + ½(base − min)(1 + cos(π s/40))
    assert learning_rate(base, cfg, 0, spe, epochs) == pytest.approx(0.1, rel=1e-12)
    assert learning_rate(base, cfg, 10, spe, epochs) == pytest.approx(0.001 + 0.0495 * (1 + math.sqrt(0.5)), rel=1e-12)
    assert learning_rate(base, cfg, 20, spe, epochs) == pytest.approx(0.0505, rel=1e-12)  # halfway: the mean
    assert learning_rate(base, cfg, 30, spe, epochs) == pytest.approx(0.001 + 0.0495 * (1 - math.sqrt(0.5)), rel=1e-12)
    last = learning_rate(base, cfg, 39, spe, epochs)  # the last step of the run: just above min_lr
    assert last == pytest.approx(0.001 + 0.0495 * (1 + math.cos(math.pi * 39 / 40)), rel=1e-12)
    assert 0.001 < last < 0.0012
    assert learning_rate(base, cfg, 40, spe, epochs) == pytest.approx(0.001, rel=1e-12)  # the end: min_lr


def test_cosine_is_monotone_decreasing() -> None:
    cfg = _sched(type="cosine", warmup_epochs=0)
    lrs = [learning_rate(1.0, cfg, s, 7, 5) for s in range(36)]
    assert np.all(np.diff(lrs) < 0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_linear_warmup_reaches_base_lr_at_its_end_then_cosine() -> None:
    cfg = _sched(type="cosine", warmup_epochs=2, min_lr=0.0)
    base, spe, epochs = 0.2, 10, 4  # warm-up: steps 0-19, cosine over steps 20-39
    for s in range(20):
        assert learning_rate(base, cfg, s, spe, epochs) == pytest.approx(0.2 * (s + 1) / 20, rel=1e-12)
    assert learning_rate(base, cfg, 0, spe, epochs) == pytest.approx(0.01, rel=1e-12)
    assert learning_rate(base, cfg, 19, spe, epochs) == pytest.approx(0.2, rel=1e-12)  # end of warm-up: base lr
    assert learning_rate(base, cfg, 20, spe, epochs) == pytest.approx(0.2, rel=1e-12)  # cosine starts at base
    assert learning_rate(base, cfg, 30, spe, epochs) == pytest.approx(0.1, rel=1e-12)  # halfway through cosine
    assert learning_rate(base, cfg, 40, spe, epochs) == pytest.approx(0.0, abs=1e-15)


def test_fractional_warmup_with_constant() -> None:
    cfg = _sched(type="constant", warmup_epochs=0.5)  # 0.5 · 10 = 5 warm-up steps
    got = [learning_rate(1.0, cfg, s, 10, 2) for s in range(8)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0], rel=1e-12)
