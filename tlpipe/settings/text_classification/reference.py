"""The classical reference beside both arms: TF-IDF word and character n-grams with
multinomial logistic regression."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from tlpipe.data import label_ids, texts
from tlpipe.metrics import classification_metrics
from tlpipe.settings.text_classification import METRICS

# The reference's inverse regularisation strengths, the best on val macro-F1 kept.
REFERENCE_C = (0.3, 1.0, 3.0, 10.0, 30.0)


def reference_run(
    rows: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, labels: tuple[str, ...]
) -> tuple[dict[str, float], dict[str, Any]]:
    """The classical reference on `rows`: TF-IDF word (1-2) and character (2-5, in-word)
    n-grams, multinomial logistic regression at the C with the best val macro-F1.
    Returns (test metrics, training facts)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion

    start = time.perf_counter()
    features = FeatureUnion(
        [
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        ]
    )
    x = features.fit_transform(texts(rows))
    y = label_ids(rows, labels)
    x_val, y_val = features.transform(texts(val)), label_ids(val, labels)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in REFERENCE_C:
        fit = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        f1 = classification_metrics(y_val, fit.predict(x_val), len(labels))["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, fit)
    assert best is not None
    pred = best[2].predict(features.transform(texts(test)))
    metrics = classification_metrics(label_ids(test, labels), pred, len(labels))
    return {key: metrics[key] for key in METRICS}, {
        "c": best[1],
        "train_seconds": time.perf_counter() - start,
    }
