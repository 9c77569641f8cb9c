"""Serving an image classifier's bundle with onnxruntime, NumPy and Pillow alone (no torch).

The bundle holds model.onnx (and model.int8.onnx when exported), preprocessor.json and
bundle.json: the setting, the labels, the input name and the ONNX file of each precision.
The graph takes normalised float32 images (N, C, H, W); the bundle's `Preprocessor` makes
them from encoded image files exactly as training did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.images import IMAGE_SUFFIXES, image_files
from tlpipe.serve import BUNDLE_JSON, label_scores, precision_session, require_files, top_labels
from tlpipe.settings.image_classification.preprocess import FILE as PREPROCESSOR_FILE
from tlpipe.settings.image_classification.preprocess import Preprocessor

if TYPE_CHECKING:
    import pandas as pd

BUNDLE_FILES = ("model.onnx", PREPROCESSOR_FILE, BUNDLE_JSON)
INPUT_NAME = "pixel_values"


@dataclass(frozen=True)
class BundleSpec:
    labels: tuple[str, ...]
    input_name: str = INPUT_NAME
    # precision -> ONNX file: "fp32" always, "int8" (dynamically quantised) when exported.
    models: dict[str, str] = field(default_factory=lambda: {"fp32": "model.onnx"})

    @classmethod
    def read(cls, path: Path) -> BundleSpec:
        raw = json.loads(path.read_text())
        return cls(
            tuple(raw["labels"]),
            str(raw.get("input_name", INPUT_NAME)),
            dict(raw.get("models", {"fp32": "model.onnx"})),
        )

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "input_name": self.input_name, "models": dict(self.models)}


class ImageBundle:
    """An exported image classifier on onnxruntime's CPU provider, at the bundle's fp32 or
    (when exported) int8 precision."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32") -> None:
        require_files(path, BUNDLE_FILES)
        self.path = path
        self.spec = BundleSpec.read(path / BUNDLE_JSON)
        self.precision = precision
        self.preprocessor = Preprocessor.load(path)
        self.session = precision_session(path, self.spec.models, precision, threads)

    def prepare(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images as the preprocessor's uint8 pixels (N, C, H, W); a ValueError names
        the first one that does not decode."""
        return self.preprocessor.batch_pixels(images)

    def outputs(self, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Logits (N, labels) of prepared uint8 pixels (N, C, H, W), in input order."""
        out = np.zeros((len(inputs), len(self.spec.labels)), dtype=np.float32)
        for i in range(0, len(inputs), batch_size):
            x = self.preprocessor.normalise(inputs[i : i + batch_size])
            out[i : i + batch_size] = self.session.run(["logits"], {self.spec.input_name: x})[0]
        return out

    def predict(self, rows: Sequence[bytes], batch_size: int = 64) -> list[dict[str, Any]]:
        """Label and softmax score per encoded image."""
        logits = self.outputs(self.prepare(rows), batch_size)
        return top_labels(logits, self.spec.labels)

    def score(self, rows: pd.DataFrame, batch_size: int = 64) -> dict[str, float]:
        """Accuracy and macro-F1 on labelled rows (an `image` column of encoded images and a
        `label` column)."""
        logits = self.outputs(self.prepare(rows["image"].tolist()), batch_size)
        return label_scores(logits, rows, self.spec.labels)

    @staticmethod
    def read_inputs(path: Path, column: str, chunk_rows: int) -> Iterator[list[bytes]]:
        """Encoded images in chunks: an image file, a folder's image files (recursively, in
        name order), or a Parquet / CSV column of image bytes or of paths relative to the
        table's folder."""
        if path.is_dir():
            files = image_files(path)
            for i in range(0, len(files), chunk_rows):
                yield [f.read_bytes() for f in files[i : i + chunk_rows]]
            return
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            yield [path.read_bytes()]
            return
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            batches = (
                b.column(0).to_pylist()
                for b in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=[column])
            )
        elif suffix in (".csv", ".tsv"):
            import pandas as pd

            sep = "\t" if suffix == ".tsv" else ","
            batches = (
                frame[column].tolist()
                for frame in pd.read_csv(path, sep=sep, chunksize=chunk_rows, usecols=[column], dtype=str)
            )
        else:
            raise ValueError(
                f"{path}: unsupported input {suffix!r} (an image, a folder of images, parquet, csv, tsv)"
            )
        for values in batches:
            yield [_image_bytes(v, path.parent) for v in values]


def _image_bytes(value: object, base: Path) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if value is None:
        raise ValueError("a row holds no image")
    file = base / str(value)
    if not file.is_file():
        raise ValueError(f"image {str(value)!r} not found (read relative to {base})")
    return file.read_bytes()


PREDICTOR = ImageBundle
