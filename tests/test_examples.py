"""Each example configuration under examples/ runs end to end through the Prefect flow, on
its own data shape (cut small from the bundled corpus), publishing to a real SeaweedFS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tests.conftest import REPO, make_project
from tlpipe.bundled import write_examples
from tlpipe.params import load_params

pytestmark = pytest.mark.slow

ALL_EXAMPLES = sorted(p.parent.name for p in (REPO / "examples").glob("*/params.yaml"))


def _setting(name: str) -> str:
    return yaml.safe_load((REPO / "examples" / name / "params.yaml").read_text())["setting"]


# The text examples' data is cut from the bundled corpus; the image ones read the bundled digits.
EXAMPLES = [name for name in ALL_EXAMPLES if _setting(name) == "text-classification"]
IMAGE_EXAMPLES = [name for name in ALL_EXAMPLES if _setting(name) == "image-classification"]
GENERATION_EXAMPLES = [name for name in ALL_EXAMPLES if _setting(name) == "text-generation"]


def tiny(raw: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The example's data and transfer setup as they are; only sizes and budgets made tiny,
    and the shipped MiniLM swapped for a 2-layer checkpoint so every stage runs in seconds."""
    raw["prepare"]["split"].update({"train": 40, "val": 40, "test": 60})
    raw["validate"].update({"min_per_class": 2, "min_source_rows": 50})
    pre = raw["pretrain"]
    pre.update(
        {"init_from": str(checkpoint), "steps": min(pre["steps"], 8), "evaluations": 2, "max_length": 48}
    )
    pre["optim"].update({"lr": 1e-3})
    raw["finetune"].update({"max_length": 48, "epochs": 2, "min_steps": 4, "max_steps": 8, "evaluations": 2})
    raw["evaluate"].update(
        {
            "sizes": [20, 40],
            # Three seeds keep the gain's interval on tiny data inside the gate's reach.
            "seeds": [0, 1, 2],
            "gate_size": 40,
            "min_gain": -1.0,
            "forgetting_rows": 100,
            "scratch_models": [{"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}],
            "scratch_lrs": [3e-4, 1e-3],
        }
    )
    raw["export"]["batch_size"] = 16
    raw["publish"]["bucket"] = "tlpipe-test"
    return raw


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_every_example_is_listed_and_loads() -> None:
    assert EXAMPLES == ["different-labels", "target-only", "two-files", "unlabelled-source"]
    assert IMAGE_EXAMPLES == ["image-digits", "image-digits-imagenet"]
    assert GENERATION_EXAMPLES == ["text-generation"]
    for name in ALL_EXAMPLES:
        params = load_params(REPO / "examples" / name / "params.yaml")
        data = "data/examples/" if name in EXAMPLES else "data/raw/"
        assert all(p.startswith(data) for p in (params.data.target.path,)), name
        assert (REPO / "examples" / name / "README.md").is_file(), name


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_end_to_end(
    name: str,
    harness: None,
    tmp_path: Path,
    sample_csv: Path,
    pretrained: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.pipeline import pipeline
    from tlpipe.store import open_store

    raw = tiny(yaml.safe_load((REPO / "examples" / name / "params.yaml").read_text()), pretrained)
    root = make_project(tmp_path / "proj", sample_csv, raw)
    write_examples(root, rows=300)
    monkeypatch.chdir(root)
    monkeypatch.delenv("TLPIPE_S3_ENDPOINT", raising=False)
    params = load_params()

    state = pipeline(return_state=True)
    assert state.is_completed(), state.message

    summary = json.loads(Path("outputs/prepare/summary.json").read_text())
    validation = json.loads(Path("outputs/validate/report.json").read_text())
    pretrain = json.loads(Path("outputs/pretrain/metrics.json").read_text())
    metrics = json.loads(Path("outputs/evaluate/metrics.json").read_text())
    assert summary["source"] == validation["source"] == pretrain["source"] == params.data.source_kind
    assert validation["success"] and set(metrics["shipped"]["per_class"]) == set(params.data.labels)
    entry = metrics["curve"][0]
    assert {"transfer", "scratch", "reference", "gain"} <= set(entry)
    forgetting = metrics["forgetting"]
    if params.data.source_kind == "none":
        assert "source" not in validation["checks"] and pretrain["objective"] is None
        assert forgetting["probe_accuracy_before"] is None and forgetting["source_rows"] == 0
    elif params.data.source_kind == "unlabelled":
        assert pretrain["objective"] == "mlm" and forgetting["probe_accuracy_before"] is None
        assert forgetting["mlm_loss_after"] > 0
    else:
        assert pretrain["objective"] == "supervised" and 0 <= forgetting["probe_accuracy_after"] <= 1
    model_config = json.loads(Path("outputs/pretrain/model/config.json").read_text())
    if params.data.source_labels and params.data.source_labels != params.data.labels:
        # The source model classifies the source's own labels; the shipped one the target's.
        assert set(model_config["id2label"].values()) == set(params.data.source_labels)
    shipped = json.loads(Path("outputs/finetune/model/config.json").read_text())
    assert [shipped["id2label"][str(i)] for i in range(len(params.data.labels))] == list(params.data.labels)

    release = json.loads(Path("outputs/publish/release.json").read_text())
    assert f"/{params.publish.model_name}/" in release["uri"]
    with open_store("tlpipe-test", root=root / ".tlpipe/store") as store:
        prefix = release["uri"].split("/", 3)[3]
        manifest = json.loads(
            store.client.get_object(Bucket=store.bucket, Key=prefix + "manifest.json")["Body"].read()
        )
        assert {"model.onnx", "README.md"} <= set(manifest["files"])
    page = Path("outputs/report.html").read_text()
    assert ("Source: none" if params.data.source is None else f"Source ({params.data.source_kind}") in page


def tiny_image(raw: dict[str, Any]) -> dict[str, Any]:
    """The image example's data and transfer setup as they are; sizes, budgets and a CNN
    of its own made tiny (a packaged backbone stays as it is)."""
    raw["prepare"]["split"].update({"train": 40, "val": 40, "test": 60})
    raw["prepare"]["source_max_rows"] = 400
    raw["validate"].update({"min_per_class": 2, "min_source_rows": 50})
    if raw["pretrain"]["init_from"] is None:
        raw["pretrain"].update({"steps": 20, "evaluations": 2, "image": {"size": 16, "channels": 1}})
        raw["pretrain"]["cnn"]["widths"] = [8, 16]
    raw["finetune"].update({"epochs": 2, "min_steps": 4, "max_steps": 8, "evaluations": 2})
    raw["evaluate"].update({"sizes": [20, 40], "gate_size": 40, "min_gain": -1.0, "forgetting_rows": 100})
    raw["evaluate"]["scratch_lrs"] = [1e-3, 3e-3]
    raw["export"]["batch_size"] = 16
    # Eight steps leave the classifier near chance, where one of 60 test images changing its
    # label under int8 (1.7 points) decides the gate, and which one changes depends on the
    # CPU's kernels: the gate is tested in test_export; here int8 must ship and serve.
    raw["export"]["int8_max_drop"] = 1.0
    raw["publish"]["bucket"] = "tlpipe-test"
    return raw


@pytest.mark.parametrize("name", IMAGE_EXAMPLES)
def test_image_example_runs_end_to_end(
    name: str, harness: None, tmp_path: Path, sample_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundled digits through every stage of the flow: a CNN pretrained on MNIST (or
    the packaged ImageNet backbone) transferred to the UCI digits, exported with its
    preprocessor, published, served."""
    from typer.testing import CliRunner

    from flows.pipeline import pipeline
    from tlpipe.cli import app
    from tlpipe.images import encode_png
    from tlpipe.store import open_store

    raw = tiny_image(yaml.safe_load((REPO / "examples" / name / "params.yaml").read_text()))
    root = make_project(tmp_path / "proj", sample_csv, raw)
    monkeypatch.chdir(root)
    monkeypatch.delenv("TLPIPE_S3_ENDPOINT", raising=False)
    params = load_params()

    state = pipeline(return_state=True)
    assert state.is_completed(), state.message

    validation = json.loads(Path("outputs/validate/report.json").read_text())
    assert validation["success"] and "image_decodes" in validation["checks"]["train"]
    pretrain = json.loads(Path("outputs/pretrain/metrics.json").read_text())
    finetune = json.loads(Path("outputs/finetune/metrics.json").read_text())
    assert finetune["preprocessed"]["size"] == raw["pretrain"]["image"]["size"]
    if params.data.source is None:  # ImageNet's head is not the digits'
        assert pretrain["objective"] is None and finetune["head"] == "new"
    else:
        assert pretrain["objective"] == "supervised" and 0 <= pretrain["source_accuracy"] <= 1
        assert finetune["head"] == "transferred"
    metrics = json.loads(Path("outputs/evaluate/metrics.json").read_text())
    assert [e["rows"] for e in metrics["curve"]] == [20, 40]
    assert {"transfer", "scratch", "reference", "gain"} <= set(metrics["curve"][0])
    assert set(metrics["shipped"]["per_class"]) == set(params.data.labels)
    if params.data.source is None:
        assert metrics["forgetting"]["probe_accuracy_before"] is None
    else:
        assert 0 <= metrics["forgetting"]["probe_accuracy_after"] <= 1
    parity = json.loads(Path("outputs/export/parity.json").read_text())
    assert parity["argmax_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4

    release = json.loads(Path("outputs/publish/release.json").read_text())
    with open_store("tlpipe-test", root=root / ".tlpipe/store") as store:
        prefix = release["uri"].split("/", 3)[3]
        manifest = json.loads(
            store.client.get_object(Bucket=store.bucket, Key=prefix + "manifest.json")["Body"].read()
        )
    assert {"model.onnx", "model.int8.onnx", "preprocessor.json", "bundle.json"} <= set(manifest["files"])
    page = Path("outputs/report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # the curve, and the grid of test images
    assert "Image classifier" in Path("outputs/publish/README.md").read_text()

    folder = tmp_path / "to-predict" / "any"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"{i}.png").write_bytes(encode_png(np.full((8, 8), 40 * i, dtype=np.uint8)))
    command = ["predict", "--bundle", "outputs/export/bundle", "--input", str(folder.parent)]
    result = CliRunner().invoke(app, [*command, "--precision", "int8"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 5 and all(r["label"] in params.data.labels for r in rows)


def tiny_generation(raw: dict[str, Any]) -> dict[str, Any]:
    """The generation example's transfer setup as it is, on the sample's tweets (its
    airline tweets the target, the others the source); sizes, budgets and the model tiny."""
    for name in ("target", "source"):
        raw["data"][name].update({"path": "data/raw/sample.csv", "sha256": None})
    raw["prepare"]["split"].update({"train": 40, "val": 40, "test": 60})
    raw["validate"].update({"min_per_class": 2, "min_source_rows": 50})
    pre = raw["pretrain"]
    pre.update({"steps": 20, "evaluations": 2, "max_length": 32})
    pre["tokenizer"]["vocab_size"] = 500
    pre["lm"].update({"hidden_size": 32})
    raw["finetune"].update({"max_length": 32, "epochs": 2, "min_steps": 4, "max_steps": 8, "evaluations": 2})
    raw["evaluate"].update(
        {"sizes": [500, 1500], "gate_size": 1500, "min_gain": -1e9, "forgetting_rows": 100}
    )
    raw["evaluate"]["scratch_lrs"] = [2e-3, 5e-3]
    raw["export"]["batch_size"] = 16
    raw["publish"]["bucket"] = "tlpipe-test"
    return raw


@pytest.mark.parametrize("name", GENERATION_EXAMPLES)
def test_generation_example_runs_end_to_end(
    name: str, harness: None, tmp_path: Path, sample_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tweets to airline tweets through every stage of the flow: a byte-level BPE tokenizer
    and an LSTM trained on the source, fine-tuned on the target, its curve over target
    tokens, exported with its state, published and generating without torch."""
    from typer.testing import CliRunner

    from flows.pipeline import pipeline
    from tlpipe.cli import app
    from tlpipe.store import open_store

    raw = tiny_generation(yaml.safe_load((REPO / "examples" / name / "params.yaml").read_text()))
    root = make_project(tmp_path / "proj", sample_csv, raw)
    monkeypatch.chdir(root)
    monkeypatch.delenv("TLPIPE_S3_ENDPOINT", raising=False)

    state = pipeline(return_state=True)
    assert state.is_completed(), state.message

    validation = json.loads(Path("outputs/validate/report.json").read_text())
    assert validation["success"] and {"text_length", "min_rows"} <= set(validation["checks"]["train"])
    assert "no_leakage" in validation["checks"]["all"]
    pretrain = json.loads(Path("outputs/pretrain/metrics.json").read_text())
    assert pretrain["objective"] == "causal_lm" and pretrain["vocab_size"] <= 500
    metrics = json.loads(Path("outputs/evaluate/metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and not metrics["higher_is_better"]
    # Each size draws texts until their tokens reach it.
    assert [e["size"] for e in metrics["curve"]] == [500, 1500]
    assert all(e["size"] <= e["units"] < e["size"] + 200 for e in metrics["curve"])
    assert {"transfer", "scratch", "reference", "gain"} <= set(metrics["curve"][0])
    assert metrics["baseline"]["predictor"] == "unigram model"
    assert 1 < metrics["shipped"]["perplexity"] < 500 and len(metrics["shipped"]["samples"]) == 4
    forgetting = metrics["forgetting"]
    assert forgetting["perplexity_before"] > 1 and forgetting["perplexity_after"] > 1
    runs = Path("outputs/evaluate/runs")
    assert json.loads((runs / "scratch-1500-seed0.json").read_text())["examples"]
    parity = json.loads(Path("outputs/export/parity.json").read_text())
    assert parity["argmax_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
    assert parity["greedy"]["prompts"] == 8 and not parity["greedy"]["differ"]

    release = json.loads(Path("outputs/publish/release.json").read_text())
    with open_store("tlpipe-test", root=root / ".tlpipe/store") as store:
        prefix = release["uri"].split("/", 3)[3]
        manifest = json.loads(
            store.client.get_object(Bucket=store.bucket, Key=prefix + "manifest.json")["Body"].read()
        )
    assert {"model.onnx", "model.int8.onnx", "tokenizer.json", "bundle.json"} <= set(manifest["files"])
    page = Path("outputs/report.html").read_text()
    assert "Kneser-Ney" in page and "transfer" in page and "Forgetting (source text)" in page
    assert "Language model" in Path("outputs/publish/README.md").read_text()

    command = ["generate", "--bundle", "outputs/export/bundle", "--prompt", "@united my bag", "--seed", "1"]
    first, again = (CliRunner().invoke(app, [*command, "--top-k", "20"]) for _ in range(2))
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("@united my bag") and first.stdout == again.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("@JetBlue thanks\n@united flight\n")
    result = CliRunner().invoke(
        app, ["predict", "--bundle", "outputs/export/bundle", "--input", str(prompts)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["@JetBlue thanks", "@united flight"]
