"""flows.runners: which task runner the flow maps the curve's runs over."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.runners import DASK_ADDRESS, RUNNER, curve_runner, runner_choice
from tlpipe.params import RunsParams


def test_the_curve_runner_comes_from_the_flag_the_environment_or_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.task_runners import ProcessPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    monkeypatch.delenv(RUNNER, raising=False)
    monkeypatch.delenv(DASK_ADDRESS, raising=False)
    monkeypatch.setenv("TLPIPE_CURVE_WORKERS", "3")
    pool = curve_runner()
    assert isinstance(pool, ProcessPoolTaskRunner) and pool._max_workers == 3
    local = curve_runner("dask")
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    monkeypatch.setenv(DASK_ADDRESS, "tcp://scheduler:8786")
    remote = curve_runner()
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://scheduler:8786"
    assert isinstance(curve_runner("process"), ProcessPoolTaskRunner)
    monkeypatch.setenv(RUNNER, "ray")
    with pytest.raises(ValueError, match="runner 'ray' is not one of process, dask"):
        curve_runner()
    # params' runs come last: the flag, then the environment, come first.
    monkeypatch.delenv(RUNNER)
    monkeypatch.delenv(DASK_ADDRESS)
    runs = RunsParams(dask_address="tcp://params:8786")
    assert runner_choice(runs=runs) == ("dask", "tcp://params:8786")
    assert runner_choice(runs=RunsParams(runner="dask")) == ("dask", None)
    assert runner_choice(runs=RunsParams()) == ("process", None)
    assert runner_choice("process", runs=runs) == ("process", None)
    monkeypatch.setenv(DASK_ADDRESS, "tcp://env:8786")
    assert runner_choice(runs=runs) == ("dask", "tcp://env:8786")
    monkeypatch.setenv(RUNNER, "process")
    assert runner_choice(runs=runs) == ("process", None)
    with pytest.raises(ValueError, match="dask_address names a Dask scheduler, but runner is process"):
        RunsParams(runner="process", dask_address="tcp://params:8786")


def test_choosing_a_runner_imports_no_prefect() -> None:
    """The command line chooses the runner before it configures logging, which must come
    before Prefect's own."""
    code = "import sys, flows.runners as r; r.runner_choice(); print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
