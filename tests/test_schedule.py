"""Scheduled runs on a real Prefect server: `tlpipe schedule` registers the flow as a
deployment and serves it; runs started through the deployment skip what DVC finds fresh,
publish only what changed, and move `production` only through the promotion gates."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pytest
import yaml

from tests.conftest import (
    AIRLINES,
    SERVER_START_TIMEOUT_S,
    background,
    embedded_store,
    free_port,
    make_project,
    tail,
    tiny_params,
    wait_healthy,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]

BIN = Path(sys.executable).parent
STAGES = ("prepare", "validate", "pretrain", "finetune", "evaluate", "export", "publish")
DEPLOYMENT = "tlpipe-nightly"
MODEL = "releases/tiny"
RUN_TIMEOUT_S = 900.0


def _wait_deployment(client: Any, proc: subprocess.Popen, log: Path) -> Any:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"tlpipe schedule exited ({proc.returncode}):\n{tail(log)}"
        with contextlib.suppress(ObjectNotFound):
            return client.read_deployment_by_name(f"tlpipe/{DEPLOYMENT}")
        time.sleep(0.5)
    pytest.fail(f"no deployment tlpipe/{DEPLOYMENT} after {SERVER_START_TIMEOUT_S:.0f} s:\n{tail(log)}")


def _run(client: Any, proc: subprocess.Popen, log: Path) -> tuple[Any, float]:
    """Start a run through the deployment, as a schedule would, and wait for the served
    runner to finish it: (the final flow run, seconds from the trigger to its final state)."""
    from prefect.deployments import run_deployment

    start = time.monotonic()
    run_id: UUID = run_deployment(f"tlpipe/{DEPLOYMENT}", timeout=0).id
    while time.monotonic() - start < RUN_TIMEOUT_S:
        assert proc.poll() is None, f"tlpipe schedule exited ({proc.returncode}):\n{tail(log)}"
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run, time.monotonic() - start
        time.sleep(1)
    pytest.fail(f"flow run {run_id} not final after {RUN_TIMEOUT_S:.0f} s:\n{tail(log)}")


def _stage_states(client: Any, run: Any) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    states = {r.name.rsplit("-", 1)[0]: r.state.name for r in found}
    return {stage: states[stage] for stage in STAGES}


def _ran(states: dict[str, str]) -> set[str]:
    """The stages that computed (the flow names a stage DVC finds fresh `Skipped`)."""
    assert set(states.values()) <= {"Completed", "Skipped"}, states
    return {stage for stage, name in states.items() if name != "Skipped"}


def _lock(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def _inputs(entry: dict[str, Any]) -> tuple[Any, Any]:
    """What a stage's lock entry records it ran on: its deps' hashes and its params."""
    return sorted((d["path"], d.get("md5")) for d in entry.get("deps", [])), entry.get("params")


def _registry(store: Any) -> tuple[dict[str, tuple[str, ...]], dict[str, Any]]:
    """(every complete release version with its aliases, the aliases) on the store now."""
    from tlpipe.registry import list_versions, read_alias

    versions = {v.version: v.aliases for v in list_versions(store, MODEL)}
    return versions, {name: read_alias(store, MODEL, name) for name in ("candidate", "production")}


def _edit_target_rows(csv_path: Path, count: int) -> None:
    """Append a word to the text of `count` target (airline) rows: prepare's target splits
    change, the row counts and labels stay as they were."""
    frame = pd.read_csv(csv_path, dtype=str)
    target = frame.index[frame["text"].str.contains(AIRLINES, case=False, regex=True, na=False)]
    frame.loc[target[:count], "text"] = frame.loc[target[:count], "text"] + " again"
    frame.to_csv(csv_path, index=False, quoting=csv.QUOTE_ALL)


def test_scheduled_runs_publish_once_then_only_what_changed(tmp_path: Path, sample_csv: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tlpipe.registry import check_version
    from tlpipe.stages import stale_stages

    project = make_project(tmp_path / "proj", sample_csv, tiny_params())
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # A daily schedule twelve hours away: the server's scheduler fills in its runs, and
    # none of them comes due while the runs this test starts are going.
    hour = (datetime.now(UTC) + timedelta(hours=12)).hour
    cron = f"0 {hour} * * *"
    base = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_log, schedule_log = tmp_path / "server.log", tmp_path / "schedule.log"
    timeline: list[tuple[str, float]] = []
    clock = time.monotonic()
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    try:
        with (
            embedded_store("tlpipe-test", tmp_path / "store") as store,
            background([*server_cmd, "--no-ui"], server_log, env=base) as server,
        ):
            wait_healthy(api, server, server_log)
            timeline.append(("prefect server healthy", time.monotonic() - clock))
            env = {
                **base,
                **store.env,
                "PREFECT_API_URL": api,
                # The runner looks for due runs every 2 s (10 by default): the timeline then
                # measures the runs rather than the polling.
                "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            }
            schedule_cmd = [str(BIN / "tlpipe"), "schedule", "--cron", cron, "--name", DEPLOYMENT]
            clock = time.monotonic()
            with (
                background(schedule_cmd, schedule_log, cwd=project, env=env) as scheduler,
                temporary_settings(updates={PREFECT_API_URL: api}),
                get_client(sync_client=True) as client,
            ):
                deployment = _wait_deployment(client, scheduler, schedule_log)
                timeline.append(("deployment registered", time.monotonic() - clock))
                assert deployment.parameters == {"params_file": None, "overrides": None}
                assert [s.schedule.cron for s in deployment.schedules] == [cron]
                # The server's scheduler fills in the cron's own runs, each at its hour.
                clock = time.monotonic()
                upcoming = _upcoming(client, deployment.id, server_log)
                timeline.append(("cron's runs scheduled by the server's scheduler", time.monotonic() - clock))
                assert all(r.auto_scheduled for r in upcoming)
                starts = {r.expected_start_time.astimezone(UTC) for r in upcoming}
                assert {(t.hour, t.minute) for t in starts} == {(hour, 0)}, starts

                # Run 1: every stage computes, the release is signed, both aliases name it.
                first, seconds = _run(client, scheduler, schedule_log)
                timeline.append(("run 1 (first)", seconds))
                assert first.state.is_completed(), f"{first.state.message}\n{tail(schedule_log)}"
                assert _ran(_stage_states(client, first)) == set(STAGES)
                assert first.parameters == deployment.parameters
                release = json.loads((project / "outputs/publish/release.json").read_text())
                v1 = release["version"]
                check_version(store, MODEL, v1)  # complete, its signature good
                versions, aliases = _registry(store)
                assert versions == {v1: ("candidate", "production")}
                assert all(a.version == v1 and a.sequence == 1 for a in aliases.values()), aliases

                # Run 2, nothing changed: no stage computes, nothing is published or moved.
                lock_text = (project / "dvc.lock").read_text()
                second, seconds = _run(client, scheduler, schedule_log)
                timeline.append(("run 2 (nothing changed)", seconds))
                assert second.state.is_completed(), f"{second.state.message}\n{tail(schedule_log)}"
                assert _ran(_stage_states(client, second)) == set()
                assert (project / "dvc.lock").read_text() == lock_text
                assert _registry(store) == (versions, aliases)

                # Run 3, after a change to the target data: what DVC finds stale now, and each
                # stage whose inputs that change reaches, computes; the others are skipped.
                _edit_target_rows(project / "data/raw/sample.csv", 10)
                with contextlib.chdir(project):  # DVC names stages relative to where it runs
                    stale = set(stale_stages())
                before = _lock(project)
                third, seconds = _run(client, scheduler, schedule_log)
                ran = _ran(_stage_states(client, third))
                after = _lock(project)
                reached = {stage for stage in STAGES if _inputs(before[stage]) != _inputs(after[stage])}
                timeline.append(("run 3 (target data changed)", seconds))
                timeline.append((f"  ran {', '.join(s for s in STAGES if s in ran)}", 0.0))
                assert stale == {"prepare"}, stale
                assert ran == reached | stale, (ran, reached)
                # The edit left the source rows as they were: pretrain, which reads only them
                # (and validation's verdict), had nothing new to learn from.
                assert "pretrain" not in ran
                with contextlib.chdir(project):
                    assert not stale_stages(), "a stage was left stale"
                assert "publish" in ran
                v3 = json.loads((project / "outputs/publish/release.json").read_text())["version"]
                assert v3 != v1
                check_version(store, MODEL, v3)
                versions, aliases = _registry(store)
                assert set(versions) == {v1, v3}
                assert (aliases["candidate"].version, aliases["candidate"].sequence) == (v3, 2)
                gates = json.loads((project / "outputs/publish/gates.json").read_text())
                assert gates["version"] == v3 and gates["promote"]
                if gates["passed"]:
                    assert third.state.is_completed(), third.state.message
                    assert (aliases["production"].version, aliases["production"].sequence) == (v3, 2)
                    assert gates["production"] == {"before": v1, "after": v3, "moved": True}
                else:
                    # The release is kept as candidate; the run fails so that its owner hears of it.
                    assert third.state.is_failed() and "production was not moved" in third.state.message
                    assert (aliases["production"].version, aliases["production"].sequence) == (v1, 1)
                    assert gates["production"] == {"before": v1, "after": v1, "moved": False}
                    assert gates["held"]
                timeline.append((f"  gates {'passed' if gates['passed'] else 'held production'}", 0.0))
    finally:
        _print_timeline(timeline)


def _print_timeline(timeline: list[tuple[str, float]]) -> None:
    print("\nscheduled runs on a real Prefect server, seconds from start or trigger to done:")
    for what, seconds in timeline:
        print(f"  {what:66s} {seconds:7.1f}" if seconds else f"  {what}")


def _upcoming(client: Any, deployment_id: UUID, server_log: Path) -> list[Any]:
    """The deployment's scheduled runs, once the server's scheduler service has made them."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
        )
        if found:
            return found
        time.sleep(1)
    waited = f"{SERVER_START_TIMEOUT_S:.0f} s"
    pytest.fail(f"the server scheduled no run of the deployment in {waited}:\n{tail(server_log)}")
