"""End to end: the Prefect flow on a real DVC project, publishing to a real SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from tests.conftest import make_project, tiny_params
from tlpipe.cli import app
from tlpipe.workspace import run_plan

runner = CliRunner()

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


def _artifact_texts(flow_state) -> list[bytes]:
    """Every Prefect artifact the flow run recorded, as bytes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch():
        async with get_client() as client:
            run_id = flow_state.state_details.flow_run_id
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            return [str(a.data).encode() + str(a.description or "").encode() for a in found]

    import asyncio

    return asyncio.run(fetch())


def _task_run_names(flow_state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
            )
            return [r.name for r in runs]

    import asyncio

    return asyncio.run(fetch())


def _secrets(project: Path) -> set[bytes]:
    """The embedded store's secret key and the signing key's private half, as stored."""
    identity = json.loads((project / ".tlpipe/store/s3.json").read_text())["identities"][0]
    pem = Path(os.environ["TLPIPE_SIGNING_KEY"]).read_text().splitlines()
    return {identity["credentials"][0]["secretKey"].encode(), "".join(pem[1:-1]).encode()}


@pytest.mark.faults  # its secret scan
def test_whole_flow_then_noop_rerun(harness: None, project: Path) -> None:
    from flows.pipeline import pipeline
    from tlpipe.registry import read_alias
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
    assert {"shipped", "curve", "gate", "gain", "forgetting"} <= set(metrics)
    # The curve ran as separate task runs: 3 sizes x 2 seeds x (transfer, scratch, reference),
    # the reference at "all" once.
    points = [name for name in _task_run_names(state) if name.startswith("curve-") and "seed" in name]
    assert len(points) == 17 and {"curve-transfer-20-seed0", "curve-reference-20-seed0"} <= set(points)
    # Before them, the scratch control's grid (two learning rates), each its own task run.
    tuning = [name for name in _task_run_names(state) if name.startswith("curve-tune-scratch-40-lr")]
    assert len(tuning) == 2
    assert len(list(Path("outputs/evaluate/runs").glob("*.json"))) == 17 + 2
    # Every stage that trained finished, so none left a state to resume from.
    assert not list(Path(".tlpipe/resume").glob("*/*/*")), list(Path(".tlpipe/resume").rglob("*"))
    page = Path("outputs/report.html").read_text()
    assert "Data-efficiency curve" in page and "data:image/png;base64," in page and "Lineage" in page

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
        # The first release: both aliases name it, each move signed and recorded.
        for alias in ("candidate", "production"):
            named = read_alias(store, "releases/tiny", alias)
            assert named is not None and named.version == release["version"] and named.sequence == 1
        assert release["aliases"] == ["candidate", "production"]
        # No secret leaves where it is kept: the store's secret key and the signing key's
        # private half are in no output, record, Prefect artifact or object.
        secrets = _secrets(project)
        seen = _artifact_texts(state)
        assert seen, "the run recorded no Prefect artifact"
        files = [p for root in ("outputs", ".tlpipe/logs") for p in Path(root).rglob("*") if p.is_file()]
        seen += [p.read_bytes() for p in [*files, Path("dvc.lock"), Path("params.yaml")]]
        paginator = store.client.get_paginator("list_objects_v2")
        keys = [
            o["Key"] for page in paginator.paginate(Bucket=store.bucket) for o in page.get("Contents", [])
        ]
        seen += [store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read() for key in keys]
        assert len(keys) > 10 and not [s for s in secrets for body in seen if s in body]

    first_lock = Path("dvc.lock").read_text()
    again = pipeline(return_state=True)
    assert again.is_completed()
    states = _task_states(again)
    assert all(states[s] == "Skipped" for s in STAGES), states
    assert Path("dvc.lock").read_text() == first_lock

    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    assert status.output.count("up to date") == len(STAGES)
    assert f"last published: {release['uri']}" in status.output
    # From the command line, a run with nothing stale starts no flow at all.
    noop = runner.invoke(app, ["run"])
    assert noop.exit_code == 0, noop.output
    assert "every stage is up to date; nothing to run" in noop.output
    assert Path("dvc.lock").read_text() == first_lock

    # Other params, the working tree left as it is: a workspace of its own, where the stages
    # whose inputs did not change are restored from the shared DVC cache, not run again.
    evaluated = Path("outputs/evaluate/metrics.json").read_text()
    params_text = Path("params.yaml").read_text()
    other = pipeline(overrides={"evaluate.seeds": [3, 4]}, return_state=True)
    assert other.is_completed(), other.message
    states = _task_states(other)
    restored = ("prepare", "validate", "pretrain", "finetune", "export")
    assert all(states[s] == "Skipped" for s in restored), states
    assert states["evaluate"] != "Skipped" and states["publish"] != "Skipped", states
    ws = run_plan(project, None, {"evaluate.seeds": [3, 4]}).workspace
    assert ws is not None
    runs = {p.stem for p in (ws / "outputs/evaluate/runs").glob("*.json")}
    assert "transfer-20-seed3" in runs and not any(r.endswith("seed0") for r in runs)
    assert (ws / "outputs/report.html").is_file()
    assert json.loads((ws / "outputs/publish/release.json").read_text())["version"] != release["version"]
    assert Path("dvc.lock").read_text() == first_lock
    assert Path("params.yaml").read_text() == params_text
    assert Path("outputs/evaluate/metrics.json").read_text() == evaluated

    # One changed param: `--only` re-runs that stage alone and leaves the next one stale.
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["evaluate"]["min_gain"] = -0.5
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    only = runner.invoke(app, ["run", "--only", "evaluate"])
    assert only.exit_code == 0, only.output
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    assert lock["evaluate"]["params"]["params.yaml"]["evaluate"]["min_gain"] == -0.5
    status = runner.invoke(app, ["status"])
    assert "evaluate  up to date" in status.output and "publish   stale" in status.output


def _curve_records() -> dict[str, dict]:
    """Each curve run's record as evaluate kept it, less its wall time."""
    return {
        path.stem: {k: v for k, v in json.loads(path.read_text()).items() if k != "train_seconds"}
        for path in Path("outputs/evaluate/runs").glob("*.json")
    }


def test_the_curve_on_a_dask_cluster_matches_the_process_pool(harness: None, project: Path) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    from flows.pipeline import pipeline
    from flows.runners import curve_runner

    pooled = pipeline(return_state=True)
    assert pooled.is_completed(), pooled.message
    on_the_pool = _curve_records()
    # evaluate stale again, nothing before it: the same curve, now on two Dask workers.
    shutil.rmtree("outputs/evaluate")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        dasked = pipeline.with_options(task_runner=curve_runner(address=cluster.scheduler_address))(
            return_state=True
        )
        workers = set(cluster.scheduler_info["workers"])
    assert dasked.is_completed(), dasked.message
    states = _task_states(dasked)
    assert all(states[s] == "Skipped" for s in ("prepare", "validate", "pretrain", "finetune", "export"))
    # Each of the 17 curve runs and 2 tuning runs arrived exactly once, and the Dask workers ran them.
    names = [n for n in _task_run_names(dasked) if n.startswith("curve-") and not n.startswith("curve-plan")]
    assert len(names) == len(set(names)) == 19, names
    assert sum(task["key"].startswith("curve") for task in stream.data) == 19, stream.data
    assert len(workers) == 2 and {task["worker"] for task in stream.data} == workers
    # Same seeds, one thread each: the same rows, steps and scores as on the process pool.
    assert _curve_records() == on_the_pool


TEXT, LABEL = "source.text: expect_column_", "source.label: expect_column_"
BAD_ROWS = {
    # rule: (a row appended to the source part of the CSV, the words the failure must name)
    "text_not_null": ('"negative","0.9",""', TEXT + "values_to_not_be_null"),
    "text_not_blank": ('"negative","0.9","   "', TEXT + "values_to_match_regex"),
    "text_too_short": ('"negative","0.9","ok"', TEXT + "value_lengths_to_be_between"),
    "text_too_long": (f'"negative","0.9","{"a" * 500}"', TEXT + "value_lengths_to_be_between"),
    "label_not_in_set": ('"furious","0.9","a perfectly fine text"', LABEL + "values_to_be_in_set"),
    "label_null": ('"","0.9","another perfectly fine text"', LABEL + "values_to_not_be_null"),
}
BAD_PARAMS = {
    "min_per_class": ({"min_per_class": 1000}, "expect_column_values_to_be_between (min_per_class)"),
    "min_source_rows": ({"min_source_rows": 100000}, "expect_table_row_count_to_be_between"),
}


def _run_failing() -> str:
    """Run the flow; it must fail. Returns the failure message."""
    from flows.pipeline import pipeline

    state = pipeline(return_state=True)
    assert state.is_failed()
    return state.message


def _assert_stopped_at_validate(project: Path, message: str, words: str) -> None:
    assert "validation failed" in message and words in message, message
    assert not Path("outputs/pretrain").exists()
    assert not Path("outputs/publish").exists()
    assert not (project / ".tlpipe/store").exists()  # nothing was published
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"] if Path("dvc.lock").exists() else {}
    assert "validate" not in lock and "pretrain" not in lock


@pytest.mark.faults
@pytest.mark.parametrize("rule", sorted(BAD_ROWS))
def test_each_bad_row_rule_stops_the_run(harness: None, project: Path, rule: str) -> None:
    row, words = BAD_ROWS[rule]
    csv = Path("data/raw/sample.csv")
    csv.write_text(csv.read_text() + row + "\n")
    message = _run_failing()
    _assert_stopped_at_validate(project, message, words)
    assert "— 1 of " in message  # exactly the one bad row is counted


@pytest.mark.parametrize("rule", sorted(BAD_PARAMS))
def test_each_count_rule_stops_the_run(harness: None, project: Path, rule: str) -> None:
    change, words = BAD_PARAMS[rule]
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["validate"].update(change)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _assert_stopped_at_validate(project, _run_failing(), words)


@pytest.mark.faults
def test_command_line_exits_non_zero_naming_the_rule_then_publishes_once_the_data_is_fixed(
    project: Path,
) -> None:
    csv = Path("data/raw/sample.csv")
    good = csv.read_text()
    csv.write_text(good + BAD_ROWS["text_too_short"][0] + "\n")
    tlpipe = Path(sys.executable).parent / "tlpipe"
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    out = subprocess.run([str(tlpipe), "run"], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "validation failed" in out.stderr and BAD_ROWS["text_too_short"][1] in out.stderr
    assert not Path("outputs/pretrain").exists() and not (project / ".tlpipe/store").exists()
    # The failure once, no traceback; the traceback in the log file the last line names.
    assert "Traceback" not in out.stderr and out.stderr.count("validation failed") == 1, out.stderr
    assert "see outputs/validate/report.json" in out.stderr
    # The log file named, then the real cause, last.
    lines = out.stderr.strip().splitlines()
    failed_at = max(i for i, line in enumerate(lines) if line.startswith("tlpipe: run failed after "))
    named = lines[failed_at - 1]
    assert named.startswith("tlpipe: tracebacks in ") and "validation failed" in lines[failed_at], lines[-3:]
    assert "see outputs/validate/report.json" in "\n".join(lines[failed_at:])
    log_file = project / named.split()[3]
    assert "Traceback" in log_file.read_text() and "GateFailed: validation failed" in log_file.read_text()

    # The fault cleared, the next run completes and publishes exactly one version.
    csv.write_text(good)
    again = subprocess.run([str(tlpipe), "run"], cwd=project, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    # Each stage's result in one short line.
    lines = again.stderr.splitlines()
    done = {line.split(" done: ")[0].split()[-1]: line for line in lines if " done: " in line}
    assert set(done) == {"prepare", "validate", "pretrain", "finetune", "evaluate", "export", "publish"}, done
    assert all(len(line) < 400 for line in done.values()), done
    from tlpipe.registry import list_versions, read_alias
    from tlpipe.store import open_store

    with open_store("tlpipe-test", root=project / ".tlpipe/store") as store:
        (only,) = list_versions(store, "releases/tiny")
        assert only.aliases == ("candidate", "production")
        assert read_alias(store, "releases/tiny", "production").sequence == 1
    # No secret in what the command line printed, its log files, or Prefect's own records
    # (its database of run logs and states, and any result it stored, under PREFECT_HOME).
    kept = [p for root in (".tlpipe/logs", ".prefect") for p in (project / root).rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in kept) and any(p.name.startswith("prefect.db") for p in kept), kept
    seen = [p.read_bytes() for p in kept] + [(run.stdout + run.stderr).encode() for run in (out, again)]
    assert not [s for s in _secrets(project) for body in seen if s in body]


def _proc(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:  # gone meanwhile
        return ""


def _descendants(pid: int) -> list[int]:
    children = [int(c) for c in _proc(pid, "task/" + str(pid) + "/children").split()]
    return [d for c in children for d in (c, *_descendants(c))]


def _servers(pid: int) -> list[int]:
    return [c for c in _descendants(pid) if "uvicorn" in _proc(c, "cmdline")]


def _alive(pid: int) -> bool:
    stat = _proc(pid, "stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.faults
def test_sigterm_stops_the_run_and_its_api_server(project: Path) -> None:
    """A scheduler stopping a run with SIGTERM: tlpipe exits non-zero, leaves no Prefect API
    server running, and publishes nothing."""
    tlpipe = Path(sys.executable).parent / "tlpipe"
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    log = (project / "run.log").open("w")
    proc = subprocess.Popen([str(tlpipe), "run"], cwd=project, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        servers: list[int] = []
        while not servers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            servers = _servers(proc.pid)
        assert servers, "the flow's API server never started"
        while not Path("outputs/prepare").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # a stage is running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) != 0
    finally:
        proc.kill()
        proc.wait()
        log.close()
    time.sleep(1)
    assert not [s for s in servers if _alive(s)], "the API server outlived the run"
    assert not Path("outputs/publish").exists() and not (project / ".tlpipe/store").exists()


def test_missing_column_stops_the_run(harness: None, project: Path) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["target"]["columns"]["text"] = "tweet"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "['tweet'] not found" in _run_failing()
    assert not Path("outputs/validate").exists() and not (project / ".tlpipe/store").exists()


@pytest.mark.faults
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


@pytest.mark.faults
def test_an_export_failing_beside_the_curve_fails_the_run_and_publishes_nothing(
    harness: None, project: Path
) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["export"]["max_abs_diff"] = 1e-30
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    message = _run_failing()
    parity = json.loads(Path("outputs/export/parity.json").read_text())
    if parity["max_abs_diff"] == 0.0:
        pytest.skip("onnxruntime matched PyTorch bit for bit: nothing for the parity gate to fail on")
    assert "exceeds export.max_abs_diff" in message, message
    # The curve ran to its end beside it, and evaluate was recorded; export and publish were not.
    assert Path("outputs/evaluate/metrics.json").is_file()
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    assert "evaluate" in lock and "export" not in lock and "publish" not in lock
    assert not Path("outputs/publish").exists() and not (project / ".tlpipe/store").exists()


@pytest.mark.faults
@pytest.mark.parametrize(
    ("failure", "attempts"),
    [("refused", 1), ("bad-bucket", 1), ("unreachable", 3), ("throttled", 3)],
)
def test_publish_retries_only_what_a_retry_can_fix(
    harness: None, failure: str, attempts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 403 or a bucket name the server rejects fails at once; no connection or a 503
    SlowDown is tried again (the flow's own publish task, its delays set to zero)."""
    from botocore.exceptions import ClientError, EndpointConnectionError
    from prefect import flow

    import flows.pipeline as pipeline
    from tlpipe.errors import StoreError

    causes = {
        "refused": ClientError(
            {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put"
        ),
        "bad-bucket": ClientError(
            {"Error": {"Code": "InvalidBucketName"}, "ResponseMetadata": {"HTTPStatusCode": 400}}, "Head"
        ),
        "unreachable": EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        "throttled": ClientError(
            {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Put"
        ),
    }
    calls: list[str] = []

    def failing(stage: str) -> None:
        calls.append(stage)
        raise StoreError(f"cannot upload: {failure}") from causes[failure]

    monkeypatch.setattr(pipeline, "_run_stage", failing)
    publish = pipeline.publish.with_options(retry_delay_seconds=0)

    @flow
    def only_publish() -> None:
        publish()

    state = only_publish(return_state=True)
    assert state.is_failed()
    assert calls == ["publish"] * attempts
