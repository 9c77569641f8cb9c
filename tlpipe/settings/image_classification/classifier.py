"""Rows to batches, augmentation, loss and validation for an image classifier, and its
predictions.

Every image is decoded and resized once (uint8, (N, C, H, W)); a training batch is
augmented on the fly (a seeded random rotation, zoom, shift and optional horizontal flip,
one affine resampling per batch, then an optional loss of resolution), then normalised by
the checkpoint's preprocessor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from tlpipe.data import label_ids
from tlpipe.errors import DataError
from tlpipe.metrics import classification_metrics, write_confusion
from tlpipe.params import AugmentParams, FinetuneParams
from tlpipe.setting import Arm, Metric
from tlpipe.settings.image_classification import METRICS
from tlpipe.settings.image_classification.model import load_checkpoint
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.train import Runtime

# The validation score that keeps a run's best weights: macro-F1 does not reward a model
# for favouring the majority class.
SELECTION = METRICS["macro_f1"]


@dataclass(frozen=True)
class Augment:
    """Random training-time changes: rotation up to `rotation` degrees either way, a shift
    up to `shift` of the side in each direction, a horizontal flip with probability `flip`
    (off for digits and text, where a mirror image is another class or none), a zoom by
    a factor between 1 / (1 + `scale`) and 1 + `scale`, log-uniform (a source whose objects
    fill less or more of the frame than the target's), and, with probability `downscale`,
    a loss of resolution: the image averaged down to a side drawn uniformly between
    `downscale_range` of its own and resized back bilinearly, as the preprocessor resizes
    (a source scanned finer than the target)."""

    rotation: float = 0.0
    shift: float = 0.0
    flip: float = 0.0
    scale: float = 0.0
    downscale: float = 0.0
    downscale_range: tuple[float, float] = (0.25, 0.5)

    @classmethod
    def of(cls, p: AugmentParams) -> Augment:
        return cls(p.rotation, p.shift, p.flip, p.scale, p.downscale, tuple(p.downscale_range))

    @property
    def active(self) -> bool:
        return self.rotation > 0 or self.shift > 0 or self.flip > 0 or self.scale > 0 or self.downscale > 0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """`x`: float (B, C, H, W) in [0, 1]; outside the image is black."""
        if not self.active:
            return x
        b = x.shape[0]
        angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(self.rotation)
        shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * self.shift)  # grid units span 2
        mirror = torch.where(torch.rand(b, generator=gen) < self.flip, -1.0, 1.0)
        # Drawn only when asked for, so the draws above stay those of a run without zoom.
        zoom = (1 + self.scale) ** (torch.rand(b, generator=gen) * 2 - 1) if self.scale > 0 else torch.ones(b)
        # theta maps output coordinates to input ones: dividing by the zoom enlarges.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                torch.stack([sin * mirror, cos, shift[:, 1]], 1),
            ],
            1,
        ).to(x.device, x.dtype)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self._lose_resolution(x, gen) if self.downscale > 0 else x

    def _lose_resolution(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        low, high = self.downscale_range
        chosen = torch.rand(b, generator=gen) < self.downscale
        fraction = low + (high - low) * torch.rand(b, generator=gen)
        sides = torch.clamp((fraction * h).round().long(), 1, h)
        out = x.clone()
        for side in torch.unique(sides[chosen]).tolist():
            rows = torch.nonzero(chosen & (sides == side)).squeeze(1).to(x.device)
            small = F.interpolate(x[rows], size=(side, max(1, round(side * w / h))), mode="area")
            out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        return out


def model_input(pixels: torch.Tensor, prep: Preprocessor) -> torch.Tensor:
    """uint8 (B, C, H, W) pixels, or float ones in [0, 1], as the normalised float input."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
    mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(prep.std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


@contextlib.contextmanager
def batch_norm_statistics(model: nn.Module, update_trainable: bool) -> Iterator[None]:
    """While inside, a batch-norm layer whose parameters are frozen keeps its running
    statistics (it normalises with them, in eval mode, whenever the model trains); a
    trainable one updates them only if `update_trainable`. Mode is set at each forward
    pass, so gradual unfreezing is followed."""

    def pre_forward(module: nn.Module, _args: object) -> None:
        if not module.training:
            return
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                frozen = bn.weight is not None and not bn.weight.requires_grad
                bn.train(not frozen and update_trainable)

    handle = model.register_forward_pre_hook(pre_forward)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class SourceImages:
    """The joint objective's other half: labelled source images (uint8 (N, C, H, W)) and
    their label ids, weighted `alpha` against the target loss's 1 - alpha, augmented as
    pretrain augmented them. `head` is the source model's own classifier when the target
    got a new one (trained beside it, on the pooled features), None when the model kept it."""

    pixels: torch.Tensor
    y: np.ndarray
    alpha: float
    augment: Augment
    head: nn.Module | None = None


@dataclass
class ImageTask:
    """An image classifier's `TrainTask`: shuffled batches of decoded images, augmentation,
    cross entropy, and accuracy and macro-F1 on validation."""

    pixels: torch.Tensor  # uint8 (N, C, H, W)
    y: np.ndarray
    val_pixels: torch.Tensor
    val_y: np.ndarray
    prep: Preprocessor
    n_labels: int
    batch_size: int
    eval_batch_size: int
    runtime: Runtime
    seed: int
    augment: Augment = field(default_factory=Augment)
    update_batch_norm: bool = True
    source: SourceImages | None = None
    selection: Metric = SELECTION
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.pixels)
        self._labels = torch.tensor(self.y, dtype=torch.long, device=self.runtime.device)
        self._gen = torch.Generator().manual_seed(self.seed)
        if self.source is not None:
            self._source_labels = torch.tensor(self.source.y, dtype=torch.long, device=self.runtime.device)
            if self.source.head is not None:
                self.source.head.to(self.runtime.device)

    def epoch(self, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(self.rows)
        return [order[i : i + self.batch_size] for i in range(0, self.rows, self.batch_size)][::-1]

    def loss(self, model: nn.Module, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        rows = torch.from_numpy(idx)
        x = self.augment(self.pixels[rows].float() / 255.0, self._gen)
        logits = model(model_input(x, self.prep).to(self.runtime.device))  # (B, labels)
        target = F.cross_entropy(logits.float(), self._labels[rows.to(self.runtime.device)])
        src = self.source
        if src is None:
            return target
        # As many source images as target ones, drawn with replacement.
        picked = torch.from_numpy(rng.integers(0, len(src.pixels), len(idx)))
        x = model_input(src.augment(src.pixels[picked].float() / 255.0, self._gen), self.prep)
        x = x.to(self.runtime.device)
        logits = model(x) if src.head is None else src.head(model.features(x))  # (B, source labels)
        source = F.cross_entropy(logits.float(), self._source_labels[picked.to(self.runtime.device)])
        return src.alpha * source + (1.0 - src.alpha) * target

    def validate(self, model: nn.Module) -> dict[str, float]:
        pred = predict_logits(model, self.val_pixels, self.prep, self.eval_batch_size, self.runtime).argmax(1)
        scores = classification_metrics(self.val_y, pred, self.n_labels)
        return {f"val_{key}": scores[key] for key in METRICS}

    def extra_parameters(self) -> list[nn.Parameter]:
        head = self.source.head if self.source is not None else None
        return list(head.parameters()) if head is not None else []

    def fast_paths(
        self, model: nn.Module, runtime: Runtime, seed: int | np.random.Generator
    ) -> contextlib.ExitStack:
        stack = runtime.fast_paths(model, seed)
        stack.enter_context(batch_norm_statistics(model, self.update_batch_norm))
        return stack

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self._gen.get_state()}  # the augmentation's draws

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["gen"])


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    pixels: torch.Tensor,
    prep: Preprocessor,
    batch_size: int,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Logits (N, labels) of uint8 (N, C, H, W) `pixels`, in fp32 on the model's device
    unless a `runtime` says otherwise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pixels), batch_size):
        x = model_input(pixels[i : i + batch_size].to(device), prep)
        with runtime.autocast() if runtime else contextlib.nullcontext():
            out.append(model(x).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def pixels(rows: pd.DataFrame, prep: Preprocessor) -> torch.Tensor:
    """The rows' images as `prep` makes them: uint8 (N, C, size, size). DataError names the
    first image (by row position) that does not decode."""
    try:
        return torch.from_numpy(prep.batch_pixels(rows["image"].tolist()))
    except ValueError as err:
        raise DataError(str(err)) from None


def image_task(
    arm: Arm,
    train: pd.DataFrame,
    val: pd.DataFrame,
    p: FinetuneParams,
    labels: tuple[str, ...],
    prep: Preprocessor,
    runtime: Runtime,
) -> ImageTask:
    """`arm` trained on `train` and validated on `val`, the images made by `prep`."""
    return ImageTask(
        pixels(train, prep),
        label_ids(train, labels),
        pixels(val, prep),
        label_ids(val, labels),
        prep,
        n_labels=len(labels),
        batch_size=p.optim.batch_size,
        eval_batch_size=p.eval_batch_size,
        runtime=runtime,
        seed=p.seed,
        augment=Augment.of(p.augment),
        update_batch_norm=p.update_batch_norm,
        source=arm.extras,
    )


def score(
    model: nn.Module,
    rows: pd.DataFrame,
    p: FinetuneParams,
    labels: tuple[str, ...],
    prep: Preprocessor,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 of `model` on `rows` (in fp32 unless `runtime` says otherwise)."""
    pred = predict_logits(model, pixels(rows, prep), prep, p.eval_batch_size, runtime).argmax(1)
    scores = classification_metrics(label_ids(rows, labels), pred, len(labels))
    return {key: scores[key] for key in METRICS}


def shipped(
    model_dir: Path, test: pd.DataFrame, p: FinetuneParams, labels: tuple[str, ...], out_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped classifier on test: every classification metric, per class by name;
    writes `out_dir/confusion.csv` (a DVC plot; one row per test image, in test order)."""
    model, prep = load_checkpoint(model_dir)
    test_y = label_ids(test, labels)
    pred = predict_logits(model, pixels(test, prep), prep, p.eval_batch_size).argmax(1)
    metrics = classification_metrics(test_y, pred, len(labels))
    metrics["per_class"] = dict(zip(labels, metrics["per_class"], strict=True))
    write_confusion(out_dir / "confusion.csv", labels, test_y, pred)
    return model, metrics
