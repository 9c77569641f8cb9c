"""End to end: the Prefect flow on a real DVC project, publishing to a real SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tests.conftest import make_project, tiny_params

pytestmark = pytest.mark.slow

STAGES = ("prepare", "validate", "pretrain", "finetune", "evaluate", "export", "publish")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path: Path, sample_csv: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path / "proj", sample_csv, tiny_params())
    monkeypatch.chdir(root)
    monkeypatch.delenv("TLPIPE_S3_ENDPOINT", raising=False)
    return root


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
            )
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    import asyncio

    return asyncio.run(fetch())


def test_whole_flow_then_noop_rerun(harness: None, project: Path) -> None:
    from flows.pipeline import pipeline
    from tlpipe.store import open_store

    state = pipeline(return_state=True)
    assert state.is_completed(), state.message
    for stage in STAGES[:-1]:
        assert Path("outputs", stage).is_dir(), stage
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    assert lock["finetune"]["params"]["params.yaml"]["finetune"]["epochs"] == 2

    parity = json.loads(Path("outputs/export/parity.json").read_text())
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    metrics = json.loads(Path("outputs/evaluate/metrics.json").read_text())
    assert {"transfer", "scratch", "gain"} <= set(metrics)

    release = json.loads(Path("outputs/publish/release.json").read_text())
    with open_store("tlpipe-test", root=project / ".tlpipe/store") as store:
        prefix = release["uri"].split("/", 3)[3]
        manifest = json.loads(
            store.client.get_object(Bucket=store.bucket, Key=prefix + "manifest.json")["Body"].read()
        )
        assert {"model.onnx", "tokenizer.json", "bundle.json", "metrics.json", "README.md"} <= set(
            manifest["files"]
        )
        for name, entry in manifest["files"].items():
            body = store.client.get_object(Bucket=store.bucket, Key=prefix + name)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"], name
        assert manifest["dvc_lock"]["finetune"]
        cache = store.client.list_objects_v2(Bucket=store.bucket, Prefix="dvc-cache/")
        assert cache.get("KeyCount", 0) > 0
        latest = json.loads(
            store.client.get_object(Bucket=store.bucket, Key="releases/tiny/latest.json")["Body"].read()
        )
        assert latest["version"] == release["version"]

    first_lock = Path("dvc.lock").read_text()
    again = pipeline(return_state=True)
    assert again.is_completed()
    states = _task_states(again)
    assert all(states[s] == "Skipped" for s in STAGES), states
    assert Path("dvc.lock").read_text() == first_lock


def test_bad_data_stops_before_pretrain(harness: None, project: Path) -> None:
    from flows.pipeline import pipeline

    csv = Path("data/raw/sample.csv")
    csv.write_text(csv.read_text() + 'negative,0.9,\n"positive",0.9,"ok"\n')
    state = pipeline(return_state=True)
    assert state.is_failed()
    report = json.loads(Path("outputs/validate/report.json").read_text())
    assert report["success"] is False
    assert not Path("outputs/pretrain").exists()
    assert not Path("outputs/publish").exists()
    assert not (project / ".tlpipe/store").exists()  # nothing was published
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    assert "validate" not in lock and "pretrain" not in lock
    assert os.environ.get("TLPIPE_S3_ENDPOINT") is None
