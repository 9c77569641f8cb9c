"""The classical reference for images: multinomial logistic regression on the pixels."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tlpipe.metrics import classification_metrics
from tlpipe.settings.image_classification import METRICS

# The reference's inverse regularisation strengths, the best on val macro-F1 kept.
REFERENCE_C = (0.01, 0.1, 1.0, 10.0)


def reference_run(
    pixels: np.ndarray,
    y: np.ndarray,
    val_pixels: np.ndarray,
    val_y: np.ndarray,
    test_pixels: np.ndarray,
    test_y: np.ndarray,
    n_labels: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Logistic regression on uint8 (N, C, H, W) pixels scaled to [0, 1] and standardised
    on the training rows, at the C with the best validation macro-F1. Returns (test
    metrics, training facts)."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float64) / 255.0

    x = flat(pixels)
    mean, std = x.mean(0), x.std(0) + 1e-3
    x, x_val, x_test = (x - mean) / std, (flat(val_pixels) - mean) / std, (flat(test_pixels) - mean) / std
    best: tuple[float, float, LogisticRegression] | None = None
    for c in REFERENCE_C:
        fit = LogisticRegression(C=c, max_iter=1000).fit(x, y)
        f1 = classification_metrics(val_y, fit.predict(x_val), n_labels)["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, fit)
    assert best is not None
    metrics = classification_metrics(test_y, best[2].predict(x_test), n_labels)
    return {key: metrics[key] for key in METRICS}, {
        "c": best[1],
        "train_seconds": time.perf_counter() - start,
    }
