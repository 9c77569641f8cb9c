"""Scores shared by the classification settings: accuracy, macro-F1, per-class figures, the
confusion matrix, what always predicting the majority class scores, and a linear probe's
accuracy on features; and the figures of any stage's scores as one line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def figures(scores: dict[str, Any]) -> str:
    """The numbers among `scores` as `name value` pairs, four significant digits; the rest
    (tables, samples, text) is left to the stage's files."""
    numbers = {
        k: v for k, v in scores.items() if isinstance(v, int | float | np.number) and not isinstance(v, bool)
    }
    return ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())


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


def write_confusion(path: Path, labels: tuple[str, ...], y_true: np.ndarray, y_pred: np.ndarray) -> None:
    """One (actual, predicted) label row per example, in example order: DVC's confusion
    plot, and what the report reads back per test row."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((labels[t], labels[q]) for t, q in zip(y_true, y_pred, strict=True))


def majority_scores(y_true: np.ndarray, n_labels: int) -> dict[str, float]:
    """What always predicting the most frequent class scores: its share (accuracy), and its
    F1 2p / (1 + p) averaged with zeros for every other class (macro-F1)."""
    share = float(np.bincount(np.asarray(y_true), minlength=n_labels).max() / len(y_true))
    return {"accuracy": share, "macro_f1": 2 * share / (1 + share) / n_labels}


def probe_accuracy(features: torch.Tensor, y: np.ndarray, n_labels: int, seed: int) -> float:
    """A linear probe: multinomial logistic regression on (N, D) `features` fit on half the
    rows, scored on the rest (what forgetting measures on a source task)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    fit, score = order[: len(y) // 2], order[len(y) // 2 :]
    mean, std = features[fit].mean(0), features[fit].std(0) + 1e-6
    x = (features - mean) / std
    target = torch.tensor(y, dtype=torch.long)
    linear = torch.nn.Linear(x.shape[1], n_labels)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x[fit]), target[fit])
        loss = loss + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(x[score]).argmax(1) == target[score]).float().mean())
