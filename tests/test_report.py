"""tlpipe report: one self-contained HTML page and the same content in Markdown."""

import re
import shutil
from pathlib import Path

from tests.conftest import tiny_params
from tlpipe.params import parse_params
from tlpipe.report import write_report


def _root(tmp_path: Path, prepared: Path, evaluated: Path) -> Path:
    shutil.copytree(prepared, tmp_path / "outputs/prepare")
    shutil.copytree(evaluated, tmp_path / "outputs/evaluate")
    return tmp_path


def test_page_is_self_contained_and_matches_the_markdown(
    tmp_path: Path, prepared: Path, evaluated: Path
) -> None:
    root = _root(tmp_path, prepared, evaluated)
    params = parse_params(tiny_params())
    path, markdown = write_report(params, root / "outputs/report.html", root)
    page = path.read_text()
    for title in (
        "Data",
        "Validation",
        "Data-efficiency curve",
        "Negative-transfer gate",
        "Shipped model",
        "Strategy",
        "Forgetting (source task)",
        "Lineage",
    ):
        assert f"<h2>{title}</h2>" in page and f"## {title}" in markdown, title
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched
    # The same numbers in both renderings: every table cell of the Markdown is in the page.
    cells = {c.strip() for line in markdown.splitlines() if line.startswith("| ") for c in line.split("|")}
    cells = {c for c in cells if c and set(c) != {"-"}}
    missing = [c for c in cells if c.replace("\\", "\\").replace("&", "&amp;") not in page]
    assert not missing, missing[:5]
    assert "validate has not run." in markdown  # missing stages are named, not skipped over


def test_gate_and_gain_figures_come_from_metrics(tmp_path: Path, prepared: Path, evaluated: Path) -> None:
    import json

    root = _root(tmp_path, prepared, evaluated)
    metrics = json.loads((root / "outputs/evaluate/metrics.json").read_text())
    _, markdown = write_report(parse_params(tiny_params()), root / "r.html", root)
    g = metrics["gate"]
    assert f"gain {g['gain']:+.4f}, interval [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]" in markdown
    assert f"Test accuracy {metrics['shipped']['accuracy']:.4f}" in markdown


def test_source_model_is_described(tmp_path: Path, prepared: Path, evaluated: Path, pretrained: Path) -> None:
    root = _root(tmp_path, prepared, evaluated)
    params = parse_params(tiny_params())
    _, markdown = write_report(params, root / "r.html", root)
    assert "Source model: pretrain has not run." in markdown
    shutil.copytree(pretrained.parent, root / "outputs/pretrain")
    _, markdown = write_report(params, root / "r.html", root)
    assert "Source model: a new encoder, then 12 steps of mlm pretraining on the source rows" in markdown
