import json
from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import evaluate
from tests.conftest import tiny_params
from tlpipe.errors import GateFailed
from tlpipe.params import parse_params
from tlpipe.train import classification_metrics


def test_metrics_by_hand() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 0, 2]), 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"][1]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"][2]["recall"] == pytest.approx(1 / 2)
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))


def test_writes_metrics_plots_and_gain(finetuned: Path, prepared: Path, tmp_path: Path) -> None:
    p = parse_params(tiny_params())
    result = evaluate(p.evaluate, p.finetune, p.prepare.labels, finetuned, prepared, tmp_path / "e")
    metrics = json.loads((tmp_path / "e/metrics.json").read_text())
    assert metrics["test_rows"] == 60
    for model in ("transfer", "scratch"):
        assert 0 <= metrics[model]["accuracy"] <= 1
        assert set(metrics[model]["per_class"]) == {"negative", "neutral", "positive"}
        assert np.sum(metrics[model]["confusion"]) == 60
    assert metrics["gain"]["accuracy"] == pytest.approx(
        metrics["transfer"]["accuracy"] - metrics["scratch"]["accuracy"]
    )
    assert result.gain_accuracy == pytest.approx(metrics["gain"]["accuracy"])
    confusion = (tmp_path / "e/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 61
    curves = (tmp_path / "e/curves.csv").read_text()
    assert "transfer," in curves and "scratch," in curves


def test_gate_names_the_shortfall(finetuned: Path, prepared: Path, tmp_path: Path) -> None:
    p = parse_params(tiny_params(**{"evaluate.min_gain": 0.99}))
    with pytest.raises(GateFailed, match=r"gain [+-]\d\.\d{4} is \d\.\d{4} short of evaluate\.min_gain"):
        evaluate(p.evaluate, p.finetune, p.prepare.labels, finetuned, prepared, tmp_path / "e")
    assert (tmp_path / "e/metrics.json").is_file()  # the evidence is kept
