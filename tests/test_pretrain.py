import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.pretrain import pretrain
from tests.conftest import tiny_params
from tlpipe.params import parse_params
from tlpipe.text import SpecialIds, load_tokenizer
from tlpipe.train import mask_for_mlm, pad_batch


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
    result = pretrain(parse_params(raw).pretrain, prepared, tmp_path / "p")
    losses = [float(r.split(",")[1]) for r in (tmp_path / "p/history.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]
    assert result.mlm_loss_after < np.log(400)  # better than uniform over the vocabulary


def test_continue_from_checkpoint(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.init_from": str(pretrained), "pretrain.steps": 4})
    result = pretrain(parse_params(raw).pretrain, prepared, tmp_path / "p")
    assert result.mlm_loss_before is not None
    assert (tmp_path / "p/model/tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()


def test_used_as_is_with_zero_steps(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.init_from": str(pretrained), "pretrain.steps": 0})
    result = pretrain(parse_params(raw).pretrain, prepared, tmp_path / "p")
    assert result.steps == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "p/model" / name).read_bytes() == (pretrained / name).read_bytes()
    assert (tmp_path / "p/model/tlpipe.json").is_file()


def test_missing_checkpoint_is_named(prepared: Path, tmp_path: Path) -> None:
    raw = tiny_params(**{"pretrain.init_from": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrain(parse_params(raw).pretrain, prepared, tmp_path / "p")


def test_same_seed_same_weights(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    # From a given tokenizer training is bit-for-bit repeatable. (A new WordPiece vocabulary
    # is not: the tokenizers trainer breaks frequency ties in hash-map order.)
    raw = tiny_params(**{"pretrain.init_from": str(pretrained), "pretrain.steps": 3})
    p = parse_params(raw).pretrain
    pretrain(p, prepared, tmp_path / "a")
    pretrain(p, prepared, tmp_path / "b")
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
