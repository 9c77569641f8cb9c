from pathlib import Path

import pandas as pd
import pytest

from tasks.prepare import prepare
from tests.conftest import tiny_params
from tlpipe.data import normalise_text, sha256_file
from tlpipe.errors import DataError
from tlpipe.params import parse_params


def _setup(tmp_path: Path, sample_csv: Path, **overrides: object) -> tuple[Path, object]:
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/sample.csv").write_bytes(sample_csv.read_bytes())
    return tmp_path, parse_params(tiny_params(**overrides))


def test_splits_are_disjoint_sized_and_deterministic(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv)
    a = prepare(p.prepare, p.data, root, root / "a")
    prepare(p.prepare, p.data, root, root / "b")
    for name in ("source", "train", "val", "test", "pool", "summary"):
        ext = "json" if name == "summary" else "parquet"
        assert sha256_file(root / "a" / f"{name}.{ext}") == sha256_file(root / "b" / f"{name}.{ext}")
    frames = {n: pd.read_parquet(root / "a" / f"{n}.parquet") for n in ("source", "train", "val", "test")}
    assert (len(frames["train"]), len(frames["val"]), len(frames["test"])) == (60, 40, 60)
    keys = [set(normalise_text(f["text"])) for f in frames.values()]
    assert sum(len(k) for k in keys) == len(set().union(*keys))
    assert frames["test"]["text"].str.contains("@", regex=False).all()
    assert a.raw_sha256 == sha256_file(root / "data/raw/sample.csv")


def test_other_seed_other_split(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv)
    prepare(p.prepare, p.data, root, root / "a")
    q = parse_params(tiny_params(**{"prepare.seed": 2}))
    prepare(q.prepare, q.data, root, root / "b")
    assert sha256_file(root / "a/test.parquet") != sha256_file(root / "b/test.parquet")


def test_missing_column_is_named(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv, **{"data.text_column": "tweet"})
    with pytest.raises(DataError, match=r"\['tweet'\] not found"):
        prepare(p.prepare, p.data, root, root / "out")


def test_sha256_pin_is_enforced(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv, **{"data.sha256": "0" * 64})
    with pytest.raises(DataError, match="does not match data.sha256"):
        prepare(p.prepare, p.data, root, root / "out")


def test_target_too_small_says_by_how_much(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv, **{"prepare.target_test_size": 5000})
    with pytest.raises(DataError, match=r"matches \d+ rows .* need 5100"):
        prepare(p.prepare, p.data, root, root / "out")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_inputs(tmp_path: Path, sample_csv: Path, fmt: str) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    path = root / f"data/raw/sample.{fmt}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    p = parse_params(tiny_params(**{"data.path": f"data/raw/sample.{fmt}"}))
    result = prepare(p.prepare, p.data, root, root / "out")
    assert sum(result.counts["test"].values()) == 60
