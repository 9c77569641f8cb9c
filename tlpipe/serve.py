"""Serving a release bundle on onnxruntime (no torch): the bundle's setting finds its
predictor, which prepares raw rows the way the model was trained to read them.

A bundle is a directory holding the ONNX model(s), the preprocessor's files and
bundle.json, whose `setting` names the predictor (a bundle without one is a text
classifier's, as every bundle was before settings were named).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from tlpipe.setting import Predictor, predictor

if TYPE_CHECKING:
    import pandas as pd

BUNDLE_JSON = "bundle.json"
DEFAULT_SETTING = "text-classification"
# How many test inputs export records the bundle's predictions on (`Exporter.serving_inputs`).
SERVING_ROWS = 16
# export's record of those inputs and predictions (outputs/export/serving.json).
SERVING = "serving.json"

# onnxruntime's CPU SkipLayerNormalization kernel (residual add + layer norm in one op) is a
# scalar loop with a divide per element, where an Add and the LayerNormalization kernel are
# vectorised (onnxruntime 1.32). Batched inference runs faster without it and batch-1
# latency is even (`python -m bench.infer`), so the exported graphs keep the two apart
# (the text setting's fusions) and sessions do not fuse them back.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def inference_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session on `path` with tlpipe's graph optimisations."""
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS)
    )


def precision_session(
    path: Path, models: dict[str, str], precision: str, threads: int | None
) -> ort.InferenceSession:
    """A session on the bundle's ONNX file for `precision` (`models`: precision -> file);
    ValueError names the precisions the bundle has."""
    if precision not in models:
        raise ValueError(f"{path}: no {precision} model in this bundle; it has {sorted(models)}")
    return inference_session(path / models[precision], session_options(threads))


def top_labels(logits: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per row of logits (N, C): the most likely label and its softmax score."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    return [{"label": labels[b], "score": float(probs[i, b])} for i, b in enumerate(best)]


def label_scores(logits: np.ndarray, rows: pd.DataFrame, labels: Sequence[str]) -> dict[str, float]:
    """A classifier's accuracy and macro-F1 from its logits (N, C) on `rows`, whose `label`
    column must hold labels of the bundle's set (DataError names any other)."""
    from tlpipe.data import label_ids
    from tlpipe.metrics import classification_metrics

    y = label_ids(rows, tuple(labels))
    found = classification_metrics(y, logits.argmax(1), len(labels))
    return {"accuracy": found["accuracy"], "macro_f1": found["macro_f1"]}


def to_wire(value: Any) -> Any:
    """A raw input as JSON can carry it: bytes (an encoded image) as {"base64": ...}."""
    return {"base64": base64.b64encode(value).decode("ascii")} if isinstance(value, bytes) else value


def from_wire(value: Any) -> Any:
    return base64.b64decode(value["base64"]) if isinstance(value, dict) and "base64" in value else value


def require_files(path: Path, names: tuple[str, ...]) -> None:
    missing = [f for f in names if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: not a tlpipe bundle, missing {missing}")


def bundle_setting(path: Path) -> str:
    """The setting a bundle was exported by."""
    require_files(path, (BUNDLE_JSON,))
    return str(json.loads((path / BUNDLE_JSON).read_text()).get("setting", DEFAULT_SETTING))


def load_bundle(path: Path, threads: int | None = None, precision: str = "fp32") -> Predictor:
    """The bundle in `path` ready to predict, at `precision` (fp32, or int8 when exported);
    FileNotFoundError / ValueError name what is missing."""
    return predictor(bundle_setting(path))(path, threads=threads, precision=precision)


def read_texts(path: Path, column: str, chunk_rows: int) -> Iterator[list[str]]:
    """Stream a CSV / TSV / JSONL / Parquet file's `column`, or a text file's lines, in
    chunks of `chunk_rows` texts (what `tlpipe predict` reads for either text setting)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=[column]):
            yield [str(t) if t is not None else "" for t in batch.column(0).to_pylist()]
        return
    if suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            chunk: list[str] = []
            for line in f:
                chunk.append(line.rstrip("\n"))
                if len(chunk) == chunk_rows:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
        return
    import pandas as pd

    if suffix in (".jsonl", ".ndjson"):
        reader = pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False)
    elif suffix in (".csv", ".tsv"):
        reader = pd.read_csv(
            path,
            sep="\t" if suffix == ".tsv" else ",",
            chunksize=chunk_rows,
            usecols=[column],
            dtype=str,
            keep_default_na=False,
        )
    else:
        raise ValueError(f"{path}: unsupported input format {suffix!r} (csv, tsv, jsonl, parquet, txt)")
    for frame in reader:
        if column not in frame.columns:
            raise ValueError(f"{path}: no column {column!r}; it has {list(frame.columns)}")
        yield frame[column].fillna("").astype(str).tolist()
