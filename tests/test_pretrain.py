import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.pretrain import pretrain
from tests.conftest import LABELS, tiny_params
from tlpipe.data import SOURCE_HELD_OUT, read_split, source_split
from tlpipe.errors import DataError
from tlpipe.params import parse_params
from tlpipe.setting import get_setting
from tlpipe.settings.text_classification.mlm import mask_for_mlm, pad_batch
from tlpipe.settings.text_classification.model import classifier_labels, load_transfer_classifier
from tlpipe.settings.text_classification.text import SpecialIds, load_tokenizer


def _stage(raw: dict) -> tuple:
    """The pretrain stage's params sections from a raw params dict."""
    p = parse_params(raw)
    return get_setting(p.setting), p.pretrain, p.data


def test_scratch_checkpoint_is_self_contained(pretrained: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "tlpipe.json",
    ):
        assert (pretrained / name).is_file(), name
    meta = json.loads((pretrained / "tlpipe.json").read_text())
    assert meta["stage"] == "pretrain" and len(meta["inputs"]["source.parquet"]) == 64
    assert meta["params"]["model"]["num_layers"] == 2
    metrics = json.loads((pretrained.parent / "metrics.json").read_text())
    assert metrics["steps"] == 12 and np.isfinite(metrics["mlm_eval_loss_after"])
    history = (pretrained.parent / "history.csv").read_text().splitlines()
    assert history[0] == "step,loss,lr" and len(history) == 1 + 3


def test_loss_falls_with_training(prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.steps": 40})
    result = pretrain(*_stage(raw), prepared, tmp_path / "p")
    losses = [float(r.split(",")[1]) for r in (tmp_path / "p/history.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]
    assert result.metrics["mlm_eval_loss_after"] < np.log(400)  # better than uniform over the vocabulary


def test_continue_from_checkpoint(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.init_from": str(pretrained), "pretrain.steps": 4})
    result = pretrain(*_stage(raw), prepared, tmp_path / "p")
    assert result.metrics["mlm_eval_loss_before"] is not None
    assert (tmp_path / "p/model/tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()


def test_used_as_is_with_zero_steps(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.init_from": str(pretrained), "pretrain.steps": 0})
    result = pretrain(*_stage(raw), prepared, tmp_path / "p")
    assert result.steps == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "p/model" / name).read_bytes() == (pretrained / name).read_bytes()
    assert (tmp_path / "p/model/tlpipe.json").is_file()


def test_missing_checkpoint_is_named(prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.init_from": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrain(*_stage(raw), prepared, tmp_path / "p")


def test_same_seed_same_weights(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    # From a given tokenizer training is bit-for-bit repeatable. (A new WordPiece vocabulary
    # is not: the tokenizers trainer breaks frequency ties in hash-map order.)
    raw = tiny_params(**{"pretrain.init_from": str(pretrained), "pretrain.steps": 3})
    p = parse_params(raw).pretrain
    setting, data = get_setting("text-classification"), parse_params(tiny_params()).data
    pretrain(setting, p, data, prepared, tmp_path / "a")
    pretrain(setting, p, data, prepared, tmp_path / "b")
    a = (tmp_path / "a/model/model.safetensors").read_bytes()
    assert a == (tmp_path / "b/model/model.safetensors").read_bytes()


def test_masking_follows_bert(pretrained: Path) -> None:
    tok = load_tokenizer(pretrained)
    special = SpecialIds.of(tok)
    ids = [np.asarray(e.ids) for e in tok.encode_batch(["the flight was late again"] * 64)]
    input_ids, mask = pad_batch(ids, special.pad)
    gen = torch.Generator().manual_seed(0)
    corrupted, positions, targets = mask_for_mlm(input_ids, mask, special, tok.get_vocab_size(), 0.15, gen)
    flat = input_ids.flatten()
    assert torch.equal(flat[positions], targets)
    assert not torch.isin(targets, torch.tensor([special.cls, special.sep, special.pad])).any()
    share = len(positions) / int(mask.sum() - 2 * len(ids))
    assert 0.08 < share < 0.25
    unchanged = corrupted.flatten() == flat
    others = torch.ones_like(unchanged)
    others[positions] = False
    assert unchanged[others].all()  # only chosen positions are corrupted
    assert (corrupted.flatten()[positions] == special.mask).float().mean() > 0.6


@pytest.fixture(scope="module")
def supervised(pretrained: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder trained as a classifier on the source rows' labels."""
    raw = tiny_params(
        **{"pretrain.init_from": str(pretrained), "pretrain.objective": "supervised", "pretrain.steps": 20}
    )
    out = tmp_path_factory.mktemp("supervised") / "pretrain"
    result = pretrain(*_stage(raw), prepared, out)
    assert result.objective == "supervised" and result.steps == 20
    return out / "model"


def test_supervised_source_model_is_a_classifier_for_the_labels(supervised: Path, prepared: Path) -> None:
    assert classifier_labels(supervised) == LABELS
    metrics = json.loads((supervised.parent / "metrics.json").read_text())
    held_out, train = source_split(read_split(prepared, "source"))
    assert metrics["held_out_rows"] == len(held_out) and metrics["source_rows"] == len(train)
    assert 0.0 <= metrics["source_accuracy"] <= 1.0 and 1 <= metrics["best_step"] <= 20
    history = (supervised.parent / "history.csv").read_text().splitlines()
    assert history[0] == "step,loss,val_accuracy" and len(history) == 1 + 4  # evaluations: 4
    assert json.loads((supervised / "tlpipe.json").read_text())["labels"] == list(LABELS)


def test_source_head_transfers_only_for_the_same_labels(supervised: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(supervised / "model.safetensors")
    same, transferred = load_transfer_classifier(supervised, LABELS)
    assert "classifier.weight" in transferred
    assert torch.equal(same.classifier.weight, saved["classifier.weight"])

    # Same number of labels, another order: the head's rows would mean other classes.
    other, transferred = load_transfer_classifier(supervised, LABELS[::-1])
    assert "classifier.weight" not in transferred and "classifier.bias" not in transferred
    assert not torch.equal(other.classifier.weight, saved["classifier.weight"])
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(other.get_parameter(embeddings), saved[embeddings])
    assert "bert.encoder.layer.0.attention.self.query.weight" in transferred

    # Another number of labels: a new head of the right shape.
    wider, transferred = load_transfer_classifier(supervised, (*LABELS, "mixed"))
    assert wider.classifier.weight.shape[0] == 4 and "classifier.weight" not in transferred


def test_supervised_from_scratch(prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.objective": "supervised", "pretrain.steps": 8})
    result = pretrain(*_stage(raw), prepared, tmp_path / "p")
    assert classifier_labels(result.model_dir) == LABELS
    assert (result.model_dir / "tokenizer.json").is_file()


def test_supervised_needs_source_labels(prepared: Path, tmp_path: Path) -> None:
    unlabelled = tmp_path / "prepare"
    unlabelled.mkdir()
    source = read_split(prepared, "source")
    source.loc[source.index[-1], "label"] = None
    source.to_parquet(unlabelled / "source.parquet")
    raw = tiny_params(**{"pretrain.objective": "supervised", "pretrain.steps": 2})
    with pytest.raises(DataError, match="supervised pretraining needs a source label on every source row"):
        pretrain(*_stage(raw), unlabelled, tmp_path / "p")
    source.loc[source.index[-1], "label"] = "sarcastic"
    source.to_parquet(unlabelled / "source.parquet")
    with pytest.raises(DataError, match="sarcastic"):
        pretrain(*_stage(raw), unlabelled, tmp_path / "p")


def test_held_out_source_rows_are_never_trained_on(prepared: Path) -> None:
    source = read_split(prepared, "source")
    held_out, train = source_split(source)
    assert len(held_out) == min(SOURCE_HELD_OUT, len(source) // 10) > 0
    assert set(held_out.index).isdisjoint(train.index) and len(held_out) + len(train) == len(source)
