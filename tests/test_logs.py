"""Run logs: one line per failure on the console, everything in the run's log file."""

from __future__ import annotations

import logging
import logging.config
import sys
from pathlib import Path

import pytest

from tlpipe.logs import KEEP_RUNS, SETTINGS_ENV, EngineFailures, OneLineFormatter, configure, logging_config


def _failed() -> logging.LogRecord:
    try:
        raise ValueError("validation failed: 2 of 41 expectations\n  - source.text: 1 null")
    except ValueError:
        return logging.LogRecord(
            "prefect.task_runs",
            logging.ERROR,
            __file__,
            1,
            "Task run failed: %s",
            ("boom\nmore",),
            sys.exc_info(),
        )


def test_the_console_shows_an_error_in_one_line_and_the_file_keeps_its_traceback(tmp_path: Path) -> None:
    record = _failed()
    assert (
        OneLineFormatter(format="%(levelname)s | %(message)s").format(record)
        == "ERROR | Task run failed: boom"
    )
    full = logging.Formatter("%(message)s").format(record)
    assert "Traceback (most recent call last)" in full and "more" in full
    info = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, "line one\nline two", (), None)
    assert OneLineFormatter(format="%(message)s").format(info) == "line one\nline two"


def test_prefects_own_failure_reports_stay_off_the_console() -> None:
    keep = EngineFailures().filter

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, (), None)

    assert not keep(_failed())
    assert not keep(
        record("prefect.flow_runs", logging.INFO, "Finished in state Failed('Flow run encountered')")
    )
    assert keep(record("prefect.flow_runs", logging.INFO, "Finished in state Completed()"))
    assert keep(record("tlpipe.store", logging.ERROR, "SeaweedFS exited"))


def test_the_configuration_is_prefects_own_plus_the_run_log(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    config = logging_config(log_file, debug=False)
    assert config["handlers"]["console"]["formatter"] == "one_line"
    assert config["handlers"]["console"]["filters"] == ["engine_failures"]
    assert "run_log" in config["root"]["handlers"] and "console" in config["root"]["handlers"]
    assert config["handlers"]["run_log"]["filename"] == str(log_file.absolute())
    debug = logging_config(log_file, debug=True)
    assert debug["handlers"]["console"]["formatter"] == "standard"
    assert "filters" not in debug["handlers"]["console"]
    # Loaded by Prefect itself in the command-line test (tests/test_flow.py).


def test_each_run_gets_its_log_and_old_ones_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    logs = tmp_path / ".tlpipe/logs"
    logs.mkdir(parents=True)
    for i in range(KEEP_RUNS + 3):
        (logs / f"20261201T0000{i:02d}-1.log").write_text("old")
        (logs / f"20261201T0000{i:02d}-1.logging.yml").write_text("old")
    log_file = configure(tmp_path, "20261203T120000-7", debug=False)
    assert log_file == logs / "20261203T120000-7.log"
    runs = {p.name.split(".", 1)[0] for p in logs.iterdir()}
    assert len(runs) == KEEP_RUNS and "20261203T120000-7" in runs and "20261201T000000-1" not in runs
    # This process imported Prefect already: its logging is left as it is.
    import os

    assert "prefect" in sys.modules and SETTINGS_ENV not in os.environ
