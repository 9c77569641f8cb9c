"""Stage outputs are replaced in one step: a stage that fails leaves the previous ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tlpipe.files as files
from tlpipe.errors import GateFailed
from tlpipe.files import next_dir, recover_dir, replace_dir, replacing


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "outputs" / "finetune"
    (path / "model").mkdir(parents=True)
    (path / "model" / "weights").write_text("previous")
    (path / "metrics.json").write_text("{}")
    return path


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p != out)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_finished_body_replaces_the_folder(
    out: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    with replacing(out) as work:
        assert work == next_dir(out) and not any(work.iterdir())
        assert _tree(out)["model/weights"] == b"previous"  # untouched while the stage runs
        (work / "model").mkdir()
        (work / "model" / "weights").write_text("new")
    assert _tree(out) == {"model/weights": b"new"}
    assert _siblings(out) == []


@pytest.mark.faults
def test_a_failed_body_leaves_the_previous_outputs(out: Path) -> None:
    before = _tree(out)
    with pytest.raises(RuntimeError, match="killed mid-epoch"), replacing(out) as work:
        (work / "half-written").write_text("x")
        raise RuntimeError("killed mid-epoch")
    assert _tree(out) == before
    assert _siblings(out) == []


@pytest.mark.faults
def test_a_failed_gate_still_shows_its_report(out: Path) -> None:
    with pytest.raises(GateFailed), replacing(out, keep=(GateFailed,)) as work:
        (work / "report.md").write_text("gain -0.02 below the gate")
        raise GateFailed("gain -0.02 is not above evaluate.min_gain 0.0")
    assert _tree(out) == {"report.md": b"gain -0.02 below the gate"}


@pytest.mark.faults
def test_a_replacement_cut_between_its_renames_is_undone(out: Path) -> None:
    before = _tree(out)
    # What a kill between the fallback's two renames leaves: the outputs moved aside.
    os.rename(out, out.with_name(".finetune.old"))
    recover_dir(out)
    assert _tree(out) == before and _siblings(out) == []
    # And the next replacement starts from there too.
    os.rename(out, out.with_name(".finetune.old"))
    new = next_dir(out)
    new.mkdir()
    (new / "metrics.json").write_text('{"new": 1}')
    replace_dir(new, out)
    assert _tree(out) == {"metrics.json": b'{"new": 1}'} and _siblings(out) == []


@pytest.mark.faults
def test_a_stage_that_fails_keeps_its_previous_outputs(
    tmp_path: Path, sample_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the wiring every entry point uses (the flow, dvc.yaml's commands)."""
    from tasks.wiring import run_stage
    from tests.conftest import make_project, tiny_params
    from tlpipe.errors import DataError
    from tlpipe.params import parse_params

    project = make_project(tmp_path / "proj", sample_csv, tiny_params())
    monkeypatch.chdir(project)
    run_stage("prepare", parse_params(tiny_params()))
    before = _tree(project / "outputs/prepare")
    (project / "data/raw/sample.csv").write_text("text,sentiment\n")  # a header and no rows
    with pytest.raises(DataError):
        run_stage("prepare", parse_params(tiny_params()))
    assert _tree(project / "outputs/prepare") == before
    assert _siblings(project / "outputs/prepare") == []


def test_linux_exchanges_two_folders_in_one_rename(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert files._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())
