"""Reading the raw data and the split files the stages exchange."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.errors import DataError, StoreError
from tlpipe.images import IMAGE_SUFFIXES, image_files, load_image_column, read_class_folders
from tlpipe.params import BUNDLED_PATH, TARGET_PARTS, InputParams

SPLITS = ("source", *TARGET_PARTS)
# The role whose column holds encoded images (bytes), not text.
IMAGE_ROLE = "image"
# Source rows pretraining never trains on: its validation (held-out accuracy or masked-LM
# loss) and, after fine-tuning, the forgetting measure.
SOURCE_HELD_OUT = 2000
# Where `tlpipe data` mirrors an s3:// input, so DVC tracks a local copy of what was read.
S3_MIRROR = Path("data/s3")
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path, declared: str, key: str = "format") -> str:
    if declared != "auto":
        return declared
    for suffix in reversed([s.lower() for s in path.suffixes]):
        if suffix in FORMATS:
            return FORMATS[suffix]
    raise DataError(f"{path}: cannot tell the format from the name; set {key}")


def local_path(path: str, root: Path = Path(".")) -> Path:
    """Where an input is read from: a local path under `root`, or an s3:// URI's mirror
    under data/s3/<bucket>/<key> (written by `fetch_s3_input`)."""
    if path.startswith("s3://"):
        from tlpipe.s3uri import parse_s3_uri

        bucket, key = parse_s3_uri(path)
        return root / S3_MIRROR / bucket / key.rstrip("/")
    return root / path


def input_paths(inp: InputParams) -> list[str]:
    """The paths an input names: one, or one per split file."""
    return list(inp.path.values()) if isinstance(inp.path, dict) else [inp.path]


def input_files(path: str, fmt: str, root: Path, key: str) -> list[Path]:
    """The files an input path names: the file itself, every file of a known format in a
    folder (recursively, in name order; a folder's files must share one format), or, for a
    folder that holds none but holds images, its image files (a folder per class)."""
    where = local_path(path, root)
    if where.is_file():
        return [where]
    if where.is_dir():
        files = sorted(
            f
            for f in where.rglob("*")
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in FORMATS
        )
        if not files and (images := image_files(where)):
            return images
        if not files:
            raise DataError(
                f"{key} {path!r}: the folder holds no {', '.join(sorted(FORMATS))} file and no image"
            )
        kinds = {detect_format(f, fmt, f"{key.rsplit('.', 1)[0]}.format") for f in files}
        if len(kinds) > 1:
            raise DataError(f"{key} {path!r}: the folder mixes formats {sorted(kinds)}; keep one format")
        return files
    hint = " (run `tlpipe data` to fetch it)" if path.startswith("s3://") else ""
    if path == BUNDLED_PATH:
        hint = " (run `tlpipe data` for the bundled set)"
    raise DataError(f"{key} {path!r}: no such file or folder{hint}")


def read_input(inp: InputParams, name: str, root: Path = Path(".")) -> pd.DataFrame:
    """Read the input `data.<name>` as a frame with one string column per role (`text`,
    `label` when labelled), plus `split` when the splits come as separate files, keeping
    the rows its `select` keeps. An `image` role is a column of encoded image bytes: a
    table's bytes, or the files its paths name (relative to the table's folder); a folder
    of one subfolder per class gives each image its subfolder's name as label.

    Each row carries its file and row number in it (ORIGIN). Under `encoding_errors:
    strict` a byte that does not decode becomes U+FFFD and its row is marked in a boolean
    column UNDECODABLE (a row-level fault: the setting's rule text_decodes). Raises
    DataError, naming the key and the file, when a file is missing, does not hash to
    `sha256`, cannot be parsed, has no rows, or lacks a configured column.
    """
    key = f"data.{name}"
    paths = inp.path if isinstance(inp.path, dict) else {None: inp.path}
    parts = []
    for split, path in paths.items():
        where = f"{key}.path" + (f".{split}" if split else "")
        files = input_files(path, inp.format, root, where)
        if inp.sha256 is not None:
            if len(files) > 1:
                raise DataError(
                    f"{key}.sha256 pins one file, but {where} {path!r} holds {len(files)}: drop it "
                    f"(outputs/prepare/summary.json records every file's SHA-256)"
                )
            got = sha256_file(files[0])
            if got != inp.sha256:
                raise DataError(f"{path}: SHA-256 {got} does not match {key}.sha256 {inp.sha256}")
        if files[0].suffix.lower() in IMAGE_SUFFIXES:
            files = [local_path(path, root)]  # a folder per class
        for file in files:
            frame = _read_class_folders(file, inp, where) if file.is_dir() else _read_file(file, inp, key)
            if split is not None:
                frame["split"] = split
            parts.append(frame)
    frame = pd.concat(parts, ignore_index=True)
    if inp.select is not None:
        keep = column_matches(frame[f"_select_{inp.select.column}"], inp.select.pattern)
        frame = frame[~keep if inp.select.invert else keep].reset_index(drop=True)
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_select_")])


def _read_class_folders(folder: Path, inp: InputParams, key: str) -> pd.DataFrame:
    frame = read_class_folders(folder, key)
    if inp.select is not None:
        if inp.select.column != "label":
            raise DataError(
                f"{key} {str(folder)!r} is a folder per class: select can match its label alone "
                f"(select.column: label), not {inp.select.column!r}"
            )
        frame["_select_label"] = frame["label"]
    return frame


def _read_file(path: Path, inp: InputParams, key: str) -> pd.DataFrame:
    fmt = detect_format(path, inp.format, f"{key}.format")
    try:
        if fmt in ("csv", "tsv"):
            sep = inp.delimiter or ("\t" if fmt == "tsv" else ",")
            frame = pd.read_csv(
                path,
                sep=sep,
                # Plain Python strings: they can hold the surrogates a strict read keeps.
                dtype=object,
                keep_default_na=False,
                na_values=[""],
                encoding=inp.encoding,
                encoding_errors=_decode_errors(inp),
            )
        elif fmt == "jsonl":
            frame = _read_jsonl(path, inp)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty ({key})") from None
    except (ValueError, UnicodeDecodeError, OSError) as err:
        hint = ""
        if fmt in ("csv", "tsv") and "Expected" in str(err) and inp.delimiter is None:
            sep = "tabs" if fmt == "tsv" else "commas"
            hint = f"; if its fields are not separated by {sep}, set {key}.delimiter"
        raise DataError(f"{path}: cannot read as {fmt}: {err}{hint}") from None
    wanted = dict(inp.columns)
    if inp.select is not None:
        wanted[f"_select_{inp.select.column}"] = inp.select.column
    missing = sorted({c for c in wanted.values() if c not in frame.columns})
    if missing:
        hint = ""
        if fmt in ("csv", "tsv") and len(frame.columns) == 1 and inp.delimiter is None:
            hint = (
                f"; the file reads as one column: set {key}.delimiter if another character separates fields"
            )
        raise DataError(
            f"{path}: column(s) {missing} not found ({key}.columns / {key}.select); "
            f"the file has {list(frame.columns)}{hint}"
        )
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows ({key})")
    out = pd.DataFrame({role: frame[column] for role, column in wanted.items()}, dtype=object)
    origin = {ORIGIN[0]: str(path), ORIGIN[1]: np.arange(len(out))}
    strings = [c for c in out.columns if c != IMAGE_ROLE]
    marks: dict[str, np.ndarray] = {}
    if inp.encoding_errors == "strict":
        # A byte that did not decode (a lone surrogate here) becomes U+FFFD; its row is marked.
        text = out[strings]
        marks[UNDECODABLE] = (
            text.map(lambda v: isinstance(v, str) and _UNDECODED.search(v) is not None).any(axis=1).to_numpy()
        )
        out[strings] = text.map(lambda v: _UNDECODED.sub("\ufffd", v) if isinstance(v, str) else v)
    out[strings] = out[strings].astype("string")
    if IMAGE_ROLE in out.columns:
        out[IMAGE_ROLE] = load_image_column(out[IMAGE_ROLE], path.parent, f"{path} ({key})")
    return out.assign(**marks, **origin)


# What a strict read (errors="surrogateescape") turns a byte that does not decode into.
_UNDECODED = re.compile("[\udc80-\udcff]")
# The column read_input adds under encoding_errors: strict: whether the row held such a byte.
UNDECODABLE = "_undecodable"
# The columns read_input adds to say where each row came from: its file, and its row in that
# file (0-based, header excluded).
ORIGIN = ("_file", "_row")


def _decode_errors(inp: InputParams) -> str:
    """How the reader decodes: under strict a bad byte is kept as a lone surrogate, so that
    its row, not the whole file, fails (the row rule text_decodes)."""
    return "surrogateescape" if inp.encoding_errors == "strict" else inp.encoding_errors


def _read_jsonl(path: Path, inp: InputParams) -> pd.DataFrame:
    """JSON Lines, one object per line; an error names the line, not a byte offset."""
    rows = []
    with path.open(encoding=inp.encoding, errors=_decode_errors(inp)) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number} is not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number} is a JSON {type(row).__name__}, not an object")
            rows.append({k: None if v is None else str(v) for k, v in row.items()})
    return pd.DataFrame(rows, dtype=object)


def fetch_s3_input(uri: str, root: Path = Path(".")) -> Path:
    """Mirror the object at `uri` (or, for a key ending in '/', every object under that
    prefix) into data/s3/, where DVC tracks it. A file is written atomically; a folder is
    downloaded beside the mirror and swapped in, so an object deleted from the bucket leaves
    the mirror too. Reads from TLPIPE_S3_ENDPOINT when set, else AWS S3, with the standard
    credential chain."""
    import os
    import shutil
    import tempfile

    from tlpipe.s3uri import parse_s3_uri
    from tlpipe.store import ENDPOINT_ENV, download_folder, download_object, make_client, region

    bucket, key = parse_s3_uri(uri)
    dest = local_path(uri, root)
    if key and not key.endswith("/"):
        client = make_client(os.environ.get(ENDPOINT_ENV, "").strip() or None, region())
        if not download_object(client, bucket, key, dest):
            raise DataError(f"{uri}: no such object")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        download_folder(uri, fresh)
    except StoreError as err:
        shutil.rmtree(fresh)
        raise DataError(str(err)) from None
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(fresh, dest)
    return dest


def normalise_text(texts: pd.Series) -> pd.Series:
    """The form two texts are compared in for de-duplication and leakage checks."""
    return texts.astype("string").str.lower().str.replace(r"\s+", " ", regex=True).str.strip()


def column_matches(values: pd.Series, pattern: str) -> pd.Series:
    """Whether each value matches `pattern` (case-insensitive regex search; null never does)."""
    rx = re.compile(pattern, re.IGNORECASE)
    return values.fillna("").map(lambda t: bool(rx.search(t))).astype(bool)


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
    if "label" not in frame.columns:
        raise DataError(f"the rows carry no label column (expected labels {list(labels)})")
    unknown = sorted(set(frame["label"].dropna().astype(str)) - index.keys())
    if unknown or frame["label"].isna().any():
        raise DataError(f"labels {unknown or ['<null>']} are not in the label set {list(labels)}")
    return frame["label"].astype(str).map(index).to_numpy(dtype=np.int64)


def texts(frame: pd.DataFrame) -> list[str]:
    return frame["text"].fillna("").astype(str).tolist()


def undecodable(frame: pd.DataFrame) -> pd.Series:
    """Rows that held a byte that did not decode (marked by a strict read_input)."""
    if UNDECODABLE not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame[UNDECODABLE].astype(bool)
