"""Images as rows: reading them from the shapes users keep them in, decoding, identity.

An image input is a folder with one subfolder per class (the folder name is the label), or
a table (CSV / TSV / JSONL / Parquet) whose image column holds encoded image bytes or a
path relative to the table's own folder. Either way a row ends up holding the encoded file
as it was read (`image`, bytes), so the prepared splits are self-contained and hashed by
DVC. Decoding and its facts (size, channels, a hash of the pixels) are Pillow and NumPy
alone: serving needs no torch.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.errors import DataError

# The files a folder input holds one image each of.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow modes by channel count: what an image is converted to before it is compared or fed.
MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class ImageFacts:
    """What decoding one encoded image found: its size, channel count and a hash of its
    decoded pixels (two files holding the same picture share it, whatever their format), or
    why it did not decode."""

    width: int | None
    height: int | None
    channels: int | None
    pixels_sha256: str | None
    error: str | None = None


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively, in name order; hidden files skipped)."""
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
    )


def read_class_folders(folder: Path, key: str) -> pd.DataFrame:
    """A folder of one subfolder per class: rows of (`image` bytes, `label` the subfolder's
    name), each with its file. Images directly in `folder` (no class) are an error that
    names one of them."""
    files = image_files(folder)
    if not files:
        raise DataError(f"{key} {str(folder)!r}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
    loose = [f for f in files if f.parent == folder]
    if loose:
        raise DataError(
            f"{key} {str(folder)!r}: {len(loose)} image(s) sit outside a class folder (e.g. "
            f"{loose[0].name}); put each image in a subfolder named by its label"
        )
    return pd.DataFrame(
        {
            "image": [f.read_bytes() for f in files],
            "label": pd.array([f.relative_to(folder).parts[0] for f in files], dtype="string"),
            "_file": [str(f) for f in files],
            "_row": np.zeros(len(files), dtype=np.int64),
        }
    )


def load_image_column(values: pd.Series, base: Path, key: str) -> pd.Series:
    """A table's image column as encoded bytes: bytes are kept, a string is a path relative
    to `base` (the table's folder) and is read. A path that names no file is a DataError
    naming it; a null stays null (the row rule image_decodes sets it aside)."""

    def load(value: object) -> bytes | None:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            return None
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        path = base / str(value)
        if not path.is_file():
            raise DataError(f"{key}: image {str(value)!r} not found (read relative to {base})")
        return path.read_bytes()

    return pd.Series([load(v) for v in values], index=values.index, dtype=object)


def decode(data: bytes | None, channels: int | None = None) -> np.ndarray:
    """An encoded image as a uint8 array (H, W, C); with `channels` (1 or 3) converted to
    grayscale or RGB first. Raises ValueError when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if channels is not None:
                img = img.convert(MODES[channels])
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB" if img.mode not in ("1", "I", "I;16", "F") else "L")
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"not a readable image: {err}") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def facts(data: bytes | None) -> ImageFacts:
    """Decode `data` and say what it holds (or why it does not decode)."""
    try:
        pixels = decode(data)
    except ValueError as err:
        return ImageFacts(None, None, None, None, str(err))
    h, w, c = pixels.shape
    digest = hashlib.sha256(f"{h}x{w}x{c}:".encode() + pixels.tobytes()).hexdigest()
    return ImageFacts(w, h, c, digest)


def image_facts(images: pd.Series) -> pd.DataFrame:
    """`facts` of every image, as columns width, height, channels, pixels_sha256, error."""
    found = [facts(v) for v in images]
    return pd.DataFrame(
        {
            "width": pd.array([f.width for f in found], dtype="Int64"),
            "height": pd.array([f.height for f in found], dtype="Int64"),
            "channels": pd.array([f.channels for f in found], dtype="Int64"),
            "pixels_sha256": pd.array([f.pixels_sha256 for f in found], dtype="string"),
            "error": pd.array([f.error for f in found], dtype="string"),
        },
        index=images.index,
    )


def encode_png(pixels: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, C) array as PNG bytes (deterministic for given pixels)."""
    from PIL import Image

    arr = pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
