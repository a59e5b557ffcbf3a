"""Issue 26's layer-level pieces: erf (against math.erf), GELU, the scale layer, batch-norm with γ fixed at 1,
Dirac init, label smoothing — each against naive loops written from docs/derivations.md, float64 finite
differences (≤ 1e-7) and the fused engine against the per-layer reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnncli.config import build_config
from cnncli.nn import special
from cnncli.nn.gradcheck import gradcheck
from cnncli.nn.layers import BatchNorm, Conv2D, softmax_cross_entropy
from cnncli.nn.layers_extra import GELU, Scale
from cnncli.nn.model import build_model


def _model(input_shape, layers, seed=0, dtype=np.float64):
    cfg = build_config({"seed": seed, "model": {"input_shape": list(input_shape), "layers": layers}})
    return build_model(cfg.model, seed=seed, dtype=dtype)


# ------------------------------------------------------------------------------------------------- erf

GRID = np.concatenate([np.linspace(-9.0, 9.0, 40001), np.linspace(-1e-3, 1e-3, 201),
                       [0.0, 1.0, -1.0, np.nextafter(1.0, 0.0), 26.0, -26.0, 1e-300]])


def test_erf_float64_agrees_with_math_erf_to_a_few_units_in_the_last_place() -> None:
    got, want = special.erf(GRID), np.array([math.erf(v) for v in GRID])
    assert np.max(np.abs(got - want)) <= 2e-15
    got_c, want_c = special.erfc(GRID), np.array([math.erfc(v) for v in GRID])
    tail = want_c > 0
    assert np.max(np.abs(got_c - want_c)[tail] / want_c[tail]) <= 2e-14  # relative, deep in the tail too
    assert special.erf(np.array([-0.0]))[0] == 0.0 and special.erf(np.array([40.0]))[0] == 1.0


def test_erf_float32_is_within_its_stated_bound_and_stays_float32() -> None:
    x = GRID.astype(np.float32)
    got = special.erf(x)
    assert got.dtype == np.float32
    want = np.array([math.erf(float(v)) for v in x])
    assert np.max(np.abs(got - want)) <= 6e-7
    cdf = special.normal_cdf(x)
    assert cdf.dtype == np.float32
    assert np.max(np.abs(cdf - np.array([0.5 * math.erfc(-float(v) / math.sqrt(2)) for v in x]))) <= 3e-7


@pytest.mark.parametrize("terms, depth", [(8, 300), (40, 20)])
def test_a_truncated_series_or_fraction_is_caught(terms: int, depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: too few series terms, or too shallow a continued fraction, fails the accuracy bound."""
    monkeypatch.setattr(special, "SERIES_TERMS", terms)
    monkeypatch.setattr(special, "FRACTION_DEPTH", depth)
    got, want = special.erf(GRID), np.array([math.erf(v) for v in GRID])
    assert np.max(np.abs(got - want)) > 2e-15


# ------------------------------------------------------------------------------------------------ GELU


def test_gelu_forward_and_backward_equal_the_docs_formulas_element_by_element() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5)) * 3
    layer = GELU()
    y = layer.forward(x)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    for idx in np.ndindex(*x.shape):
        v = float(x[idx])
        cdf = 0.5 * math.erfc(-v / math.sqrt(2.0))  # Φ(x) = ½(1 + erf(x/√2)), without the cancellation
        pdf = math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # φ(x)
        assert y[idx] == pytest.approx(v * cdf, rel=1e-13, abs=1e-300)
        assert dx[idx] == pytest.approx(dy[idx] * (cdf + v * pdf), rel=1e-12, abs=1e-300)
    # docs example: GELU(1) = Φ(1) = 0.841345, GELU(−1) = −0.158655, slope at 0 is ½
    one = layer.forward(np.array([[1.0, -1.0, 0.0]]))
    np.testing.assert_allclose(one, [[0.8413447460685429, -0.15865525393145707, 0.0]], rtol=1e-14)
    np.testing.assert_allclose(layer.backward(np.ones((1, 3)))[0, 2], 0.5)


def test_gelu_float32_stays_float32_and_near_float64() -> None:
    x = np.random.default_rng(4).standard_normal((64, 50)).astype(np.float32) * 4
    layer = GELU()
    y32 = layer.forward(x)
    d32 = layer.backward(np.ones_like(x))
    y64 = GELU().forward(x.astype(np.float64))
    assert y32.dtype == np.float32 and d32.dtype == np.float32
    assert np.max(np.abs(y32 - y64)) <= 4 * 3e-7 + 1e-6 * np.max(np.abs(y64))


def test_scale_layer_is_a_fixed_multiplication() -> None:
    x = np.random.default_rng(5).standard_normal((3, 10))
    layer = Scale(factor=1 / 9)
    np.testing.assert_allclose(layer.forward(x), x / 9, rtol=1e-15)
    np.testing.assert_allclose(layer.backward(np.ones_like(x)), np.full_like(x, 1 / 9), rtol=1e-15)
    with pytest.raises(ValueError, match="non-zero"):
        Scale(factor=0.0)


# ---------------------------------------------------------------------------- batch-norm without γ


def test_batchnorm_without_scale_has_only_beta_and_normalises_with_gamma_one() -> None:
    rng = np.random.default_rng(6)
    bn = BatchNorm(momentum=0.4, eps=1e-12, scale=False)
    bn.build((3, 4, 4), rng, np.float64)
    assert set(bn.params) == {"beta"} and set(bn.grads) == {"beta"}
    bn.params["beta"][:] = [0.5, -1.0, 2.0]
    x = rng.standard_normal((5, 3, 4, 4)) * 2 + 1
    y = bn.forward(x)
    for c in range(3):  # naive: the channel's 80 values, biased variance, γ = 1
        vals = [x[n, c, i, j] for n in range(5) for i in range(4) for j in range(4)]
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        for n, i, j in np.ndindex(5, 4, 4):
            want = (x[n, c, i, j] - mu) / math.sqrt(var + 1e-12) + bn.params["beta"][c]
            assert y[n, c, i, j] == pytest.approx(want, rel=1e-12, abs=1e-12)
        # the running statistics moved by the torch convention: r = 0.6·r + 0.4·batch (unbiased variance)
        assert bn.buffers["running_mean"][c] == pytest.approx(0.4 * mu, rel=1e-12)
        assert bn.buffers["running_var"][c] == pytest.approx(0.6 + 0.4 * var * 80 / 79, rel=1e-12)


AIRBENCH_SHAPED = [  # airbench's layer types, narrow: whitening-like 2×2 conv, blocks, max-pool 3, scaled logits
    {"type": "conv", "out_channels": 6, "kernel_size": 2, "init": "uniform"},
    {"type": "gelu"},
    {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1, "bias": False, "init": "uniform",
     "dirac": True},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "batchnorm", "momentum": 0.4, "eps": 1e-12, "scale": False},
    {"type": "gelu"},
    {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1, "bias": False, "init": "uniform",
     "dirac": True},
    {"type": "batchnorm", "momentum": 0.4, "eps": 1e-12, "scale": False},
    {"type": "gelu"},
    {"type": "maxpool", "kernel_size": 3},
    {"type": "flatten"},
    {"type": "linear", "out_features": 5, "bias": False, "init": "uniform"},
    {"type": "multiply", "factor": 1 / 9},
]


def _analytic(layers, seed: int = 2) -> dict[str, np.ndarray]:
    """The gradients of gradcheck's own batch (seed 0: standard-normal x, then labels), by the backward pass."""
    model = _model((3, 9, 9), layers, seed=seed)
    model.set_input_grad(True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 9, 9))
    y = rng.integers(0, 5, 4)
    dx = model.backward(softmax_cross_entropy(model.forward(x), y)[1])
    return {**{k: v.copy() for k, v in model.named_grads().items()}, "X": dx}


EPS = 5e-4  # at the default 1e-3 one entry of conv2.W (gradient 6·10⁻⁴) reads 1.7e-7: the five-point stencil's ε⁴
# truncation, 1.1e-8 at 5e-4 (16× less for half the step), so the checks below use 5e-4


def _assert_gradcheck(layers) -> list[str]:
    """Every entry of every tensor: relative error ≤ 1e-7, or — for an entry whose gradient is tiny — an absolute
    gap |a − n| ≤ 2e-12, the float64 rounding floor of the five-point difference at ε = 5e-4 (a few units of
    2⁻⁵² of L ≈ 2, times 18/12/ε); the relative error reads large there only through the 1e-8 floor of its
    denominator. Returns the tensors that needed the absolute rule."""
    results = gradcheck(_model((3, 9, 9), layers, seed=2), batch=4, max_entries=10_000, eps=EPS)
    assert all(not r.sampled for r in results)
    floor = []
    for r in results:
        if r.max_rel_error <= 1e-7:
            continue
        bad = [e for e in r.worst if e.rel_error > 1e-7]
        assert bad and bad[0].rel_error == r.max_rel_error, r.name
        for e in bad:  # the worst entries gradcheck lists
            assert abs(e.analytic - e.numeric) <= 2e-12, (r.name, e)
        floor.append(r.name)
    return floor


def test_gradcheck_of_an_airbench_shaped_network_in_float64() -> None:
    """The Dirac filters' centre taps are where the absolute rule is needed: a conv followed (through a max-pool) by
    a batch-norm is scale-invariant per filter, L(α·w_c) = L(w_c), so ∂L/∂w_c ⟂ w_c, and a Dirac filter has only
    its centre tap: the gradient there is 0 (10⁻¹⁴ in float64, ε = 1e-12 breaking the invariance). Without Dirac
    filters every parameter entry passes at ≤ 1e-7."""
    names = {r.name for r in gradcheck(_model((3, 9, 9), AIRBENCH_SHAPED, seed=2), batch=4, max_entries=5)}
    assert "bn1.beta" in names and "bn1.gamma" not in names
    # those entries are zero on both sides (below the five-point rounding): gradcheck counts them as agreeing,
    # so the whole network passes as it is, Dirac taps and all (it called them an indexing bug before)
    assert _assert_gradcheck(AIRBENCH_SHAPED) == []
    assert all(r.passed and r.status == "pass" for r in gradcheck(_model((3, 9, 9), AIRBENCH_SHAPED, seed=2),
                                                                   batch=4, max_entries=10_000, eps=EPS))
    g = _analytic(AIRBENCH_SHAPED)
    for name in ("conv2.W", "conv3.W"):
        centre = np.array([g[name][c, c, 1, 1] for c in range(min(g[name].shape[:2]))])
        assert np.abs(centre).max() < 1e-10 * np.abs(g[name]).max()  # the others: 1e-5 … 1e-2
    undirac = [dict(entry, dirac=False) if entry.get("dirac") else entry for entry in AIRBENCH_SHAPED]
    assert _assert_gradcheck(undirac) == []


def test_gradcheck_catches_a_wrong_gelu_derivative(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: GELU's backward without the x·φ(x) term (the product rule's second half) fails the check."""
    monkeypatch.setattr(GELU, "backward", lambda self, dout: dout * self._cdf)
    model = _model((3, 9, 9), AIRBENCH_SHAPED, seed=2)
    worst = max(r.max_rel_error for r in gradcheck(model, batch=4, max_entries=20))
    assert worst > 1e-3


def test_engine_matches_the_per_layer_reference_on_the_airbench_shaped_network() -> None:
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 2e-3)):
        model = _model((3, 9, 9), AIRBENCH_SHAPED, seed=2, dtype=dtype)
        model.train()
        rng = np.random.default_rng(1)
        x = rng.standard_normal((12, 3, 9, 9)).astype(dtype)
        y = rng.integers(0, 5, 12)
        buffers = {k: v.copy() for k, v in model.named_buffers().items()}
        model.fast = False
        loss_r, z_r = model.loss_and_grads(x, y, 0.2)
        grads_r = {k: v.copy() for k, v in model.named_grads().items()}
        model.load_buffers(buffers)
        model.fast = True
        loss_f, z_f = model.loss_and_grads(x, y, 0.2)
        assert loss_f == pytest.approx(loss_r, rel=rtol)
        np.testing.assert_allclose(z_f, z_r, rtol=rtol, atol=rtol * 1e-2)
        for k, g in model.named_grads().items():
            np.testing.assert_allclose(g, grads_r[k], rtol=rtol, atol=rtol * np.abs(grads_r[k]).max(), err_msg=k)


# ------------------------------------------------------------------------------------------------ Dirac


def test_dirac_filters_copy_their_channel_and_the_rest_keep_the_default_draw() -> None:
    rng = np.random.default_rng(7)
    plain = Conv2D(3, 5, 3, padding=1, rng=np.random.default_rng(1), dtype=np.float64, bias=False, init="uniform")
    dirac = Conv2D(3, 5, 3, padding=1, rng=np.random.default_rng(1), dtype=np.float64, bias=False, init="uniform",
                   dirac=True)
    np.testing.assert_array_equal(dirac.params["W"][3:], plain.params["W"][3:])
    x = rng.standard_normal((2, 3, 6, 6))
    np.testing.assert_allclose(dirac.forward(x)[:, :3], x, rtol=0, atol=0)
    w = dirac.params["W"]
    for c, cp, u, v in np.ndindex(3, 3, 3, 3):
        assert w[c, cp, u, v] == (1.0 if (c == cp and u == v == 1) else 0.0)
    # more inputs than outputs: every filter is a Dirac one, output c copies input c
    narrow = Conv2D(4, 2, 3, padding=1, rng=np.random.default_rng(1), dtype=np.float64, dirac=True, bias=False)
    np.testing.assert_array_equal(narrow.forward(np.ones((1, 4, 3, 3)) * np.arange(4)[None, :, None, None]),
                                  np.ones((1, 2, 3, 3)) * np.arange(2)[None, :, None, None])


# --------------------------------------------------------------------------------------- label smoothing


def test_label_smoothing_loss_and_gradient_against_the_naive_sum_and_finite_differences() -> None:
    rng = np.random.default_rng(8)
    z = rng.standard_normal((4, 5)) * 2
    y = np.array([0, 3, 3, 1])
    eps = 0.2
    loss, dz, _ = softmax_cross_entropy(z, y, eps)
    want = 0.0
    for n in range(4):
        norm = sum(math.exp(v) for v in z[n])
        for k in range(5):
            q = (1 - eps) * (k == y[n]) + eps / 5
            want -= q * math.log(math.exp(z[n, k]) / norm) / 4
    assert loss == pytest.approx(want, rel=1e-13)
    for n, k in np.ndindex(4, 5):
        h = 1e-6
        zp, zm = z.copy(), z.copy()
        zp[n, k] += h
        zm[n, k] -= h
        numeric = (softmax_cross_entropy(zp, y, eps)[0] - softmax_cross_entropy(zm, y, eps)[0]) / (2 * h)
        assert dz[n, k] == pytest.approx(numeric, rel=1e-7, abs=1e-10)
    # docs example: z = (2, 1, 0), label 0, ε = 0.2 -> L = 0.8·0.4076 + 0.2·(log Σe^z − mean z)
    #   = 0.8·0.4076 + 0.2·(2.4076 − 1) = 0.6076
    ex, dex, _ = softmax_cross_entropy(np.array([[2.0, 1.0, 0.0]]), np.array([0]), 0.2)
    assert ex == pytest.approx(0.607606, abs=1e-6)
    np.testing.assert_allclose(dex, [[0.6652 - 0.8 - 0.2 / 3, 0.2447 - 0.2 / 3, 0.0900 - 0.2 / 3]], atol=1e-4)
    # ε = 0 is the plain cross-entropy, bit for bit
    plain = softmax_cross_entropy(z, y)
    same = softmax_cross_entropy(z, y, 0.0)
    assert plain[0] == same[0] and np.array_equal(plain[1], same[1])


# ------------------------------------------------------------------------------------- whitening init


def test_patch_second_moments_equal_the_naive_sum_over_images_and_positions() -> None:
    from cnncli.nn.datainit import CHUNK, second_moment

    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 2, 5, 4))
    k = 2
    naive = np.zeros((8, 8))
    count = 0
    for n in range(3):
        for i in range(4):
            for j in range(3):
                p = [x[n, c, i + u, j + v] for c in range(2) for u in range(2) for v in range(2)]  # (c', u, v)
                naive += np.outer(p, p)
                count += 1
    np.testing.assert_allclose(second_moment(iter([x[:2], x[2:]]), k), naive / count, rtol=1e-13)
    assert CHUNK >= 1


def test_whitening_filters_decorrelate_the_patches_and_come_with_their_negatives() -> None:
    from cnncli.nn.datainit import second_moment, whitening_weights

    rng = np.random.default_rng(10)
    mix = rng.standard_normal((3, 3))
    x = np.einsum("cd,ndhw->nchw", mix, rng.standard_normal((20, 3, 8, 8)))  # correlated channels
    sigma = second_moment(iter([x]), 2)
    w = whitening_weights(sigma, 3, 2, 5e-4)
    assert w.shape == (24, 3, 2, 2)
    np.testing.assert_array_equal(w[12:], -w[:12])
    f = w[:12].reshape(12, -1)
    g = np.diag(f @ f.T)  # = 1/(λ + ε)
    lam = 1 / g - 5e-4
    out = f @ sigma @ f.T  # second moments of the whitened outputs
    np.testing.assert_allclose(out, np.diag(lam / (lam + 5e-4)), atol=1e-10)
    assert np.all(np.diff(lam) <= 1e-12)  # decreasing order
    np.testing.assert_allclose(f @ f.T, np.diag(g), atol=1e-9 * g.max())  # orthogonal filters


def test_whiten_needs_twice_the_patch_size_of_filters() -> None:
    from cnncli.host.errors import ConfigError

    with pytest.raises(ConfigError, match=r"whiten: a whitening init gives 2·C_in·K·K = 24 filters .* is 16"):
        _model((3, 8, 8), [{"type": "conv", "out_channels": 16, "kernel_size": 2, "whiten": 100},
                           {"type": "flatten"}, {"type": "linear", "out_features": 2}])


def test_a_deeper_whitened_conv_sees_the_layers_before_it_in_evaluation_mode() -> None:
    from cnncli.nn.datainit import initialise_from_data, second_moment, whitening_weights

    model = _model((3, 6, 6), [{"type": "conv", "out_channels": 2, "kernel_size": 1}, {"type": "batchnorm"},
                               {"type": "conv", "out_channels": 16, "kernel_size": 2, "whiten": 7},
                               {"type": "flatten"}, {"type": "linear", "out_features": 2}])
    model.train()
    x = np.random.default_rng(11).standard_normal((9, 3, 6, 6))
    before = {k: v.copy() for k, v in model.named_buffers().items()}
    assert initialise_from_data(model.layers, lambda a, b: x[a:b]) == ["conv2"]
    for k, v in model.named_buffers().items():
        np.testing.assert_array_equal(v, before[k])  # running statistics untouched
    assert all(layer.training for layer in model.layers)  # modes restored
    model.eval()
    inputs = model.layers[1].forward(model.layers[0].forward(x[:7]))
    np.testing.assert_allclose(model.layers[2].params["W"], whitening_weights(second_moment(iter([inputs]), 2),
                                                                               2, 2, 5e-4), rtol=1e-12)


# ------------------------------------------------------------------------------------------- torchbench


def test_torchbench_builds_the_airbench_layers_and_computes_the_same_logits() -> None:
    torch = pytest.importorskip("torch")
    from cnncli.bench.torchbench import build_torch_net

    cfg = build_config({"seed": 3, "model": {"input_shape": [3, 9, 9], "layers": AIRBENCH_SHAPED}})
    model = build_model(cfg.model, seed=3, dtype=np.float32)
    tnet = build_torch_net(cfg, model)
    assert "bn1.gamma" not in tnet.params and "bn1.beta" in tnet.params
    x = np.random.default_rng(4).standard_normal((6, 3, 9, 9)).astype(np.float32)
    model.train()
    tnet.net.train()
    ours = model.forward(x)
    with torch.no_grad():
        theirs = tnet.net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
