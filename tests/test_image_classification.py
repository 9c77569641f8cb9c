"""The image setting's model, preprocessor and training task, on the bundled UCI digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tlpipe.bundled import materialize_images
from tlpipe.images import encode_png
from tlpipe.params import FinetuneParams
from tlpipe.settings.image_classification.classifier import (
    Augment,
    ImageTask,
    batch_norm_statistics,
    predict_logits,
)
from tlpipe.settings.image_classification.model import (
    Cnn,
    CnnConfig,
    layer_groups,
    load_checkpoint,
    save_checkpoint,
)
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.train import CPU_FP32, train_model
from tlpipe.transfer import apply_freezing, param_groups, trainable_from

LABELS = tuple(str(d) for d in range(10))
CONFIG = CnnConfig(channels=1, widths=(8, 16, 16), labels=LABELS, dropout=0.1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return pd.read_parquet(materialize_images(tmp_path_factory.mktemp("img") / "data/raw/uci-digits.parquet"))


def _prep() -> Preprocessor:
    return Preprocessor(size=16, channels=1, mean=(0.3,), std=(0.4,))


def test_the_preprocessor_decodes_resizes_and_round_trips(tmp_path: Path) -> None:
    square = np.zeros((8, 8), dtype=np.uint8)
    square[2:6, 2:6] = 255
    prep = _prep()
    pixels = prep.pixels(encode_png(square))
    assert pixels.shape == (1, 16, 16) and pixels.dtype == np.uint8
    assert pixels[0, 8, 8] == 255 and pixels[0, 0, 0] == 0
    rgb = Preprocessor(16, 3, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)).pixels(encode_png(square))
    assert rgb.shape == (3, 16, 16)
    x = prep.normalise(pixels[None])
    assert x.dtype == np.float32 and x[0, 0, 8, 8] == pytest.approx((1 - 0.3) / 0.4)
    prep.save(tmp_path)
    assert Preprocessor.load(tmp_path) == prep
    with pytest.raises(ValueError, match="not a readable image"):
        prep.pixels(b"\x89PNG broken")
    with pytest.raises(ValueError, match="channels must be 1"):
        Preprocessor(16, 2, (0.5, 0.5), (0.2, 0.2))
    fitted = Preprocessor.fitted(np.full((4, 1, 16, 16), 255, dtype=np.uint8), 16)
    assert fitted.mean == (1.0,) and fitted.std == (1e-3,)


def test_layer_groups_place_the_stem_the_blocks_and_the_head() -> None:
    model = Cnn(CONFIG)
    groups = layer_groups(model)
    assert groups.blocks == 3
    assert groups.depth("stem.0.weight") == 0
    assert groups.depth("blocks.0.0.weight") == 1 and groups.depth("blocks.2.4.weight") == 3
    assert groups.depth("head.weight") == groups.head == 4


@pytest.mark.parametrize(
    ("update", "trains"),
    [
        ({"strategy": "head_only"}, {"head"}),
        ({"strategy": "freeze_bottom", "freeze_bottom": 2}, {"blocks.2", "head"}),
        ({"strategy": "full"}, {"stem", "blocks.0", "blocks.1", "blocks.2", "head"}),
    ],
)
def test_strategies_act_on_the_intended_parameters(update: dict, trains: set[str]) -> None:
    model = Cnn(CONFIG)
    groups = layer_groups(model)
    p = FinetuneParams(**update)
    apply_freezing(model, groups, trainable_from(p, groups.blocks))
    trainable = {
        ".".join(name.split(".")[:2]) if name.startswith("blocks") else name.split(".")[0]
        for name, q in model.named_parameters()
        if q.requires_grad
    }
    assert trainable == trains


def test_gradual_unfreezing_and_layer_decay_follow_the_depths() -> None:
    model = Cnn(CONFIG)
    groups = layer_groups(model)
    p = FinetuneParams(strategy="gradual_unfreeze")
    assert [trainable_from(p, groups.blocks, epoch) for epoch in (1, 2, 5, 9)] == [4, 3, 0, 0]
    rates = {g["depth"]: g["lr"] for g in param_groups(model, groups, FinetuneParams(layer_decay=0.5))}
    lr = FinetuneParams().optim.lr
    assert rates == {0: lr * 0.125, 1: lr * 0.25, 2: lr * 0.5, 3: lr, 4: lr}


def test_frozen_batch_norm_keeps_its_statistics_and_trainable_ones_follow_params() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 16, 16) * 3 + 2
    for update_trainable in (True, False):
        model = Cnn(CONFIG).train()
        groups = layer_groups(model)
        apply_freezing(model, groups, 2)  # stem and block 0 frozen
        frozen_bn, trainable_bn = model.stem[1], model.blocks[2][1]
        before = frozen_bn.running_mean.clone(), trainable_bn.running_mean.clone()
        with batch_norm_statistics(model, update_trainable):
            model(x).sum().backward()
        assert torch.equal(frozen_bn.running_mean, before[0])
        assert torch.equal(trainable_bn.running_mean, before[1]) is not update_trainable
        assert model.training


def test_augmentation_is_seeded_and_a_sure_flip_mirrors() -> None:
    x = torch.rand(4, 1, 16, 16)
    aug = Augment(rotation=10, shift=0.1)
    one = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(one, aug(x, torch.Generator().manual_seed(3)))
    assert not torch.allclose(one, x)
    assert torch.equal(Augment()(x, torch.Generator()), x)
    mirrored = Augment(flip=1.0)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)


def _pixels(frame: pd.DataFrame, prep: Preprocessor) -> torch.Tensor:
    return torch.from_numpy(prep.batch_pixels(list(frame["image"])))


def test_a_cnn_learns_the_digits_and_its_checkpoint_round_trips(digits: pd.DataFrame, tmp_path: Path) -> None:
    torch.manual_seed(0)
    prep = _prep()
    train, val = digits.iloc[:400], digits.iloc[1500:1700]
    y = train["label"].map({d: i for i, d in enumerate(LABELS)}).to_numpy()
    val_y = val["label"].map({d: i for i, d in enumerate(LABELS)}).to_numpy()
    task = ImageTask(
        _pixels(train, prep), y, _pixels(val, prep), val_y, prep, len(LABELS),
        batch_size=32, eval_batch_size=128, runtime=CPU_FP32, seed=0, augment=Augment(rotation=5, shift=0.05),
    )  # fmt: skip
    model = Cnn(CONFIG)
    p = FinetuneParams(epochs=8, min_steps=0, max_steps=None, evaluations=4, patience=4)
    p = p.model_copy(update={"optim": p.optim.model_copy(update={"lr": 3e-3})})
    run = train_model(model, task, p, layer_groups(model), runtime=CPU_FP32)
    assert run.best_score > 0.8, run.history  # chance is 0.1

    save_checkpoint(model, prep, tmp_path / "ckpt")
    loaded, loaded_prep = load_checkpoint(tmp_path / "ckpt")
    assert loaded_prep == prep and loaded.config == model.config
    val_pixels = _pixels(val, prep)
    np.testing.assert_allclose(
        predict_logits(loaded, val_pixels, prep, 64), predict_logits(model, val_pixels, prep, 64), atol=1e-5
    )


def test_the_pixel_reference_beats_chance_on_the_digits(digits: pd.DataFrame) -> None:
    from tlpipe.settings.image_classification.reference import reference_run

    prep = _prep()
    ids = digits["label"].map({d: i for i, d in enumerate(LABELS)}).to_numpy()
    pixels = prep.batch_pixels(list(digits["image"]))
    metrics, facts = reference_run(
        pixels[:300], ids[:300], pixels[1300:1500], ids[1300:1500], pixels[1500:], ids[1500:], len(LABELS)
    )
    assert metrics["accuracy"] > 0.85 and set(metrics) == {"accuracy", "macro_f1"}
    assert facts["c"] in (0.01, 0.1, 1.0, 10.0)
