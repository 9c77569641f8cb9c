"""prefect.yaml's deployments and the Dockerfile they run: read by Prefect's own loader
and checked against each work pool type's own job template; nothing is built or deployed."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest
from packaging.specifiers import SpecifierSet
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.importtools import import_object
from prefect.utilities.templating import apply_values
from prefect.workers.process import ProcessWorker
from prefect_docker.worker import DockerWorker
from prefect_kubernetes.worker import KubernetesWorker
from rich.console import Console

from tests.conftest import prefect_server

REPO = Path(__file__).resolve().parent.parent
# Each deployment's work pool, by the worker type that serves it.
WORKERS = {
    "tlpipe-process": ProcessWorker,
    "tlpipe-docker": DockerWorker,
    "tlpipe-kubernetes": KubernetesWorker,
}
IMAGE_ROOT = "/opt/tlpipe"


def deployments(pwd: Path = REPO) -> list[dict[str, Any]]:
    """prefect.yaml as `prefect deploy` run in `pwd` reads it, env placeholders resolved as
    there; the loader prints what it skips, so a clean read prints nothing."""
    printed = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(REPO / "prefect.yaml", console=Console(file=printed))
    assert printed.getvalue() == "", printed.getvalue()
    assert actions == {"build": [], "push": [], "pull": None}  # nothing to build here
    # Placeholders of the environment ({{ $PWD }}) are read from os.environ itself.
    with mock.patch.dict(os.environ, {"PWD": str(pwd)}):
        return [apply_values(c, {}, remove_notset=False) for c in configs]


def test_one_deployment_per_work_pool_type() -> None:
    assert [d["name"] for d in deployments()] == list(WORKERS)


@pytest.mark.parametrize("config", deployments(), ids=lambda c: c["name"])
def test_a_deployment_runs_the_flow_with_its_parameters_on_its_schedule(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(config["entrypoint"])
    assert flow.name == "tlpipe"
    assert flow.validate_parameters(config["parameters"]) == {"params_file": None, "overrides": None}
    for schedule in config["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    # The job's variables are ones its worker type takes, with values of the right types.
    variables = WORKERS[config["work_pool"]["name"]].get_default_base_job_template()["variables"]
    job = config["work_pool"]["job_variables"]
    assert set(job) <= set(variables["properties"]), set(job) - set(variables["properties"])
    jsonschema.validate(job, variables)
    # The pull step exists and lands where the project is: this folder, or the image's.
    ((step, args),) = [next(iter(s.items())) for s in config["pull"]]
    assert callable(import_object(step))
    directory = Path(args["directory"])
    if config["work_pool"]["name"] == "tlpipe-process":
        assert directory == REPO and (directory / "dvc.yaml").is_file()
    else:
        assert str(directory) == IMAGE_ROOT
        assert job["image"].split("/")[-1].startswith("tlpipe:")
    for volume in job.get("volumes", []):
        name, _, mount = volume.partition(":")
        assert name and mount.startswith(f"{IMAGE_ROOT}/"), volume


def test_the_image_holds_the_project_and_its_locked_environment() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    base = next(line for line in instructions if line.startswith("FROM "))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    version = re.search(r"python:(\d+\.\d+)", base).group(1)  # type: ignore[union-attr]
    assert SpecifierSet(requires).contains(f"{version}.0"), (base, requires)
    assert f"WORKDIR {IMAGE_ROOT}" in instructions
    for line in instructions:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            assert all((REPO / s).exists() for s in sources), line
        if line.startswith("RUN ") and "uv sync" in line:
            assert "--frozen" in line and "--no-dev" in line, line
    assert any(line.startswith("ENV PATH=/opt/tlpipe/.venv/bin:") for line in instructions)
    # What a build context must not carry: this machine's environment, outputs and state.
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv/", "outputs/", ".tlpipe/", ".dvc/cache/"} <= ignored


@pytest.mark.slow
def test_prefect_deploy_registers_every_deployment_on_a_real_server(tmp_path: Path) -> None:
    """`prefect deploy --all` from a copy of the project, against a real `prefect server
    start` holding a work pool of each type: every deployment arrives with its schedule,
    parameters, pool, job variables and pull step."""
    from prefect.client.orchestration import get_client

    project = tmp_path / "project"
    for name in ("tasks", "tlpipe", "flows"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prefect.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, project / name)
    prefect = str(Path(sys.executable).parent / "prefect")
    with prefect_server(tmp_path) as (api, env):
        env = {**env, "PWD": str(project)}
        for pool, worker in WORKERS.items():
            made = subprocess.run(
                [prefect, "work-pool", "create", pool, "--type", worker.type],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
            )
            assert made.returncode == 0, made.stdout + made.stderr
        deployed = subprocess.run(
            [prefect, "--no-prompt", "deploy", "--all"], cwd=project, env=env, capture_output=True, text=True
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            for config in deployments(project):
                name = config["name"]
                found = client.read_deployment_by_name(f"tlpipe/{name}")
                assert found.entrypoint == config["entrypoint"]
                assert found.parameters == config["parameters"]
                assert found.work_pool_name == config["work_pool"]["name"]
                assert found.job_variables == config["work_pool"]["job_variables"]
                assert [s.schedule.cron for s in found.schedules] == [s["cron"] for s in config["schedules"]]
                assert found.pull_steps == config["pull"]
