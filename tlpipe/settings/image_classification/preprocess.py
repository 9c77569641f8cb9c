"""The image preprocessor: what turns an encoded image into the model's input, the same in
training, export parity and serving (Pillow and NumPy alone: serving imports no torch).

It is saved with every checkpoint as `preprocessor.json` and copied into the bundle: an
image is decoded, converted to the model's channel count, resized to `size` x `size`
(bilinear), scaled to [0, 1] and normalised by per-channel `mean` and `std`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlpipe.images import MODES, decode

FILE = "preprocessor.json"


@dataclass(frozen=True)
class Preprocessor:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), not {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if self.size < 8:
            raise ValueError(f"image size {self.size} is below 8 pixels")

    def pixels(self, data: bytes) -> np.ndarray:
        """One encoded image as uint8 (C, size, size). Raises ValueError when it does not
        decode (`tlpipe.images.decode`)."""
        from PIL import Image

        pixels = decode(data, self.channels)  # (H, W, C)
        if pixels.shape[:2] != (self.size, self.size):
            img = Image.fromarray(pixels[:, :, 0] if self.channels == 1 else pixels)
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return pixels.transpose(2, 0, 1)

    def batch_pixels(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images as uint8 (N, C, size, size); a ValueError names the first one
        (by position) that does not decode."""
        out = np.empty((len(images), self.channels, self.size, self.size), dtype=np.uint8)
        for i, data in enumerate(images):
            try:
                out[i] = self.pixels(data)
            except ValueError as err:
                raise ValueError(f"image {i}: {err}") from None
        return out

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) pixels as the model's float32 input."""
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (pixels.astype(np.float32) / 255.0 - mean) / std

    def save(self, directory: Path) -> None:
        (directory / FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Preprocessor:
        path = directory / FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {directory} is not an image checkpoint")
        raw = json.loads(path.read_text())
        return cls(int(raw["size"]), int(raw["channels"]), tuple(raw["mean"]), tuple(raw["std"]))

    @classmethod
    def fitted(cls, pixels: np.ndarray, size: int) -> Preprocessor:
        """The per-channel mean and std of uint8 (N, C, H, W) training pixels."""
        x = pixels.astype(np.float64) / 255.0
        mean = tuple(float(m) for m in x.mean(axis=(0, 2, 3)))
        std = tuple(max(float(s), 1e-3) for s in x.std(axis=(0, 2, 3)))
        return cls(size, pixels.shape[1], mean, std)
