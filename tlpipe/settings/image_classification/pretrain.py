"""The image setting's source model: a classifier trained on a labelled source's label set,
from a checkpoint (the packaged ImageNet EfficientNet-Lite0, or any tlpipe image
checkpoint) or from nothing (the CNN of `pretrain.cnn`, its preprocessor's mean and std
measured on the source images)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from tlpipe import checkpoint
from tlpipe.params import PretrainParams
from tlpipe.resume import Resume
from tlpipe.setting import Arm, SourceRun
from tlpipe.settings.image_classification import backbones
from tlpipe.settings.image_classification.classifier import image_task, pixels
from tlpipe.settings.image_classification.model import (
    CHECKPOINT_FILES,
    Cnn,
    CnnConfig,
    load_checkpoint,
    save_checkpoint,
)
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.train import train_supervised_source

log = logging.getLogger(__name__)


def resolve_init(init_from: str, p: PretrainParams, download_dir: Path) -> Path:
    """The checkpoint `init_from` names. The packaged ImageNet backbone
    (`backbones.PACKAGE_INIT`) is converted into `download_dir` at `p.image.size`: its
    file verified by SHA-256, read as tensors only, written as safetensors. Anything else
    is found as every checkpoint is (`tlpipe.checkpoint.resolve_init`) and must be a tlpipe
    image checkpoint (ValueError naming what it is otherwise)."""
    if init_from == backbones.PACKAGE_INIT:
        out = download_dir / "imagenet"
        size = p.image.size
        meta = {"init_from": init_from, "weights_sha256": backbones.WEIGHTS_SHA256, "image_size": size}
        save_checkpoint(backbones.imagenet_model(size), backbones.imagenet_preprocessor(size), out, meta)
        log.info("converted the packaged ImageNet EfficientNet-Lite0 to a checkpoint at %d px", size)
        return out
    path = checkpoint.resolve_init(init_from, download_dir)
    try:
        load_checkpoint(path)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        what = f"pretrain.init_from {init_from!r}"
        raise ValueError(f"{what} is not an image checkpoint tlpipe loads: {err}") from None
    return path


def train_source(
    p: PretrainParams,
    objective: str,
    labels: tuple[str, ...],
    train: pd.DataFrame,
    held_out: pd.DataFrame,
    init_dir: Path | None,
    resume: Resume | None = None,
) -> SourceRun:
    """A classifier on the source's `labels` (`objective` is supervised: params refuse any
    other for images), continued from `init_dir` (a new head when its labels differ) or a
    new CNN, validated on `held_out` with the best kept."""
    if init_dir is not None:
        model, prep = load_checkpoint(init_dir)
        if model.config.labels != labels:
            model.new_head(labels)
        log.info("continuing %s on the source labels for %d steps", p.init_from, p.steps)
    else:
        c = p.image.channels
        raw = Preprocessor(p.image.size, c, (0.5,) * c, (0.5,) * c)
        prep = Preprocessor.fitted(pixels(train, raw).numpy(), p.image.size)
        model = Cnn(CnnConfig(c, p.cnn.widths, labels, p.cnn.dropout))
        log.info("new CNN: %d parameters", sum(q.numel() for q in model.parameters()))
    return train_supervised_source(
        model,
        prep,
        lambda plan, runtime: image_task(Arm(model), train, held_out, plan, labels, prep, runtime),
        p,
        model.layer_groups(),
        len(held_out),
        resume,
    )


def copy_checkpoint(init_dir: Path, model_dir: Path) -> None:
    """The checkpoint's files unchanged, after checking that it loads."""
    load_checkpoint(init_dir)
    model_dir.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        shutil.copyfile(init_dir / name, model_dir / name)
