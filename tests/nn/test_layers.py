"""Layer tests against numbers derived independently of `cnncli/nn/layers.py`.

References used here, never the code under test itself:

* naive Python loops written straight from the sums of docs/derivations.md (the design article's
  notation), generalised to stride s and padding pad:
  S[c,i,j] = Σ_{c',u,v} W[c,c',u,v] · X[c', s·i+u−pad, s·j+v−pad] + b[c];  δb[c] = Σ δS[c,i,j];
  δW[c,c',u,v] = Σ_{i,j} δS[c,i,j] · X[c', s·i+u−pad, s·j+v−pad];
  δX[c',x,y] = Σ_{c,u,v} W[c,c',u,v] · δS[c,i,j]
  over the (i, j) with s·i+u−pad = x and s·j+v−pad = y (the article's gather form);
* centred finite differences of the loss (float64);
* a tiny end-to-end example whose every intermediate value and gradient was worked out by hand.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from cnncli.nn.layers import Conv2D, Flatten, Linear, MaxPool2D, ReLU, softmax, softmax_cross_entropy

TOL = 1e-10


def _as64(layer) -> None:
    for key in layer.params:
        layer.params[key] = layer.params[key].astype(np.float64)


def _rel_error(a: np.ndarray, n: np.ndarray) -> float:
    """CS231n relative error, element-wise, worst entry: |a − n| / max(1e-8, |a| + |n|)."""
    a, n = np.asarray(a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    return float(np.max(np.abs(a - n) / np.maximum(1e-8, np.abs(a) + np.abs(n))))


# ---------------------------------------------------------------------------------------------------------
# Naive references, written from the article's sums with plain Python loops over nested lists.
# ---------------------------------------------------------------------------------------------------------


def _naive_conv_forward(x, w, b, stride, pad):
    n_, c_in, h, wd = x.shape
    c_out, _, k, _ = w.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    X, W, B = x.tolist(), w.tolist(), b.tolist()
    S = np.zeros((n_, c_out, ho, wo))
    for n, c, i, j in itertools.product(range(n_), range(c_out), range(ho), range(wo)):
        total = B[c]
        for cp, u, v in itertools.product(range(c_in), range(k), range(k)):
            xx, yy = stride * i + u - pad, stride * j + v - pad
            if 0 <= xx < h and 0 <= yy < wd:  # zero padding outside the image
                total += W[c][cp][u][v] * X[n][cp][xx][yy]
        S[n, c, i, j] = total
    return S


def _naive_conv_backward(x, w, dS, stride, pad):
    n_, c_in, h, wd = x.shape
    c_out, _, k, _ = w.shape
    ho, wo = dS.shape[2:]
    X, W, D = x.tolist(), w.tolist(), dS.tolist()
    db = np.zeros(c_out)
    for c in range(c_out):
        db[c] = sum(D[n][c][i][j] for n in range(n_) for i in range(ho) for j in range(wo))
    dW = np.zeros(w.shape)
    for c, cp, u, v in itertools.product(range(c_out), range(c_in), range(k), range(k)):
        total = 0.0
        for n, i, j in itertools.product(range(n_), range(ho), range(wo)):
            xx, yy = stride * i + u - pad, stride * j + v - pad
            if 0 <= xx < h and 0 <= yy < wd:
                total += D[n][c][i][j] * X[n][cp][xx][yy]
        dW[c, cp, u, v] = total
    dX = np.zeros(x.shape)
    for n, cp, xx, yy in itertools.product(range(n_), range(c_in), range(h), range(wd)):
        total = 0.0
        for c, u, v in itertools.product(range(c_out), range(k), range(k)):
            # the output (i, j) whose window puts kernel offset (u, v) on input pixel (xx, yy)
            ti, tj = xx + pad - u, yy + pad - v
            if ti % stride or tj % stride:
                continue
            i, j = ti // stride, tj // stride
            if 0 <= i < ho and 0 <= j < wo:
                total += W[c][cp][u][v] * D[n][c][i][j]
        dX[n, cp, xx, yy] = total
    return dX, dW, db


def _naive_pool(a, k, stride, dout=None):
    """Forward max over each window; with dout, route each window's gradient to its first strict maximum."""
    n_, c_, h, wd = a.shape
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    A = a.tolist()
    P = np.zeros((n_, c_, ho, wo))
    dA = np.zeros(a.shape)
    for n, c, p, q in itertools.product(range(n_), range(c_), range(ho), range(wo)):
        best, pos = None, None
        for u, v in itertools.product(range(k), range(k)):  # row-major: u, then v
            val = A[n][c][stride * p + u][stride * q + v]
            if best is None or val > best:
                best, pos = val, (stride * p + u, stride * q + v)
        P[n, c, p, q] = best
        if dout is not None:
            dA[n, c, pos[0], pos[1]] += dout[n, c, p, q]
    return P, dA


# ---------------------------------------------------------------------------------------------------------
# 1. Conv2D
# ---------------------------------------------------------------------------------------------------------

CONV_CASES = [
    # (C_in, C_out, K, stride, padding, H, W, N)
    (1, 1, 3, 1, 0, 5, 5, 1),
    (3, 4, 3, 1, 1, 6, 7, 2),  # the article's conv: K=3, stride 1, pad 1; non-square input
    (2, 3, 3, 2, 0, 8, 9, 2),  # stride 2, the last row of the 8 is covered by no window
    (2, 3, 3, 2, 2, 5, 6, 2),  # stride 2, padding 2
    (2, 2, 1, 1, 0, 4, 5, 2),  # K=1
    (1, 2, 5, 1, 2, 6, 5, 1),  # K=5, padding 2 ("same")
    (3, 2, 5, 2, 1, 9, 8, 1),  # K=5, stride 2, padding 1
    (2, 3, 2, 1, 0, 5, 4, 2),  # even kernel
    (2, 2, 4, 3, 1, 10, 7, 1),  # stride 3
]


def _make_conv(c_in, c_out, k, s, p, seed=0):
    rng = np.random.default_rng(seed)
    conv = Conv2D(c_in, c_out, k, stride=s, padding=p, rng=rng, dtype=np.float64)
    conv.params["b"] = rng.standard_normal(c_out)  # non-zero bias, so that δb and b + ... are exercised
    return conv, rng


@pytest.mark.parametrize("c_in,c_out,k,s,p,h,w,n", CONV_CASES)
def test_conv_forward_backward_match_naive_loops(c_in, c_out, k, s, p, h, w, n):
    conv, rng = _make_conv(c_in, c_out, k, s, p, seed=c_in * 100 + k * 10 + s)
    x = rng.standard_normal((n, c_in, h, w))
    S = conv.forward(x)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    assert S.shape == (n, c_out, ho, wo)
    assert S.dtype == np.float64
    np.testing.assert_allclose(
        S, _naive_conv_forward(x, conv.params["W"], conv.params["b"], s, p), rtol=0, atol=TOL
    )

    dS = rng.standard_normal(S.shape)
    dX = conv.backward(dS)
    ref_dX, ref_dW, ref_db = _naive_conv_backward(x, conv.params["W"], dS, s, p)
    assert dX.shape == x.shape and dX.dtype == np.float64
    assert conv.grads["W"].shape == conv.params["W"].shape
    assert conv.grads["b"].shape == conv.params["b"].shape
    np.testing.assert_allclose(conv.grads["b"], ref_db, rtol=0, atol=TOL)
    np.testing.assert_allclose(conv.grads["W"], ref_dW, rtol=0, atol=TOL)
    np.testing.assert_allclose(dX, ref_dX, rtol=0, atol=TOL)


def test_conv_single_pixel_hand_example():
    # One 3×3 kernel with distinct entries over a 3×3 image that is 1 at its centre only, pad 1:
    # S[i,j] = W[1−i+1, 1−j+1] + b, i.e. the kernel flipped (cross-correlation, not convolution).
    conv = Conv2D(1, 1, 3, padding=1, dtype=np.float64)
    conv.params["W"] = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    conv.params["b"] = np.array([0.5])
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0
    S = conv.forward(x)
    expected = np.array([[9, 8, 7], [6, 5, 4], [3, 2, 1]]) + 0.5
    np.testing.assert_array_equal(S[0, 0], expected)
    # δS = 1 at (0, 0) only: that output's window covers X[-1..1, -1..1]; δX[x,y] = W[x+1, y+1] on the image
    dS = np.zeros((1, 1, 3, 3))
    dS[0, 0, 0, 0] = 1.0
    dX = conv.backward(dS)
    np.testing.assert_array_equal(dX[0, 0], [[5, 6, 0], [8, 9, 0], [0, 0, 0]])
    # δW[u,v] = X[u−1, v−1]: only the centre pixel is 1, under kernel offset (2, 2)
    np.testing.assert_array_equal(conv.grads["W"][0, 0], [[0, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(conv.grads["b"], [1.0])


def test_conv_float32_in_float32_out():
    rng = np.random.default_rng(1)
    conv = Conv2D(3, 4, 3, stride=1, padding=1, rng=rng)  # float32 by default
    assert conv.params["W"].dtype == np.float32 and conv.params["b"].dtype == np.float32
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    S = conv.forward(x)
    assert S.dtype == np.float32
    dS = rng.standard_normal(S.shape).astype(np.float32)
    dX = conv.backward(dS)
    assert dX.dtype == np.float32
    assert conv.grads["W"].dtype == np.float32 and conv.grads["b"].dtype == np.float32
    # and the float32 numbers still agree with the float64 naive reference to float32 precision
    W64, b64, x64, dS64 = (a.astype(np.float64) for a in (conv.params["W"], conv.params["b"], x, dS))
    np.testing.assert_allclose(S, _naive_conv_forward(x64, W64, b64, 1, 1), rtol=1e-4, atol=1e-5)
    ref_dX, ref_dW, ref_db = _naive_conv_backward(x64, W64, dS64, 1, 1)
    np.testing.assert_allclose(dX, ref_dX, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(conv.grads["W"], ref_dW, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(conv.grads["b"], ref_db, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c_in,c_out,k,s,p,h,w,n", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[6]])
def test_conv_without_input_grad_returns_none_but_fills_grads(c_in, c_out, k, s, p, h, w, n):
    conv, rng = _make_conv(c_in, c_out, k, s, p, seed=7)
    conv.needs_input_grad = False
    x = rng.standard_normal((n, c_in, h, w))
    S = conv.forward(x)
    dS = rng.standard_normal(S.shape)
    assert conv.backward(dS) is None
    _, ref_dW, ref_db = _naive_conv_backward(x, conv.params["W"], dS, s, p)
    np.testing.assert_allclose(conv.grads["W"], ref_dW, rtol=0, atol=TOL)
    np.testing.assert_allclose(conv.grads["b"], ref_db, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# 2. ReLU
# ---------------------------------------------------------------------------------------------------------


def test_relu_forward_backward_mask():
    S = np.array([[[[-2.0, -0.0, 0.0, 1e-300], [3.5, -1e-300, 7.0, -4.0]]]])
    dA = np.array([[[[10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]]]])
    relu = ReLU()
    A = relu.forward(S)
    np.testing.assert_array_equal(A, [[[[0, 0, 0, 1e-300], [3.5, 0, 7.0, 0]]]])
    dS = relu.backward(dA)
    # δS = δA · 1(S > 0): zero at S = 0 exactly (and at −0.0), passed through at any positive S
    np.testing.assert_array_equal(dS, [[[[0, 0, 0, 40.0], [50.0, 0, 70.0, 0]]]])


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7)])
def test_relu_matches_elementwise_loop(shape):
    rng = np.random.default_rng(3)
    S = rng.standard_normal(shape)
    S.flat[::5] = 0.0  # exact zeros: gradient 0 there
    dA = rng.standard_normal(shape)
    relu = ReLU()
    A, dS = relu.forward(S), relu.backward(dA)
    for idx in np.ndindex(*shape):
        s = float(S[idx])
        assert A[idx] == (s if s > 0 else 0.0)
        assert dS[idx] == (float(dA[idx]) if s > 0 else 0.0)


# ---------------------------------------------------------------------------------------------------------
# 3. MaxPool2D
# ---------------------------------------------------------------------------------------------------------

POOL_CASES = [
    # (K, stride, H, W)
    (2, 2, 4, 4),
    (2, 2, 5, 7),  # odd sizes: last row and column dropped
    (3, 2, 7, 7),  # overlapping windows
    (3, 2, 6, 9),  # overlapping, last row dropped
    (3, 3, 7, 8),
    (2, 1, 4, 5),  # stride 1: heavy overlap
    (3, 1, 5, 5),
]


@pytest.mark.parametrize("k,s,h,w", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_forward_backward_match_naive_loops(k, s, h, w, ties):
    rng = np.random.default_rng(k * 100 + s * 10 + h)
    a = rng.integers(0, 3, (2, 3, h, w)).astype(np.float64) if ties else rng.standard_normal((2, 3, h, w))
    pool = MaxPool2D(k, s)
    P = pool.forward(a)
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    assert P.shape == (2, 3, ho, wo)
    dP = rng.standard_normal(P.shape)
    ref_P, ref_dA = _naive_pool(a, k, s, dP)
    np.testing.assert_array_equal(P, ref_P)
    np.testing.assert_allclose(pool.backward(dP), ref_dA, rtol=0, atol=TOL)


TIE_WINDOWS_2 = [
    # (window, (u, v) that must receive the gradient)
    ([[5, 5], [5, 5]], (0, 0)),  # all equal: the first
    ([[1, 3], [3, 1]], (0, 1)),  # two maxima on the anti-diagonal: the first in row-major order
    ([[4, 1], [1, 4]], (0, 0)),  # two maxima on the diagonal
    ([[1, 2], [3, 3]], (1, 0)),  # tie in the bottom row
    ([[2, 7], [1, 7]], (0, 1)),  # tie in the right column
    ([[6, 2], [6, 1]], (0, 0)),  # tie in the left column
    ([[0, 2], [2, 2]], (0, 1)),  # three equal maxima
    ([[-3, -1], [-2, -1]], (0, 1)),  # negative values
    ([[0, 0], [0, 0]], (0, 0)),  # all zero, as after ReLU on a negative patch
    ([[1, 2], [3, 4]], (1, 1)),  # no tie
]


@pytest.mark.parametrize("window,pos", TIE_WINDOWS_2)
def test_maxpool_ties_go_to_first_in_row_major_order(window, pos):
    # Two windows side by side: the hand-built one, and its 180° rotation
    win = np.array(window, dtype=np.float64)
    a = np.concatenate([win, win[::-1, ::-1]], axis=1)[None, None]  # (1, 1, 2, 4)
    pool = MaxPool2D(2, 2)
    P = pool.forward(a)
    np.testing.assert_array_equal(P[0, 0, 0], [win.max(), win.max()])
    dA = pool.backward(np.array([[[[3.0, 5.0]]]]))
    expected = np.zeros((2, 4))
    expected[pos] = 3.0
    # rotated window: its first maximum in row-major order, found by scanning by hand
    rot = win[::-1, ::-1]
    first = next((u, v) for u in range(2) for v in range(2) if rot[u, v] == rot.max())
    expected[first[0], 2 + first[1]] = 5.0
    np.testing.assert_array_equal(dA[0, 0], expected)
    assert np.count_nonzero(dA) == 2


@pytest.mark.parametrize(
    "window,pos",
    [
        ([[1, 1, 1], [1, 1, 1], [1, 1, 1]], (0, 0)),
        ([[0, 9, 0], [0, 0, 9], [9, 0, 0]], (0, 1)),
        ([[0, 1, 0], [2, 0, 2], [2, 0, 0]], (1, 0)),
        ([[0, 1, 0], [0, 1, 2], [0, 0, 2]], (1, 2)),
        ([[0, 1, 0], [0, 1, 0], [3, 0, 3]], (2, 0)),
    ],
)
def test_maxpool_ties_kernel3(window, pos):
    a = np.array(window, dtype=np.float64)[None, None]
    pool = MaxPool2D(3, 3)
    pool.forward(a)
    dA = pool.backward(np.array([[[[2.5]]]]))
    expected = np.zeros((3, 3))
    expected[pos] = 2.5
    np.testing.assert_array_equal(dA[0, 0], expected)


def test_maxpool_overlapping_windows_add_gradients():
    # K=3, stride 2 on a 3×5 map: windows cover columns 0..2 and 2..4, sharing column 2.
    # The 9 at (0, 2) is the unique maximum of both windows, so it receives 2 + 3 = 5.
    a = np.array([[1, 0, 9, 0, 1], [0, 2, 0, 2, 0], [1, 0, 3, 0, 1]], dtype=np.float64)[None, None]
    pool = MaxPool2D(3, 2)
    P = pool.forward(a)
    np.testing.assert_array_equal(P, [[[[9, 9]]]])
    dA = pool.backward(np.array([[[[2.0, 3.0]]]]))
    expected = np.zeros((3, 5))
    expected[0, 2] = 5.0
    np.testing.assert_array_equal(dA[0, 0], expected)
    # and when the windows' maxima differ, each gets its own share
    a2 = np.array([[1, 0, 4, 0, 1], [0, 6, 0, 7, 0], [1, 0, 3, 0, 1]], dtype=np.float64)[None, None]
    pool.forward(a2)
    dA2 = pool.backward(np.array([[[[2.0, 3.0]]]]))
    expected2 = np.zeros((3, 5))
    expected2[1, 1], expected2[1, 3] = 2.0, 3.0
    np.testing.assert_array_equal(dA2[0, 0], expected2)


@pytest.mark.parametrize("k,s,h,w", [(2, 2, 5, 7), (3, 2, 6, 8), (3, 3, 8, 10), (2, 2, 3, 3)])
def test_maxpool_odd_sizes_drop_uncovered_rows_and_columns(k, s, h, w):
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    a = np.zeros((1, 2, h, w))
    # make the uncovered rows/columns the largest values: they must be ignored, not pooled
    last_row, last_col = s * (ho - 1) + k, s * (wo - 1) + k  # first row/column no window covers
    assert last_row < h or last_col < w
    a[:, :, last_row:, :] = 100.0
    a[:, :, :, last_col:] = 100.0
    rng = np.random.default_rng(5)
    a[:, :, :last_row, :last_col] = rng.standard_normal((1, 2, last_row, last_col))
    pool = MaxPool2D(k, s)
    P = pool.forward(a)
    assert P.shape == (1, 2, ho, wo)
    assert pool.output_shape((2, h, w)) == (2, ho, wo)
    assert np.all(P < 100.0)
    dA = pool.backward(np.ones(P.shape))
    assert np.all(dA[:, :, last_row:, :] == 0)
    assert np.all(dA[:, :, :, last_col:] == 0)


@pytest.mark.parametrize("k,h,w", [(2, 6, 8), (2, 7, 9), (3, 9, 6)])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_one_nonzero_per_window(k, h, w, ties):
    rng = np.random.default_rng(11)
    a = rng.integers(0, 2, (3, 2, h, w)).astype(np.float64) if ties else rng.standard_normal((3, 2, h, w))
    pool = MaxPool2D(k, k)  # non-overlapping
    P = pool.forward(a)
    dP = rng.uniform(1.0, 2.0, P.shape) * rng.choice([-1.0, 1.0], P.shape)  # all non-zero
    dA = pool.backward(dP)
    assert np.count_nonzero(dA) == P.size
    # and each window holds exactly one non-zero, equal to its δP
    for n, c, p, q in itertools.product(*(range(d) for d in P.shape)):
        block = dA[n, c, k * p : k * p + k, k * q : k * q + k]
        assert np.count_nonzero(block) == 1
        assert block.sum() == dP[n, c, p, q]


# ---------------------------------------------------------------------------------------------------------
# 4. Flatten
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (3, 2, 3, 5)])
def test_flatten_index_formula_and_inverse(shape):
    n_, c_, h, w = shape
    rng = np.random.default_rng(2)
    P = rng.standard_normal(shape)
    flat = Flatten()
    hvec = flat.forward(P)
    assert hvec.shape == (n_, c_ * h * w)
    dh = rng.standard_normal(hvec.shape)
    dP = flat.backward(dh)
    assert dP.shape == shape
    for n, c, i, j in itertools.product(range(n_), range(c_), range(h), range(w)):
        k = c * h * w + i * w + j  # the article: k = c·16·16 + i·16 + j for (16, 16, 16)
        assert hvec[n, k] == P[n, c, i, j]
        assert dP[n, c, i, j] == dh[n, k]


def test_flatten_article_example_indices():
    P = np.zeros((1, 16, 16, 16))
    P[0, 3, 5, 7] = 1.0
    P[0, 15, 15, 15] = 2.0
    hvec = Flatten().forward(P)
    assert hvec[0, 3 * 256 + 5 * 16 + 7] == 1.0  # = 855
    assert hvec[0, 4095] == 2.0
    assert np.count_nonzero(hvec) == 2


# ---------------------------------------------------------------------------------------------------------
# 5. Linear
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,fin,fout", [(1, 4, 3), (3, 7, 5), (2, 16, 10)])
def test_linear_forward_backward_match_naive_loops(n, fin, fout):
    rng = np.random.default_rng(fin)
    fc = Linear(fin, fout, rng=rng, dtype=np.float64)
    fc.params["b"] = rng.standard_normal(fout)
    h = rng.standard_normal((n, fin))
    z = fc.forward(h)
    W, b, H = fc.params["W"].tolist(), fc.params["b"].tolist(), h.tolist()
    ref_z = [[sum(W[i][k] * H[m][k] for k in range(fin)) + b[i] for i in range(fout)] for m in range(n)]
    np.testing.assert_allclose(z, ref_z, rtol=0, atol=TOL)

    dz = rng.standard_normal(z.shape)
    dh = fc.backward(dz)
    D = dz.tolist()
    ref_dW = [[sum(D[m][i] * H[m][k] for m in range(n)) for k in range(fin)] for i in range(fout)]
    ref_db = [sum(D[m][i] for m in range(n)) for i in range(fout)]
    ref_dh = [[sum(W[i][k] * D[m][i] for i in range(fout)) for k in range(fin)] for m in range(n)]
    np.testing.assert_allclose(fc.grads["W"], ref_dW, rtol=0, atol=TOL)
    np.testing.assert_allclose(fc.grads["b"], ref_db, rtol=0, atol=TOL)
    np.testing.assert_allclose(dh, ref_dh, rtol=0, atol=TOL)


def test_linear_without_input_grad_returns_none():
    rng = np.random.default_rng(4)
    fc = Linear(5, 3, rng=rng, dtype=np.float64)
    fc.needs_input_grad = False
    h = rng.standard_normal((2, 5))
    fc.forward(h)
    dz = rng.standard_normal((2, 3))
    assert fc.backward(dz) is None
    H, D = h.tolist(), dz.tolist()
    ref_dW = [[D[0][i] * H[0][k] + D[1][i] * H[1][k] for k in range(5)] for i in range(3)]
    np.testing.assert_allclose(fc.grads["W"], ref_dW, rtol=0, atol=TOL)
    np.testing.assert_allclose(fc.grads["b"], [D[0][i] + D[1][i] for i in range(3)], rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# 6. softmax and cross-entropy
# ---------------------------------------------------------------------------------------------------------


def test_softmax_matches_math_exp():
    z = np.array([[1.0, 2.0, 0.0], [-3.0, 0.5, 0.5], [10.0, -10.0, 4.0]])
    p = softmax(z)
    for row in range(3):
        denom = sum(math.exp(v) for v in z[row])
        for i in range(3):
            assert p[row, i] == pytest.approx(math.exp(z[row, i]) / denom, rel=1e-14, abs=1e-300)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_softmax_cross_entropy_loss_and_gradient_match_direct_formula():
    rng = np.random.default_rng(6)
    z = rng.standard_normal((4, 5)) * 3
    y = np.array([0, 4, 2, 2])
    loss, dz, p = softmax_cross_entropy(z, y)
    assert isinstance(loss, float)
    per_row = []
    ref_p = np.zeros_like(z)
    for n in range(4):
        denom = sum(math.exp(v) for v in z[n])
        ref_p[n] = [math.exp(v) / denom for v in z[n]]
        per_row.append(-math.log(math.exp(z[n, y[n]]) / denom))
    assert loss == pytest.approx(sum(per_row) / 4, rel=1e-13)
    np.testing.assert_allclose(p, ref_p, rtol=1e-13, atol=0)
    ref_dz = ref_p.copy()
    for n in range(4):
        ref_dz[n, y[n]] -= 1.0
    np.testing.assert_allclose(dz, ref_dz / 4, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n,k", [(1, 3), (3, 5), (4, 10)])
def test_softmax_cross_entropy_gradient_matches_finite_differences(n, k):
    rng = np.random.default_rng(n * 10 + k)
    z = rng.standard_normal((n, k)) * 2
    y = rng.integers(0, k, n)
    _, dz, _ = softmax_cross_entropy(z, y)
    eps = 1e-5  # a smaller step lets rounding in the loss (~1e-16 / eps) dominate the small entries
    num = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        num[idx] = (softmax_cross_entropy(zp, y)[0] - softmax_cross_entropy(zm, y)[0]) / (2 * eps)
    assert _rel_error(dz, num) < 1e-6


def test_softmax_cross_entropy_stable_for_huge_logits():
    z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0], [1000.0, 1000.0, -1000.0]])
    # exp(−2000) underflowing to 0 is expected and silent (NumPy's default); overflow, 0/0 or log(0) are not
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        loss_bad, dz_bad, p_bad = softmax_cross_entropy(z, np.array([1, 0, 2]))
        loss_good, dz_good, p_good = softmax_cross_entropy(z, np.array([0, 2, 1]))
        p_direct = softmax(z)
    for arr in (dz_bad, p_bad, dz_good, p_good, p_direct):
        assert np.all(np.isfinite(arr))
    # wrong labels: −log p_y = logsumexp(z) − z_y = 1000 − (−1000) = 2000 in all three rows (up to log 2 in
    # the last: logsumexp = 1000 + log 2)
    assert loss_bad == pytest.approx((2000.0 + 2000.0 + 2000.0 + math.log(2)) / 3, rel=1e-12)
    # right labels: 0, 0 and log 2 (two equal maxima)
    assert loss_good == pytest.approx(math.log(2) / 3, rel=1e-12)
    np.testing.assert_allclose(p_good, [[1, 0, 0], [0, 0, 1], [0.5, 0.5, 0]], rtol=0, atol=1e-300)
    np.testing.assert_allclose(dz_good, [[0, 0, 0], [0, 0, 0], [0.5 / 3, -0.5 / 3, 0]], rtol=0, atol=1e-16)


# ---------------------------------------------------------------------------------------------------------
# dtype is kept by every layer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layer_keeps_the_input_dtype(dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    layers = [
        Conv2D(3, 4, 3, padding=1, rng=rng, dtype=dtype),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Linear(36, 5, rng=rng, dtype=dtype),
    ]
    out = x
    for layer in layers:
        out = layer.forward(out)
        assert out.dtype == dtype, layer.kind
    loss, dz, p = softmax_cross_entropy(out, np.array([1, 3]))
    assert dz.dtype == dtype and p.dtype == dtype and math.isfinite(loss)
    grad = dz
    for layer in reversed(layers):
        grad = layer.backward(grad)
        assert grad.dtype == dtype, layer.kind
        for g in layer.grads.values():
            assert g.dtype == dtype, layer.kind


# ---------------------------------------------------------------------------------------------------------
# 7. Tiny end-to-end example worked out by hand
# ---------------------------------------------------------------------------------------------------------


def test_tiny_network_by_hand():
    X = np.array(
        [
            [1, 2, 0, 1, 3],
            [0, 1, 2, 1, 0],
            [2, 0, 1, 3, 2],
            [1, 1, 2, 2, 2],
            [2, 0, 1, 0, 2],
        ],
        dtype=np.float64,
    )[None, None]  # (1, 1, 5, 5)
    conv = Conv2D(1, 1, 2, dtype=np.float64)
    conv.params["W"] = np.array([[[[1.0, -1.0], [2.0, 1.0]]]])
    conv.params["b"] = np.array([-1.0])
    relu, pool, flat = ReLU(), MaxPool2D(2, 2), Flatten()
    fc = Linear(4, 3, dtype=np.float64)
    fc.params["W"] = np.array([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0], [0.0, -1.0, 1.0, 1.0]])
    fc.params["b"] = np.array([0.0, 0.0, -2.0])
    y = np.array([0])

    # ---- forward ----
    # S[i,j] = X[i,j] − X[i,j+1] + 2·X[i+1,j] + X[i+1,j+1] − 1
    #   row 0: 1−2+0+1−1 = −1 | 2−0+2+2−1 = 5 | 0−1+4+1−1 = 3 | 1−3+2+0−1 = −1
    #   row 1: 0−1+4+0−1 = 2  | 1−2+0+1−1 = −1 | 2−1+2+3−1 = 5 | 1−0+6+2−1 = 8
    #   row 2: 2−0+2+1−1 = 4  | 0−1+2+2−1 = 2 | 1−3+4+2−1 = 3 | 3−2+4+2−1 = 6
    #   row 3: 1−1+4+0−1 = 3  | 1−2+0+1−1 = −1 | 2−2+2+0−1 = 1 | 2−2+0+2−1 = 1
    S_exp = [[-1, 5, 3, -1], [2, -1, 5, 8], [4, 2, 3, 6], [3, -1, 1, 1]]
    A_exp = [[0, 5, 3, 0], [2, 0, 5, 8], [4, 2, 3, 6], [3, 0, 1, 1]]
    # windows: {0,5,2,0} -> 5 at (0,1);  {3,0,5,8} -> 8 at (1,3);
    #          {4,2,3,0} -> 4 at (2,0);  {3,6,1,1} -> 6 at (2,3)   (unique maxima, no ties)
    P_exp = [[5, 8], [4, 6]]
    h_exp = [5, 8, 4, 6]
    # z0 = 5 − 4 + 0 = 1;  z1 = 8 − 6 + 0 = 2;  z2 = −8 + 4 + 6 − 2 = 0
    z_exp = [1, 2, 0]
    denom = math.e + math.e**2 + 1.0
    p0, p1, p2 = math.e / denom, math.e**2 / denom, 1.0 / denom
    loss_exp = math.log(denom) - 1.0  # −log p0 = log(e + e² + 1) − z0

    S = conv.forward(X)
    np.testing.assert_array_equal(S[0, 0], S_exp)
    A = relu.forward(S)
    np.testing.assert_array_equal(A[0, 0], A_exp)
    P = pool.forward(A)
    np.testing.assert_array_equal(P[0, 0], P_exp)
    h = flat.forward(P)
    np.testing.assert_array_equal(h, [h_exp])
    z = fc.forward(h)
    np.testing.assert_array_equal(z, [z_exp])
    loss, dz, p = softmax_cross_entropy(z, y)
    np.testing.assert_allclose(p, [[p0, p1, p2]], rtol=1e-14)
    assert loss == pytest.approx(loss_exp, rel=1e-14)

    # ---- backward ----
    # δz = p − onehot(0) (N = 1)
    d0, d1, d2 = p0 - 1.0, p1, p2
    np.testing.assert_allclose(dz, [[d0, d1, d2]], rtol=0, atol=1e-15)
    dh = fc.backward(dz)
    # δW_fc[i,k] = δz_i · h_k with h = (5, 8, 4, 6);  δb_fc = δz
    np.testing.assert_allclose(
        fc.grads["W"],
        [
            [5 * d0, 8 * d0, 4 * d0, 6 * d0],
            [5 * d1, 8 * d1, 4 * d1, 6 * d1],
            [5 * d2, 8 * d2, 4 * d2, 6 * d2],
        ],
        rtol=0,
        atol=1e-14,
    )
    np.testing.assert_allclose(fc.grads["b"], [d0, d1, d2], rtol=0, atol=1e-15)
    # δh_k = Σ_i W_fc[i,k] δz_i:  k=0: d0;  k=1: d1 − d2;  k=2: −d0 + d2;  k=3: −d1 + d2
    g0, g1, g2, g3 = d0, d1 - d2, -d0 + d2, -d1 + d2
    np.testing.assert_allclose(dh, [[g0, g1, g2, g3]], rtol=0, atol=1e-15)
    dP = flat.backward(dh)
    np.testing.assert_allclose(dP[0, 0], [[g0, g1], [g2, g3]], rtol=0, atol=1e-15)
    dA = pool.backward(dP)
    # each window's gradient goes to its arg-max: (0,1), (1,3), (2,0), (2,3)
    dA_exp = [[0, g0, 0, 0], [0, 0, 0, g1], [g2, 0, 0, g3], [0, 0, 0, 0]]
    np.testing.assert_allclose(dA[0, 0], dA_exp, rtol=0, atol=1e-15)
    dS = relu.backward(dA)
    # S = 5, 8, 4, 6 > 0 at those four positions: the mask lets all of them through
    np.testing.assert_allclose(dS[0, 0], dA_exp, rtol=0, atol=1e-15)
    dX = conv.backward(dS)
    # δb = g0 + g1 + g2 + g3 = d0 + (d1 − d2) + (−d0 + d2) + (−d1 + d2) = d2
    np.testing.assert_allclose(conv.grads["b"], [d2], rtol=0, atol=1e-15)
    # δW[u,v] = g0·X[0+u,1+v] + g1·X[1+u,3+v] + g2·X[2+u,0+v] + g3·X[2+u,3+v]
    #   (0,0): X[0,1]=2, X[1,3]=1, X[2,0]=2, X[2,3]=3  -> 2g0 + g1 + 2g2 + 3g3
    #   (0,1): X[0,2]=0, X[1,4]=0, X[2,1]=0, X[2,4]=2  -> 2g3
    #   (1,0): X[1,1]=1, X[2,3]=3, X[3,0]=1, X[3,3]=2  -> g0 + 3g1 + g2 + 2g3
    #   (1,1): X[1,2]=2, X[2,4]=2, X[3,1]=1, X[3,4]=2  -> 2g0 + 2g1 + g2 + 2g3
    dW_exp = [
        [2 * g0 + g1 + 2 * g2 + 3 * g3, 2 * g3],
        [g0 + 3 * g1 + g2 + 2 * g3, 2 * g0 + 2 * g1 + g2 + 2 * g3],
    ]
    np.testing.assert_allclose(conv.grads["W"][0, 0], dW_exp, rtol=0, atol=1e-14)
    # δX: each δS[i,j] = g spreads as W·g over X[i..i+1, j..j+1], i.e. (+g, −g / +2g, +g):
    #   g0 at (0,1) -> X[0,1] += g0, X[0,2] −= g0, X[1,1] += 2g0, X[1,2] += g0
    #   g1 at (1,3) -> X[1,3] += g1, X[1,4] −= g1, X[2,3] += 2g1, X[2,4] += g1
    #   g2 at (2,0) -> X[2,0] += g2, X[2,1] −= g2, X[3,0] += 2g2, X[3,1] += g2
    #   g3 at (2,3) -> X[2,3] += g3, X[2,4] −= g3, X[3,3] += 2g3, X[3,4] += g3
    dX_exp = [
        [0, g0, -g0, 0, 0],
        [0, 2 * g0, g0, g1, -g1],
        [g2, -g2, 0, 2 * g1 + g3, g1 - g3],
        [2 * g2, g2, 0, 2 * g3, g3],
        [0, 0, 0, 0, 0],
    ]
    np.testing.assert_allclose(dX[0, 0], dX_exp, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# 8. Full-chain finite-difference check
# ---------------------------------------------------------------------------------------------------------

MARGIN = 1e-3  # distance kept from every ReLU kink and pooling tie; the FD step is 1e-5
EPS = 1e-5


def _build_chain(seed):
    rng = np.random.default_rng(seed)
    conv1 = Conv2D(2, 3, 3, stride=1, padding=1, name="conv1", rng=rng, dtype=np.float64)
    conv2 = Conv2D(3, 4, 3, stride=2, padding=1, name="conv2", rng=rng, dtype=np.float64)
    fc = Linear(4 * 2 * 2, 5, rng=rng, dtype=np.float64)
    for layer in (conv1, conv2, fc):
        layer.params["b"] = 0.1 * rng.standard_normal(layer.params["b"].shape)
    layers = [conv1, ReLU(), MaxPool2D(2, 2), conv2, ReLU(), Flatten(), fc]
    x = rng.standard_normal((2, 2, 8, 8))
    y = np.array([1, 3])
    return layers, x, y


def _windows(a):
    """(N, C, H, W) -> (N·C·H/2·W/2, 4): the 2×2 pooling windows, entries in row-major order."""
    n_, c_, h, w = a.shape
    return a.reshape(n_, c_, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(-1, 4)


def _chain_forward(layers, x, y):
    """Loss, δz, and the piecewise-linear pattern: the ReLU masks and every pooling window's arg-max."""
    out, pattern, margins = x, [], []
    for layer in layers:
        if isinstance(layer, ReLU):
            pattern.append(out > 0)
            margins.append(np.min(np.abs(out)))
        if isinstance(layer, MaxPool2D):
            win = _windows(out)
            pattern.append(np.argmax(win, axis=1))
            top2 = np.sort(win, axis=1)[:, -2:]
            # a tie matters only when the max is positive (an all-zero window after ReLU stays all-zero)
            gaps = np.where(top2[:, 1] > 0, top2[:, 1] - top2[:, 0], np.inf)
            margins.append(np.min(gaps))
        out = layer.forward(out)
    loss, dz, _ = softmax_cross_entropy(out, y)
    return loss, dz, pattern, min(margins)


def _same_pattern(p, q) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(p, q, strict=True))


def test_full_chain_matches_finite_differences():
    for seed in range(50):
        layers, x, y = _build_chain(seed)
        _, dz, base_pattern, margin = _chain_forward(layers, x, y)
        if margin > MARGIN:
            break
    else:  # pragma: no cover
        pytest.fail("no seed kept the inputs away from ReLU kinks and pooling ties")

    grad = dz
    for layer in reversed(layers):
        grad = layer.backward(grad)
    analytic = {("x", ""): grad}
    for layer in layers:
        for key, g in layer.grads.items():
            analytic[(layer.name, key)] = g.copy()

    def loss_at() -> float:
        loss, _, pattern, _ = _chain_forward(layers, x, y)
        # the step must not cross a kink, or the difference quotient is not the derivative
        assert _same_pattern(pattern, base_pattern)
        return loss

    targets = [(("x", ""), x)]
    targets += [((layer.name, key), layer.params[key]) for layer in layers for key in layer.params]
    assert len(targets) == 7  # x, conv1 W/b, conv2 W/b, fc W/b
    for label, arr in targets:
        num = np.zeros_like(arr)
        for idx in np.ndindex(*arr.shape):
            old = arr[idx]
            arr[idx] = old + EPS
            lp = loss_at()
            arr[idx] = old - EPS
            lm = loss_at()
            arr[idx] = old
            num[idx] = (lp - lm) / (2 * EPS)
        assert analytic[label].shape == arr.shape, label
        err = _rel_error(analytic[label], num)
        assert err < 1e-6, (label, err)


def test_max_pool_windows_larger_than_16_by_16_route_to_the_right_offset() -> None:
    # offsets u·K + v reach K² − 1 = 288 for K = 17: more than a byte holds
    from cnncli.nn.layers import MaxPool2D

    x = np.zeros((1, 1, 17, 17))
    x[0, 0, 16, 15] = 1.0  # offset 16·17 + 15 = 287
    pool = MaxPool2D(kernel_size=17)
    assert pool.forward(x)[0, 0, 0, 0] == 1.0
    dx = pool.backward(np.full((1, 1, 1, 1), 2.0))
    assert dx[0, 0, 16, 15] == 2.0 and dx.sum() == 2.0


def test_uniform_init_is_pytorchs_default_and_he_is_unchanged() -> None:
    from cnncli.nn.layers import Conv2D, Linear

    rng = np.random.default_rng(5)
    he = Conv2D(8, 64, 3, rng=np.random.default_rng(5))
    expected = rng.standard_normal((64, 8, 3, 3)) * np.sqrt(2 / 72)
    np.testing.assert_array_equal(he.params["W"], expected.astype(np.float32))
    assert not he.params["b"].any()
    for layer, fan_in in ((Conv2D(8, 64, 3, init="uniform"), 72), (Linear(300, 50, init="uniform"), 300)):
        w, b = layer.params["W"], layer.params["b"]
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound and b.any()
        assert abs(w.std() - bound / np.sqrt(3)) < 0.05 * bound  # the std of U(±a) is a/√3
