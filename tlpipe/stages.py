"""DVC's view of the stages: stale or up to date, and committing a stage's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_up_to_date(stage: str, root: Path = Path(".")) -> bool:
    """True when DVC finds the stage's deps, params, command and outputs unchanged."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def commit(stage: str, root: Path = Path(".")) -> None:
    """Record the stage in dvc.lock and its outputs in the DVC cache, as `dvc repro` would."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(stage, force=True)


def stale_stages(root: Path = Path(".")) -> dict[str, Any]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()
