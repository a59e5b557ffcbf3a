"""Loss, accuracy, per-class accuracy and confusion matrix of a model on a labelled image set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncli import engine
from cnncli.data.preprocess import Normalizer
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import Sequential
from cnncli.run.tta import tta_logits


@dataclass(frozen=True)
class EvalResult:
    """confusion[t, p] counts images of true class t predicted as p; per_class[t] = recall of class t."""

    loss: float
    accuracy: float
    n: int
    confusion: np.ndarray  # (K, K) int64
    classes: tuple[str, ...]

    @property
    def per_class(self) -> np.ndarray:
        """(K,) accuracy of each true class (NaN for a class with no images)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / totals

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "per_class": {
                c: (None if np.isnan(a) else float(a)) for c, a in zip(self.classes, self.per_class, strict=True)
            },
            "classes": list(self.classes),
            "confusion": self.confusion.tolist(),
        }


def evaluate(
    model: Sequential,
    x: np.ndarray,
    y: np.ndarray,
    normalizer: Normalizer,
    batch_size: int,
    classes: tuple[str, ...],
    tta: str = "none",
) -> EvalResult:
    """x (N, C, H, W) uint8, y (N,) int -> mean loss, accuracy, confusion over all N images; with test-time
    augmentation `tta` (cnncli/run/tta.py) the loss and predictions are those of the averaged logits."""
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    total_loss = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        z = tta_logits(lambda v: engine.predict(model, v), normalizer(xb), tta)  # fused; model.predict: per-layer
        loss, _, _ = softmax_cross_entropy(z, yb)
        total_loss += loss * len(xb)
        np.add.at(confusion, (yb, z.argmax(axis=1)), 1)
    n = len(x)
    return EvalResult(
        loss=total_loss / max(n, 1),
        accuracy=float(np.trace(confusion)) / max(n, 1),
        n=n,
        confusion=confusion,
        classes=tuple(classes),
    )
