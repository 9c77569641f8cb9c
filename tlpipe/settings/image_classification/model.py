"""The image classifiers and their self-contained checkpoint: a small VGG-style CNN tlpipe
trains from scratch or pretrains on the source images, or the ImageNet EfficientNet-Lite0
(`backbones`). Each has a `config` (with its labels), `head`, `new_head` and `layer_groups`.

A checkpoint is a directory: `model.safetensors` (the weights), `config.json` (the
architecture, its sizes and the label set), `preprocessor.json` (how images become its
input) and `tlpipe.json` (the params and input hashes that made it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tlpipe.checkpoint import META_FILE
from tlpipe.files import write_json
from tlpipe.settings.image_classification.preprocess import FILE as PREPROCESSOR_FILE
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.transfer import LayerGroups

if TYPE_CHECKING:
    from tlpipe.settings.image_classification.backbones import EfficientNetLite

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# Every file of a checkpoint but its tlpipe.json.
CHECKPOINT_FILES = (WEIGHTS, CONFIG, PREPROCESSOR_FILE)
ARCHITECTURE = "tlpipe-cnn"


@dataclass(frozen=True)
class CnnConfig:
    """`widths[i]` is block i's channel count; each block halves the resolution."""

    channels: int
    widths: tuple[int, ...]
    labels: tuple[str, ...]
    dropout: float = 0.1

    def with_labels(self, labels: tuple[str, ...]) -> CnnConfig:
        return CnnConfig(self.channels, self.widths, labels, self.dropout)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Cnn(nn.Module):
    """stem (3x3 conv) -> blocks (two 3x3 convs, 2x2 max-pool) -> global average pool ->
    dropout -> linear head."""

    def __init__(self, config: CnnConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(*_conv(config.channels, config.widths[0]))
        blocks, c_in = [], config.widths[0]
        for width in config.widths:
            blocks.append(nn.Sequential(*_conv(c_in, width), *_conv(width, width), nn.MaxPool2d(2)))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in, len(config.labels))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images to (B, widths[-1]) pooled features."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, labels)

    def new_head(self, labels: tuple[str, ...]) -> None:
        """A freshly initialised head for `labels` (the backbone kept)."""
        self.config = self.config.with_labels(labels)
        self.head = nn.Linear(self.head.in_features, len(labels))

    def layer_groups(self) -> LayerGroups:
        """Depth 0 the stem, 1..n the blocks, the head above."""
        names = [name for name, _ in self.named_parameters()]
        return LayerGroups.match(names, r"^stem\.", r"^blocks\.(\d+)\.", len(self.blocks))


def layer_groups(model: Cnn | EfficientNetLite) -> LayerGroups:
    return model.layer_groups()


def architecture(model: Cnn | EfficientNetLite) -> str:
    from tlpipe.settings.image_classification.backbones import ARCHITECTURE as LITE

    return ARCHITECTURE if isinstance(model, Cnn) else LITE


def save_checkpoint(
    model: Cnn | EfficientNetLite,
    preprocessor: Preprocessor,
    out_dir: Path,
    meta: dict[str, Any] | None = None,
) -> None:
    """The checkpoint directory (weights, config, preprocessor, and `meta` as tlpipe.json
    when given); written in place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    config = {"architecture": architecture(model), **asdict(model.config)}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    preprocessor.save(out_dir)
    if meta is not None:
        write_json(out_dir / META_FILE, meta)


def build(model_dir: Path) -> Cnn | EfficientNetLite:
    """The architecture `model_dir/config.json` describes, randomly initialised."""
    from tlpipe.settings.image_classification import backbones

    path = model_dir / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {model_dir} is not an image checkpoint")
    raw = json.loads(path.read_text())
    kind, labels = raw.get("architecture"), tuple(raw.get("labels", ()))
    if kind == ARCHITECTURE:
        return Cnn(CnnConfig(int(raw["channels"]), tuple(raw["widths"]), labels, float(raw["dropout"])))
    if kind == backbones.ARCHITECTURE:
        config = backbones.LiteConfig(
            int(raw["image_size"]), labels, float(raw["dropout"]), float(raw["drop_connect"])
        )
        return backbones.EfficientNetLite.build(config)
    raise ValueError(
        f"{path}: architecture {kind!r} is not one tlpipe builds ({ARCHITECTURE}, {backbones.ARCHITECTURE})"
    )


def load_checkpoint(model_dir: Path) -> tuple[Cnn | EfficientNetLite, Preprocessor]:
    """The model (on the CPU, in eval mode) and its preprocessor. The weights are
    safetensors: nothing is unpickled."""
    model = build(model_dir)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model.eval(), Preprocessor.load(model_dir)
