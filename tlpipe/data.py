"""Reading the raw data and the split files the stages exchange."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.errors import DataError
from tlpipe.params import DataParams

SPLITS = ("source", "train", "val", "test")
TARGET_SPLITS = ("train", "val", "test")
# Source rows pretraining never trains on: its validation (held-out accuracy or masked-LM
# loss) and, after fine-tuning, the forgetting measure.
SOURCE_HELD_OUT = 2000


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffixes = [s.lower() for s in path.suffixes]
    for fmt, exts in (
        ("csv", {".csv", ".tsv"}),
        ("jsonl", {".jsonl", ".ndjson"}),
        ("parquet", {".parquet", ".pq"}),
    ):
        if exts & set(suffixes):
            return fmt
    raise DataError(f"{path}: cannot tell the format from the name; set data.format")


def read_raw(p: DataParams, root: Path = Path(".")) -> pd.DataFrame:
    """Read the raw file named by params as a frame with columns `text` and `label`.

    Raises DataError when the file is missing, does not hash to `data.sha256`, cannot be
    parsed, or lacks the configured columns.
    """
    path = root / p.path
    if not path.is_file():
        raise DataError(f"data.path {p.path!r}: no such file (run `tlpipe data` for the bundled set)")
    if p.sha256 is not None:
        got = sha256_file(path)
        if got != p.sha256:
            raise DataError(f"{p.path}: SHA-256 {got} does not match data.sha256 {p.sha256}")
    fmt = detect_format(path, p.format)
    try:
        if fmt == "csv":
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            frame = pd.read_csv(
                path,
                sep=sep,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                encoding=p.encoding,
                encoding_errors=p.encoding_errors,
            )
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, encoding=p.encoding)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{p.path}: cannot read as {fmt}: {err}") from None
    missing = [c for c in (p.text_column, p.label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{p.path}: column(s) {missing} not found (data.text_column / data.label_column); "
            f"the file has {list(frame.columns)}"
        )
    out = pd.DataFrame({"text": frame[p.text_column], "label": frame[p.label_column]})
    return out.astype({"text": "string", "label": "string"})


def normalise_text(texts: pd.Series) -> pd.Series:
    """The form two texts are compared in for de-duplication and leakage checks."""
    return texts.astype("string").str.lower().str.replace(r"\s+", " ", regex=True).str.strip()


def target_mask(texts: pd.Series, pattern: str) -> pd.Series:
    rx = re.compile(pattern, re.IGNORECASE)
    return texts.fillna("").map(lambda t: bool(rx.search(t))).astype(bool)


def read_split(prepare_dir: Path, split: str) -> pd.DataFrame:
    path = prepare_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    return pd.read_parquet(path)


def source_split(source: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(held_out, train): the first min(SOURCE_HELD_OUT, 10%) source rows and the rest.

    prepare shuffles the source with its seed, so the first rows are a random sample.
    """
    n = min(SOURCE_HELD_OUT, len(source) // 10)
    return source.iloc[:n], source.iloc[n:]


def label_ids(frame: pd.DataFrame, labels: tuple[str, ...]) -> np.ndarray:
    """Label strings as indices into `labels`; DataError on a label outside the set."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(frame["label"].dropna().astype(str)) - index.keys())
    if unknown or frame["label"].isna().any():
        raise DataError(f"labels {unknown or ['<null>']} are not in prepare.labels {list(labels)}")
    return frame["label"].astype(str).map(index).to_numpy(dtype=np.int64)


def texts(frame: pd.DataFrame) -> list[str]:
    return frame["text"].fillna("").astype(str).tolist()
