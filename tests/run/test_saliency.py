"""δU = ∂L/∂U on pixels (cnncli/run/saliency.py) and the attacks built on it (cnncli/run/attack.py).

Checked against numbers computed here, independently of the code under test:
- δU against a five-point finite difference of L = −log p_t on the pixels, with the normalisation written
  out here ((U − μ)/σ, a σ far from 1 and different per channel, so a missing /σ fails), on a network with
  batch-norm (non-trivial running statistics) and dropout, left in training mode (a gradient not taken in
  evaluation mode fails);
- FGSM's perturbation against ε · sign of the finite-difference gradient, every pixel;
- PGD: inside the ε-ball and [0, 1] with a step size that overshoots, the ball's edge reached, L raised.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnncli.config import NormalizeConfig, build_config
from cnncli.host.errors import ConfigError
from cnncli.nn.model import build_model
from cnncli.run.attack import attack, fgsm, parse_eps, pgd, project
from cnncli.run.saliency import PixelScale, input_gradient, saliency

MEAN = np.array([0.3, 0.6, 0.45])
STD = np.array([0.2, 0.5, 0.13])


def _model(dropout: bool = True):
    layers = [
        {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "flatten"},
    ]
    if dropout:
        layers.append({"type": "dropout", "p": 0.5})
    layers.append({"type": "linear", "out_features": 5})
    cfg = build_config({"model": {"input_shape": [3, 6, 6], "layers": layers}})
    model = build_model(cfg.model, seed=3).astype(np.float64)
    rng = np.random.default_rng(1)
    for k, v in model.named_buffers().items():  # running statistics far from (0, 1)
        v[...] = rng.uniform(0.2, 1.5, v.shape) if k.endswith("var") else rng.normal(0, 0.5, v.shape)
    for v in model.named_params().values():
        v[...] = v * 1.5  # larger weights: a less trivial loss surface
    model.train()  # the code under test must switch to evaluation mode itself
    return model


def _scale() -> PixelScale:
    return PixelScale.of(NormalizeConfig(tuple(MEAN), tuple(STD)), 3)


def _loss(model, u: np.ndarray, t: int) -> float:
    """L = −log softmax(z)[t] of one image of pixels u (C, H, W), written here: normalise, forward, log-softmax."""
    x = (u - MEAN[:, None, None]) / STD[:, None, None]
    model.eval()
    z = model.forward(x[None])[0]
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[t])


def _fd_grad(model, u: np.ndarray, t: int, h: float = 1e-5) -> np.ndarray:
    """Five-point centred difference of L on every pixel of u (C, H, W)."""
    g = np.empty(u.shape)
    for i in range(u.size):
        def f(step: float, i: int = i) -> float:
            v = u.copy()
            v.reshape(-1)[i] += step
            return _loss(model, v, t)
        g.reshape(-1)[i] = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
    return g


@pytest.fixture(scope="module")
def case():
    model = _model()
    rng = np.random.default_rng(7)
    u = rng.uniform(0.05, 0.95, size=(3, 3, 6, 6))
    model.eval()
    z = model.forward((u - MEAN[None, :, None, None]) / STD[None, :, None, None])
    t = np.argsort(z, axis=1)[:, -2]  # the second most probable class: p_t well away from 0 and 1
    fd = np.stack([_fd_grad(model, u[n], int(t[n])) for n in range(3)])
    model.train()
    return model, u, t, fd


def test_pixel_gradient_equals_finite_differences_through_the_normalisation(case) -> None:
    model, u, t, fd = case
    model.train()
    g = input_gradient(model, _scale(), u, t)
    assert model.training  # the mode is given back
    assert g.grad.shape == u.shape
    assert np.abs(fd).max() > 1e-2  # a gradient worth checking
    err = np.abs(g.grad - fd) / np.maximum(np.abs(g.grad) + np.abs(fd), 1e-8)
    assert err.max() < 1e-6, err.max()
    # and the loss it reports is the image's own −log p_t
    assert np.allclose(g.loss, [_loss(model, u[n], int(t[n])) for n in range(3)], rtol=1e-12)


def test_saliency_maps_and_the_predicted_class(case) -> None:
    model, u, _, _ = case
    s = saliency(model, _scale(), u)
    model.eval()
    z = model.forward((u - MEAN[None, :, None, None]) / STD[None, :, None, None])
    assert np.array_equal(s.target, z.argmax(axis=1))  # default target: the prediction
    assert np.allclose(s.heat, np.abs(s.grad).max(axis=1))
    assert np.allclose(s.grad_x_input, -(u * s.grad).sum(axis=1))
    assert s.smooth is None
    sm = saliency(model, _scale(), u, s.target, samples=4, noise=0.0)  # noise 0: the mean of 4 equal gradients
    assert np.allclose(sm.smooth, s.grad, rtol=1e-12, atol=0)
    sm = saliency(model, _scale(), u, s.target, samples=4, noise=0.2)
    assert not np.allclose(sm.smooth, s.grad)


def test_fgsm_is_eps_times_the_sign_of_the_finite_difference_gradient(case) -> None:
    model, u, t, fd = case
    model.train()
    eps = 2 / 255  # u lies in [0.05, 0.95]: no pixel is clipped
    adv = fgsm(model, _scale(), u, t, eps)
    assert np.all(np.abs(fd) > 1e-9)  # every sign is defined
    assert np.array_equal(adv - u == 0, np.zeros(u.shape, bool))
    assert np.allclose(adv - u, eps * np.sign(fd), rtol=0, atol=1e-15)
    # the loss rises at every image (first order: ε‖δU‖₁ > 0)
    assert all(_loss(model, adv[n], int(t[n])) > _loss(model, u[n], int(t[n])) for n in range(3))


def test_fgsm_keeps_pixels_in_range() -> None:
    model = _model(dropout=False)
    u = np.zeros((2, 3, 6, 6))
    u[1] = 1.0
    adv = fgsm(model, _scale(), u, np.array([1, 2]), 0.1)
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    d = np.abs(adv - u)
    assert np.all((d == 0) | np.isclose(d, 0.1, rtol=0, atol=1e-15))
    assert (d == 0).any() and (d > 0).any()  # some pixels were pushed out of [0, 1] and cut back, some moved


def test_pgd_stays_in_the_ball_and_in_range_and_raises_the_loss(case) -> None:
    model, _, t, _ = case
    rng = np.random.default_rng(2)
    u = rng.uniform(0, 1, size=(3, 3, 6, 6))
    u[:, 0, :2] = 0.0  # pixels on the edges of [0, 1]: the range cuts the ball there
    u[:, 1, :2] = 1.0
    eps = 4 / 255
    adv = pgd(model, _scale(), u, t, eps, steps=5, step_size=3 * eps)  # every step overshoots the ball
    d = adv - u
    assert np.abs(d).max() <= eps + 1e-15
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.isclose(np.abs(d), eps, rtol=0, atol=1e-12).mean() > 0.5  # most pixels end on the ball's edge
    assert all(_loss(model, adv[n], int(t[n])) > _loss(model, u[n], int(t[n])) for n in range(3))
    # one step of size ε from U is FGSM
    assert np.array_equal(pgd(model, _scale(), u, t, eps, steps=1, step_size=eps), fgsm(model, _scale(), u, t, eps))


def test_projection_is_the_nearest_point_of_the_box() -> None:
    u = np.array([0.0, 0.5, 1.0, 0.99])
    v = np.array([-0.3, 0.9, 0.8, 1.3])
    assert np.allclose(project(v, u, 0.05), [0.0, 0.55, 0.95, 1.0])


def test_attack_accuracy_and_names(case) -> None:
    model, u, t, _ = case
    clean = attack(model, _scale(), u, t, 0.0)
    model.eval()
    z = model.forward((u - MEAN[None, :, None, None]) / STD[None, :, None, None])
    assert clean.accuracy == pytest.approx(np.mean(z.argmax(axis=1) == t))
    assert attack(model, _scale(), u, t, 0.01).method == "FGSM"
    r = attack(model, _scale(), u, t, 0.01, steps=10)
    assert r.method == "PGD-10" and r.step_size == pytest.approx(0.0025)


def test_parse_eps() -> None:
    assert parse_eps("0,1/255, 2/255,0.5") == [0.0, 1 / 255, 2 / 255, 0.5]
    for bad in ("two", "1/0", "2", "-1/255"):
        with pytest.raises(ConfigError, match="--eps"):
            parse_eps(bad)
