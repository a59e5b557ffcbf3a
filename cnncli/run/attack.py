"""Adversarial images from δX: FGSM and PGD in the L∞ ball around the pixels (`cnn attack`).

Untargeted, against the true class y: the attack raises L = −log p_y. The pixels U ∈ [0, 1]; δU = ∂L/∂U comes
from `cnncli.run.saliency.input_gradient` (the network's own backward in evaluation mode, through the
normalisation). docs/derivations.md#adversarial-examples derives both:

- FGSM (Goodfellow et al. 2015): the largest first-order increase of L over ‖Δ‖∞ ≤ ε is Δ = ε · sign(δU), so
  U_adv = clip(U + ε · sign(δU), 0, 1) (the clip keeps a valid image; it only shrinks |Δ| at pixels already
  within ε of 0 or 1).
- PGD (Madry et al. 2018): K steps U_{k+1} = Π(U_k + a · sign(δU(U_k))), starting at U_0 = U, where Π is the
  Euclidean projection onto {V : ‖V − U‖∞ ≤ ε} ∩ [0, 1]^d. Both sets are boxes, so their intersection is the box
  [max(U − ε, 0), min(U + ε, 1)] and Π clips each pixel to it. Default step a = 2.5 ε / K (Madry's choice:
  the steps can cross the ball and still come back). One step of size ε is FGSM exactly.

Images are attacked as floats (the adversarial image is not rounded to 8 bits). Library code: never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from cnncli.host.errors import ConfigError
from cnncli.nn.model import Sequential
from cnncli.run.saliency import PixelScale, input_gradient, predict_proba


def parse_eps(text: str, what: str = "--eps") -> list[float]:
    """'2/255' -> [2/255]; '0,1/255,2/255,4/255' -> four values; '0.01' -> [0.01]. ConfigError naming the value."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{what}: {part!r} is not a number or a fraction like 2/255") from None
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{what}: {part} = {v:g} is outside [0, 1] (pixels are on the [0, 1] scale)")
        values.append(v)
    return values


def project(v: np.ndarray, u: np.ndarray, eps: float) -> np.ndarray:
    """Π: the nearest point to v (N, C, H, W) with ‖V − U‖∞ ≤ ε and V ∈ [0, 1], i.e. v clipped to
    [max(U − ε, 0), min(U + ε, 1)]."""
    return np.clip(v, np.maximum(u - eps, 0.0), np.minimum(u + eps, 1.0))


def fgsm(model: Sequential, scale: PixelScale, u: np.ndarray, y: np.ndarray, eps: float,
         on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """U_adv = clip(U + ε · sign(δU), 0, 1) for pixels u (N, C, H, W) in [0, 1] and true classes y (N,);
    `on_batch(k)` after each batch of k image gradients (progress)."""
    u = np.asarray(u, dtype=np.float64)
    if eps == 0:
        return u.copy()
    g = input_gradient(model, scale, u, y, on_batch=on_batch).grad
    return np.clip(u + eps * np.sign(g), 0.0, 1.0)


def pgd(model: Sequential, scale: PixelScale, u: np.ndarray, y: np.ndarray, eps: float, steps: int,
        step_size: float | None = None, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """K = `steps` projected signed-gradient steps of size a (default 2.5 ε / K) from U: U_adv (N, C, H, W),
    always within ε of U (L∞) and in [0, 1]."""
    if steps < 1:
        raise ConfigError(f"--steps: must be at least 1, got {steps}")
    u = np.asarray(u, dtype=np.float64)
    a = 2.5 * eps / steps if step_size is None else float(step_size)
    v = u.copy()
    if eps == 0:
        return v
    for _ in range(steps):
        g = input_gradient(model, scale, v, y, on_batch=on_batch).grad
        v = project(v + a * np.sign(g), u, eps)
    return v


@dataclass(frozen=True)
class AttackResult:
    """One attack at one ε on N images: the adversarial pixels, their probabilities, accuracy against y."""

    method: str  # 'FGSM' or 'PGD-K'
    eps: float
    steps: int
    step_size: float
    adv: np.ndarray  # (N, C, H, W)
    p: np.ndarray  # (N, K)
    accuracy: float


def attack(model: Sequential, scale: PixelScale, u: np.ndarray, y: np.ndarray, eps: float, steps: int = 1,
           step_size: float | None = None, on_batch: Callable[[int], None] | None = None) -> AttackResult:
    """FGSM when steps = 1 and no step size is given, else PGD with K = steps; accuracy of the result against y.
    `on_batch(k)` after each batch of k image gradients (ε > 0: N · K of them)."""
    if steps == 1 and step_size is None:
        adv, method, a = fgsm(model, scale, u, y, eps, on_batch), "FGSM", eps
    else:
        a = 2.5 * eps / steps if step_size is None else float(step_size)
        adv, method = pgd(model, scale, u, y, eps, steps, a, on_batch), f"PGD-{steps}"
    p = predict_proba(model, scale, adv)
    acc = float(np.mean(p.argmax(axis=1) == np.asarray(y))) if len(y) else 0.0
    return AttackResult(method, float(eps), int(steps), float(a), adv, p, acc)
