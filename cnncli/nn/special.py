"""The error function for arrays, which NumPy lacks: erf, erfc and the standard normal CDF Φ (GELU needs Φ).

Two evaluations, chosen by the array's dtype (docs/derivations.md#gelu says why each is accurate):

* float64 (gradient checks, the reference): for |x| < `SERIES_LIMIT` the everywhere-convergent series with
  positive terms only, erf(a) = (2/√π)·e^(−a²)·Σ_n 2ⁿ·a^(2n+1) / (1·3·5···(2n+1)), summed until the terms
  stop counting; beyond it Laplace's continued fraction
  erfc(a) = e^(−a²)/√π · 1/(a + (1/2)/(a + (2/2)/(a + (3/2)/(a + …)))), evaluated from a fixed depth
  upwards. Both are formulas, not fitted constants; against `math.erf` / `math.erfc` the relative error is a
  few units in the last place (tests/test_airbench_layers.py measures it on a grid).
* float32 (training): Abramowitz & Stegun's formula 7.1.26, erfc(a) ≈ (a₁t + a₂t² + … + a₅t⁵)·e^(−a²) with
  t = 1/(1 + p·a), whose absolute error is below 1.5·10⁻⁷, about two float32 units of 1: a handful of array
  passes instead of dozens.

Every function takes and returns arrays of one dtype (float32 or float64), element by element.
"""

from __future__ import annotations

import math

import numpy as np

SERIES_LIMIT = 1.0  # |x| below: the series; above: the continued fraction
SERIES_TERMS = 40  # for a < 1 the n-th term is below 2ⁿ/(2n+1)!! of a: under 2⁻⁶⁰ of the sum by n = 30
FRACTION_DEPTH = 300  # the continued fraction from this depth upwards: converged to float64 for a ≥ 1
# (measured against math.erfc on 0…9: a limit of 2.5 left 2·10⁻¹² relative error in erfc just below it, from
# 1 − erf; at 1.0 the worst is 7·10⁻¹⁵)

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)

# Abramowitz & Stegun (1964), Handbook of Mathematical Functions, formula 7.1.26.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf_series(a: np.ndarray) -> np.ndarray:
    """erf(a) for 0 ≤ a < SERIES_LIMIT, float64: (2/√π)·e^(−a²)·Σ_n 2ⁿa^(2n+1)/(2n+1)!!, every term positive."""
    two_a2 = 2.0 * a * a
    term = a.copy()
    total = a.copy()
    for n in range(1, SERIES_TERMS):
        term *= two_a2 / (2 * n + 1)
        total += term
    return _TWO_OVER_SQRT_PI * np.exp(-a * a) * total


def _erfc_fraction(a: np.ndarray) -> np.ndarray:
    """erfc(a) for a ≥ SERIES_LIMIT, float64: e^(−a²)/√π / (a + (1/2)/(a + (2/2)/(a + …))), bottom up."""
    f = a.copy()
    for k in range(FRACTION_DEPTH, 0, -1):
        f = a + (0.5 * k) / f
    return _INV_SQRT_PI * np.exp(-a * a) / f


def _erfc_as(a: np.ndarray) -> np.ndarray:
    """erfc(a) for a ≥ 0 by A&S 7.1.26, in a's dtype; also returns e^(−a²), which GELU reuses."""
    dtype = a.dtype.type
    t = dtype(1.0) / (dtype(1.0) + dtype(_AS_P) * a)
    poly = dtype(_AS_A[4])
    for c in reversed(_AS_A[:4]):
        poly = poly * t + dtype(c)
    return poly * t * np.exp(-a * a)


def erfc_nonneg(a: np.ndarray) -> np.ndarray:
    """erfc(a) for a ≥ 0 (no check), in a's dtype (float32: A&S 7.1.26; float64: series / continued fraction)."""
    if a.dtype != np.float64:
        return _erfc_as(a)
    out = np.empty_like(a)
    small = a < SERIES_LIMIT
    if small.all():
        return 1.0 - _erf_series(a)
    out[small] = 1.0 - _erf_series(a[small])
    large = ~small
    out[large] = _erfc_fraction(a[large])
    return out


def erfc(x: np.ndarray) -> np.ndarray:
    """erfc(x) = 1 − erf(x) = (2/√π)∫_x^∞ e^(−t²)dt, element by element; erfc(−x) = 2 − erfc(x)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    c = erfc_nonneg(np.abs(x))
    return np.where(x < 0, x.dtype.type(2.0) - c, c)


def erf(x: np.ndarray) -> np.ndarray:
    """erf(x) = (2/√π)∫_0^x e^(−t²)dt, element by element; odd: erf(−x) = −erf(x)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    a = np.abs(x)
    if x.dtype == np.float64:
        e = np.empty_like(a)
        small = a < SERIES_LIMIT
        e[small] = _erf_series(a[small])
        e[~small] = 1.0 - _erfc_fraction(a[~small])
    else:
        e = x.dtype.type(1.0) - _erfc_as(a)
    return np.copysign(e, x)


def normal_cdf_and_density(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Φ(x), φ(x)) with φ(x) = e^(−x²/2)/√(2π), element by element, in x's dtype — what GELU needs.

    float32: A&S 7.1.26 in place on three work arrays (a fresh temporary per operation costs more than the
    arithmetic at these sizes), sharing e^(−a²) = e^(−x²/2) between Φ and φ. float64: `normal_cdf` and the
    exponential directly."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        return normal_cdf(x), np.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    f = np.float32
    a = np.abs(x)
    a *= f(1.0 / math.sqrt(2.0))  # a = |x|/√2
    e = np.square(a)
    np.negative(e, out=e)
    np.exp(e, out=e)  # e^(−a²) = e^(−x²/2)
    t = a  # reuse: t = 1/(1 + p·a)
    t *= f(_AS_P)
    t += f(1.0)
    np.reciprocal(t, out=t)
    cdf = t * f(_AS_A[4])
    for c in reversed(_AS_A[:4]):
        cdf += f(c)
        cdf *= t
    cdf *= e
    cdf *= f(0.5)  # h = ½·erfc(|x|/√2): Φ(x) for x < 0, and Φ(x) = 1 − h for x ≥ 0, so Φ = h + 1(x ≥ 0)·(1 − 2h)
    flip = np.multiply(cdf, f(-2.0), out=a)  # (a is free again) arithmetic, not a masked write: 10× faster here
    flip += f(1.0)
    np.multiply(flip, x >= 0, out=flip)
    cdf += flip
    e *= f(1.0 / math.sqrt(2.0 * math.pi))
    return cdf, e


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) = P(Z ≤ x) for a standard normal Z = ½·erfc(−x/√2), element by element, in x's dtype.

    Through erfc of |x|/√2 on either side, so the lower tail keeps its relative accuracy:
    Φ(x) = ½·erfc(|x|/√2) for x < 0 and 1 − ½·erfc(|x|/√2) for x ≥ 0."""
    x = np.asarray(x)
    dtype = x.dtype.type
    half_c = dtype(0.5) * erfc_nonneg(np.abs(x) * dtype(1.0 / math.sqrt(2.0)))
    return np.where(x < 0, half_c, dtype(1.0) - half_c)
