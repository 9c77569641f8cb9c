import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tlpipe.cli import app

runner = CliRunner()


@pytest.fixture
def bundle(exported: Path) -> Path:
    return exported / "bundle"


@pytest.mark.parametrize(
    ("suffix", "precision"), [(".csv", "fp32"), (".jsonl", "fp32"), (".parquet", "fp32"), (".txt", "int8")]
)
def test_predict_streams_every_row(bundle: Path, tmp_path: Path, suffix: str, precision: str) -> None:
    texts = [f"@united flight {i} was {'great' if i % 2 else 'late'}" for i in range(250)]
    path = tmp_path / f"in{suffix}"
    frame = pd.DataFrame({"text": texts})
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app,
        [
            "predict",
            "--bundle",
            str(bundle),
            "--input",
            str(path),
            "--output",
            str(out),
            "--chunk-rows",
            "64",
            "--precision",
            precision,
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 250
    assert all(r["label"] in ("negative", "neutral", "positive") and 0 < r["score"] <= 1 for r in rows)


def test_predict_names_a_missing_column(bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    pd.DataFrame({"tweet": ["hi"]}).to_csv(path, index=False)
    result = runner.invoke(app, ["predict", "--bundle", str(bundle), "--input", str(path)])
    assert result.exit_code == 1
    assert "tweet" in result.output or "text" in result.output


def test_predict_rejects_a_folder_that_is_no_bundle(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("hello\n")
    result = runner.invoke(app, ["predict", "--bundle", str(tmp_path), "--input", str(tmp_path / "in.txt")])
    assert result.exit_code == 1
    assert "not a tlpipe bundle" in result.output


def _project(root: Path, params_yaml: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(params_yaml)
    monkeypatch.chdir(root)


def test_run_refuses_bad_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, "finetune:\n  epochs: -1\n", monkeypatch)
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 1
    assert "finetune.epochs" in result.output


def test_status_names_a_broken_params_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, "finetune: [oops\n", monkeypatch)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1
    assert "params.yaml: not valid YAML" in result.output and "line 1" in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) < 10


def test_run_refuses_unknown_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, "{}\n", monkeypatch)
    result = runner.invoke(app, ["run", "--only", "train"])
    assert result.exit_code == 2
    assert "unknown stage" in result.output


def test_run_refuses_a_bad_override_before_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, "{}\n", monkeypatch)
    for args, named in (
        (["--set", "finetune.epochs=-1"], "finetune.epochs"),
        (["--set", "finetune.epochs"], "expected KEY=VALUE"),
        (["--params", "examples/missing.yaml"], "no such params file"),
        (["--runner", "ray"], "runner 'ray' is not one of process, dask"),
        (["--set", "runs.runner=ray"], "runs.runner"),
        (["--set", "runs.runner=process", "--set", "runs.dask_address=tcp://h:8786"], "runner is process"),
    ):
        result = runner.invoke(app, ["run", *args])
        assert result.exit_code == 1, args
        assert named in result.output, result.output
    assert not (tmp_path / ".tlpipe").exists()
