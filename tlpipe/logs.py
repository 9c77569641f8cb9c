"""Run logs: the console shows the run's progress and its failure once; the full record,
tracebacks included, goes to the run's log file (`--debug` puts it on the console too).

Prefect reads its logging configuration when it is first imported, in the run's process and
in every worker process the run starts, from PREFECT_LOGGING_SETTINGS_PATH. `configure`
writes that file, derived from the installed Prefect's own default, and points the variable
at it, so all of them log the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

LOG_DIR = Path(".tlpipe/logs")
SETTINGS_ENV = "PREFECT_LOGGING_SETTINGS_PATH"
# Runs whose logs are kept; older ones are deleted as a new run starts.
KEEP_RUNS = 20


def _prefect_formatter() -> type[logging.Formatter]:
    from prefect.logging.formatters import PrefectFormatter

    return PrefectFormatter


class OneLineFormatter(logging.Formatter):
    """Prefect's console format, except that an error is its message's first line alone: no
    traceback, no repeated detail (tlpipe prints the failure in full once, at the end)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._inner = _prefect_formatter()(**kwargs)

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.ERROR:
            return self._inner.format(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self._inner.format(record).split("\n", 1)[0]
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _prefect_default() -> Path:
    """Prefect's packaged logging.yml, found without importing Prefect (importing it sets
    up its logging)."""
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.submodule_search_locations, "prefect is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "logging" / "logging.yml"


def _prune(log_dir: Path) -> None:
    runs = sorted({p.name.split(".", 1)[0] for p in log_dir.glob("*.log")}, reverse=True)
    for run in runs[KEEP_RUNS - 1 :]:
        for path in log_dir.glob(f"{run}.*"):
            path.unlink(missing_ok=True)


class EngineFailures(logging.Filter):
    """Keeps Prefect's own reports of a failed task or flow run off the console: the same
    error three or four times over. tlpipe names the failure once, at the end of the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
            return True
        failed = record.getMessage().startswith("Finished in state Failed")
        return record.levelno < logging.ERROR and not failed


def logging_config(log_file: Path, debug: bool) -> dict[str, Any]:
    """The installed Prefect's default logging configuration (its `${SETTING}` placeholders
    left for Prefect to fill in), with every record also written to `log_file` and, unless
    `debug`, the console's errors cut to one line."""
    config = yaml.safe_load(_prefect_default().read_text())
    standard = config["formatters"]["standard"]
    if not debug:
        config["formatters"]["one_line"] = {
            "()": f"{__name__}.OneLineFormatter",
            **{key: value for key, value in standard.items() if key != "()"},
        }
        config["handlers"]["console"]["formatter"] = "one_line"
        config.setdefault("filters", {})["engine_failures"] = {"()": f"{__name__}.EngineFailures"}
        config["handlers"]["console"]["filters"] = ["engine_failures"]
    config["handlers"]["run_log"] = {
        "class": "logging.FileHandler",
        "level": 0,
        "formatter": "standard",
        # Prefect fills in $NAME placeholders over the whole file: a '$' in the path stays one.
        "filename": str(log_file.absolute()).replace("$", "$$"),
        "delay": True,
        "encoding": "utf-8",
    }
    config["root"]["handlers"] = [*config["root"]["handlers"], "run_log"]
    # Loggers that do not reach the root log to the file as well.
    for name in ("prefect._internal", "uvicorn", "fastapi"):
        logger = config["loggers"].get(name)
        if logger is not None and logger.get("propagate") is False:
            logger["handlers"] = [*logger.get("handlers", []), "run_log"]
    return config


def configure(project: Path, run_id: str, debug: bool) -> Path:
    """Log this run (and the worker processes it starts) as the module docstring says.
    Returns the run's log file, `.tlpipe/logs/<run_id>.log`. A process that imported Prefect
    before this call keeps the logging Prefect set up then."""
    log_dir = project / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    _prune(log_dir)
    log_file = log_dir / f"{run_id}.log"
    settings = log_dir / f"{run_id}.logging.yml"
    # The configuration is read by worker processes during the run; it goes with the run.
    settings.write_text(yaml.safe_dump(logging_config(log_file, debug), sort_keys=False))
    if "prefect" not in sys.modules:
        os.environ[SETTINGS_ENV] = str(settings.absolute())
    return log_file
