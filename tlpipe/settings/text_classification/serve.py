"""Serving a text classifier's bundle with onnxruntime and tokenizers alone (no torch).

The bundle holds model.onnx (and model.int8.onnx when exported), tokenizer.json and
bundle.json: the setting, the labels, max_length and truncation, the input names, the pad
id and the ONNX file of each precision.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.batching import length_batches, pad_arrays
from tlpipe.serve import BUNDLE_JSON, label_scores, precision_session, read_texts, require_files, top_labels
from tlpipe.settings.text_classification.text import encode, load_tokenizer

if TYPE_CHECKING:
    import pandas as pd

BUNDLE_FILES = ("model.onnx", "tokenizer.json", BUNDLE_JSON)
INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class BundleSpec:
    labels: tuple[str, ...]
    max_length: int
    pad_id: int
    input_names: tuple[str, ...] = INPUT_NAMES
    # How a text longer than max_length is cut (text.encode): head or head_tail.
    truncation: str = "head"
    # precision -> ONNX file: "fp32" always, "int8" (dynamically quantised) when exported.
    models: dict[str, str] = field(default_factory=lambda: {"fp32": "model.onnx"})

    @classmethod
    def read(cls, path: Path) -> BundleSpec:
        raw = json.loads(path.read_text())
        return cls(
            tuple(raw["labels"]),
            int(raw["max_length"]),
            int(raw["pad_id"]),
            tuple(raw["input_names"]),
            str(raw.get("truncation", "head")),
            dict(raw.get("models", {"fp32": "model.onnx"})),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "input_names": list(self.input_names),
            "truncation": self.truncation,
            "models": dict(self.models),
        }


class ClassifierBundle:
    """An exported text classifier on onnxruntime's CPU provider, at the bundle's fp32 or
    (when exported) int8 precision."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32") -> None:
        require_files(path, BUNDLE_FILES)
        self.path = path
        self.spec = BundleSpec.read(path / BUNDLE_JSON)
        self.precision = precision
        self.tokenizer = load_tokenizer(path)
        self.session = precision_session(path, self.spec.models, precision, threads)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return encode(self.tokenizer, texts, self.spec.max_length, self.spec.truncation)

    def outputs(self, inputs: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Logits (N, C) of encoded texts, in input order, batched by length."""
        lengths = np.fromiter((len(s) for s in inputs), dtype=np.int64, count=len(inputs))
        out = np.zeros((len(inputs), len(self.spec.labels)), dtype=np.float32)
        for idx in length_batches(lengths, batch_size, None):
            input_ids, mask = pad_arrays([inputs[i] for i in idx], self.spec.pad_id)
            feeds = dict(zip(self.spec.input_names, (input_ids, mask), strict=True))
            out[idx] = self.session.run(["logits"], feeds)[0]
        return out

    def predict(self, rows: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """Label and softmax score per text."""
        logits = self.outputs(self.encode(rows), batch_size)
        return top_labels(logits, self.spec.labels)

    def score(self, rows: pd.DataFrame, batch_size: int = 64) -> dict[str, float]:
        """Accuracy and macro-F1 on labelled rows (a `text` and a `label` column)."""
        logits = self.outputs(self.encode(rows["text"].astype(str).tolist()), batch_size)
        return label_scores(logits, rows, self.spec.labels)

    @staticmethod
    def read_inputs(path: Path, column: str, chunk_rows: int) -> Iterator[list[str]]:
        """Stream a CSV / TSV / JSONL / Parquet / plain-text file's `column` in chunks."""
        return read_texts(path, column, chunk_rows)


PREDICTOR = ClassifierBundle
