"""Image classification: a convolutional backbone with a new classification head,
transferred from a source model to the target's labels.

This module declares the setting (its column roles and metrics) and imports no torch:
params read it. Its implementation (`setting.SETTING`) is made of:
- `preprocess`: the image preprocessor (decode, channels, resize, normalise; no torch),
  shared by training, export and serving;
- `model`: the VGG-style CNN, its layer groups and its safetensors checkpoint;
- `backbones`: the packaged ImageNet EfficientNet-Lite0, verified and converted;
- `pretrain`: the source model, supervised on a labelled source's labels;
- `classifier`: images to batches, augmentation, batch-norm statistics under freezing, the
  loss, validation and predictions;
- `reference`: logistic regression on the pixels.
Beside it: `rows` and `rules` (validation), `export` and `serve` (the bundle), `report`.
"""

from __future__ import annotations

from tlpipe.setting import CLASSIFICATION_METRICS, SettingSpec

METRICS = CLASSIFICATION_METRICS
SPEC = SettingSpec(
    name="image-classification",
    # A target needs both columns, a source its images (and its label when it is labelled).
    roles=("image", "label"),
    metrics=METRICS,
    baseline_name="majority class",
    # A source model learns from labelled images; there is no unsupervised objective yet.
    objectives=("supervised",),
    reference_name="pixels + LR",
    sized_scratch=False,
)
