"""Where the flow's mapped task runs (the curve's runs, export beside them) go: the process
pool on this machine by default, or a Dask cluster, local or at a scheduler's address."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tlpipe.curve import curve_workers
from tlpipe.params import RunsParams

# Prefect is imported only where a runner is built: the command line chooses one before it
# configures logging, which must come before Prefect's.
if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

RUNNER = "TLPIPE_RUNNER"
DASK_ADDRESS = "TLPIPE_DASK_ADDRESS"
RUNNERS = ("process", "dask")


def runner_choice(
    kind: str | None = None, address: str | None = None, runs: RunsParams | None = None
) -> tuple[str, str | None]:
    """Which runner the curve's runs go to, and the Dask scheduler's address if one is named:
    `kind` and `address` (the command line) come first, then TLPIPE_RUNNER and
    TLPIPE_DASK_ADDRESS, then params' `runs`; an address alone implies `dask`, and nothing
    at all means `process`. ValueError names a runner that is not one."""
    kind = kind or os.environ.get(RUNNER) or None
    address = address or os.environ.get(DASK_ADDRESS) or None
    if kind is None and address is None and runs is not None:
        kind, address = runs.runner, runs.dask_address
    kind = kind or ("dask" if address else "process")
    if kind not in RUNNERS:
        raise ValueError(f"runner {kind!r} is not one of {', '.join(RUNNERS)} (--runner or {RUNNER})")
    return kind, address if kind == "dask" else None


def curve_runner(
    kind: str | None = None, address: str | None = None, runs: RunsParams | None = None
) -> TaskRunner:
    """The task runner the flow maps the curve's runs over (chosen by `runner_choice`):
    `process`, a pool of `curve_workers()` processes on this machine; `dask`, the Dask
    scheduler at the address, or without one a local Dask cluster of `curve_workers()`
    one-thread worker processes. Every runner returns the runs' records to the flow; workers
    on other machines need the run's folder at the same path (a shared filesystem)."""
    kind, address = runner_choice(kind, address, runs)
    if kind == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=curve_workers())
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # Its own scheduler and dashboard ports (":0"), so runs side by side never collide.
    workers = {"n_workers": curve_workers(), "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs={**workers, "scheduler_port": 0, "dashboard_address": ":0"})
