import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from tasks.finetune import finetune
from tests.conftest import tiny_params
from tlpipe.params import parse_params
from tlpipe.settings.text_classification.setting import SETTING


def test_outputs_and_self_contained_model(finetuned: Path) -> None:
    model = finetuned / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tlpipe.json"):
        assert (model / name).is_file(), name
    config = json.loads((model / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert 1 <= metrics["best_step"] <= metrics["steps_run"] <= 8  # 2 epochs of 4 steps
    assert metrics["strategy"] == "full" and metrics["tapt"] is None
    # The training state lives outside the outputs (tlpipe.resume), never in the model's folder.
    assert sorted(p.name for p in finetuned.iterdir()) == [
        "history.csv",
        "metrics.json",
        "model",
        "timing.json",
    ]
    history = (finetuned / "history.csv").read_text().splitlines()
    assert history[0] == "step,epoch,train_loss,val_accuracy,val_macro_f1" and len(history) >= 2


def test_encoder_is_transferred_and_head_is_new(pretrained: Path, finetuned: Path) -> None:
    source = load_file(pretrained / "model.safetensors")
    tuned = load_file(finetuned / "model" / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    assert source[key].shape == tuned[key].shape
    assert "classifier.weight" in tuned and "classifier.weight" not in source


def test_early_stopping_keeps_best_validation(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    p = parse_params(tiny_params(**{"finetune.epochs": 6, "finetune.patience": 1, "finetune.evaluations": 6}))
    result = finetune(SETTING, p.finetune, p.data, pretrained, prepared, tmp_path / "f")
    history = [line.split(",") for line in (tmp_path / "f/history.csv").read_text().splitlines()[1:]]
    f1 = np.array([float(r[4]) for r in history])
    best = int(np.argmax(f1))
    assert result.best_step == int(history[best][0])
    assert len(history) <= best + 2  # stopped one stale validation after the best


def test_same_seed_same_model(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    p = parse_params(tiny_params(**{"finetune.epochs": 1}))
    finetune(SETTING, p.finetune, p.data, pretrained, prepared, tmp_path / "a")
    finetune(SETTING, p.finetune, p.data, pretrained, prepared, tmp_path / "b")
    a = (tmp_path / "a/model/model.safetensors").read_bytes()
    assert a == (tmp_path / "b/model/model.safetensors").read_bytes()
