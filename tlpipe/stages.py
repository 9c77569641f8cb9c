"""Each stage as a call from params, and DVC's view of it: stale or up to date, then commit.

The Prefect flow and `python -m tasks.<stage>` both end in the same stage functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlpipe.params import Params, stage_dir

log = logging.getLogger(__name__)


def _prepare(params: Params, out: Path) -> Any:
    from tasks.prepare import prepare

    return prepare(params.prepare, params.data, Path("."), out)


def _validate(params: Params, out: Path) -> Any:
    from tasks.validate import validate

    return validate(params.validate_, params.prepare.labels, stage_dir("prepare"), out)


def _pretrain(params: Params, out: Path) -> Any:
    from tasks.pretrain import pretrain

    return pretrain(params.pretrain, params.prepare.labels, stage_dir("prepare"), out)


def _finetune(params: Params, out: Path) -> Any:
    from tasks.finetune import finetune

    return finetune(
        params.finetune, params.prepare.labels, stage_dir("pretrain") / "model", stage_dir("prepare"), out
    )


def evaluate_stage(params: Params, out: Path, points: list[dict[str, Any]] | None = None) -> Any:
    """The whole evaluate stage, or (given the curve's finished `points`) its summary alone."""
    from tasks.evaluate import evaluate, finish

    args = (
        params.evaluate,
        params.finetune,
        params.prepare.labels,
        stage_dir("pretrain") / "model",
        stage_dir("finetune"),
        stage_dir("prepare"),
        out,
    )
    return evaluate(*args) if points is None else finish(*args, points)


def _export(params: Params, out: Path) -> Any:
    from tasks.export import export

    return export(params.export, params.finetune.max_length, stage_dir("finetune"), stage_dir("prepare"), out)


def _publish(params: Params, out: Path) -> Any:
    from tasks.publish import publish
    from tlpipe.store import open_store

    with open_store(params.publish.bucket) as store:
        return publish(params, Path("."), stage_dir("export"), stage_dir("evaluate"), out, store)


RUNNERS: dict[str, Callable[[Params, Path], Any]] = {
    "prepare": _prepare,
    "validate": _validate,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "evaluate": evaluate_stage,
    "export": _export,
    "publish": _publish,
}


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
