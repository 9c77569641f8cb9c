"""Scores shared by the classification settings: accuracy, macro-F1, per-class figures, the
confusion matrix, and what always predicting the majority class scores."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)  # rows: true, cols: predicted
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    predicted, support = confusion.sum(0).astype(float), confusion.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "macro_f1": float(f1.mean()),
        "per_class": [
            {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(n_labels)
        ],
        "confusion": confusion.tolist(),
    }


def majority_scores(y_true: np.ndarray, n_labels: int) -> dict[str, float]:
    """What always predicting the most frequent class scores: its share (accuracy), and its
    F1 2p / (1 + p) averaged with zeros for every other class (macro-F1)."""
    share = float(np.bincount(np.asarray(y_true), minlength=n_labels).max() / len(y_true))
    return {"accuracy": share, "macro_f1": 2 * share / (1 + share) / n_labels}
