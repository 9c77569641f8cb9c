"""The one table that wires each stage to its function and its inputs.

`python -m tasks.<stage>` (what dvc.yaml runs), the Prefect flow's task runs and the
curve's mapped runs all call a stage through it, so a stage's arguments are written once.
Stage modules are imported when a stage runs, not when this table is read: the flow reads it
without importing torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpipe.curve import CurvePoint, curve_need
from tlpipe.distributed import backend_for, launch, process_group, world
from tlpipe.errors import GateFailed, TlpipeError
from tlpipe.files import next_dir, replacing
from tlpipe.params import Params, ParamsError, load_params, stage_dir
from tlpipe.resume import Resume, clear_stage, stage_resume
from tlpipe.setting import get_exporter, get_setting, row_rules, spec, validation_suite

ROOT = Path(".")


@dataclass(frozen=True)
class Wiring:
    """`function` (module:name) called with `inputs(params)` and then its output folder;
    for a stage that trains, also `resume=`, where its runs resume from on the inputs
    `resumes_on(params)` names (`tlpipe.resume`), and the params section whose `distributed`
    and `device` say on how many processes it trains."""

    function: str
    inputs: Callable[[Params], tuple[Any, ...]]
    resumes_on: Callable[[Params], tuple[Any, ...]] | None = None
    # Keyword inputs, after the output folder.
    options: Callable[[Params], dict[str, Any]] = lambda params: {}
    trains: Callable[[Params], Any] | None = None

    def nproc(self, params: Params) -> int:
        return 1 if self.trains is None else self.trains(params).distributed.nproc

    def resume(self, stage: str, params: Params) -> dict[str, Resume]:
        """The `resume=` argument the stage takes, if it trains."""
        if self.resumes_on is None:
            return {}
        return {"resume": stage_resume(stage, self.resumes_on(params))}

    def resolve(self) -> Callable[..., Any]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)

    def call(self, stage: str, params: Params, out_dir: Path) -> Any:
        """The stage's function on `params`, writing into `out_dir`."""
        options = self.options(params) | self.resume(stage, params)
        return self.resolve()(*self.inputs(params), out_dir, **options)


def _pretrain_inputs(params: Params) -> tuple[Any, ...]:
    return (get_setting(params.setting), params.pretrain, params.data, stage_dir("prepare"))


def _finetune_inputs(params: Params) -> tuple[Any, ...]:
    return (
        get_setting(params.setting),
        params.finetune,
        params.data,
        stage_dir("pretrain") / "model",
        stage_dir("prepare"),
    )


def _evaluate_inputs(params: Params) -> tuple[Any, ...]:
    return (
        get_setting(params.setting),
        params.evaluate,
        params.finetune,
        params.data,
        stage_dir("pretrain") / "model",
        stage_dir("finetune"),
        stage_dir("prepare"),
    )


def _curve_point_inputs(params: Params) -> tuple[Any, ...]:
    """evaluate's inputs but the fine-tuned model, which a curve run does not read."""
    *inputs, _finetune_dir, prepare_dir = _evaluate_inputs(params)
    return (*inputs, prepare_dir)


STAGES: dict[str, Wiring] = {
    "prepare": Wiring(
        "tasks.prepare:prepare",
        lambda params: (row_rules(params.setting), params.prepare, params.data, params.validate_, ROOT),
    ),
    "validate": Wiring(
        "tasks.validate:validate",
        lambda params: (
            validation_suite(params.setting),
            params.validate_,
            params.data,
            stage_dir("prepare"),
        ),
        options=lambda params: {"curve": curve_need(params.evaluate, spec(params.setting).size_unit)},
    ),
    "pretrain": Wiring(
        "tasks.pretrain:pretrain", _pretrain_inputs, _pretrain_inputs, trains=lambda params: params.pretrain
    ),
    "finetune": Wiring(
        "tasks.finetune:finetune", _finetune_inputs, _finetune_inputs, trains=lambda params: params.finetune
    ),
    "evaluate": Wiring("tasks.evaluate:evaluate", _evaluate_inputs, _curve_point_inputs),
    "export": Wiring(
        "tasks.export:export",
        lambda params: (
            get_exporter(params.setting),
            params.export,
            stage_dir("finetune"),
            stage_dir("prepare"),
        ),
    ),
    "publish": Wiring(
        "tasks.publish:publish_to_store",
        lambda params: (
            params,
            ROOT,
            stage_dir("prepare"),
            stage_dir("validate"),
            stage_dir("export"),
            stage_dir("evaluate"),
        ),
    ),
}
# The evaluate stage in parts, for a flow that maps the curve's runs over workers: each run
# alone, then the summary over all of them.
CURVE_POINT = Wiring("tasks.evaluate:run_point", _curve_point_inputs, _curve_point_inputs)
CURVE_FINISH = Wiring("tasks.evaluate:finish", _evaluate_inputs)


def _rebased(result: Any, work: Path, out: Path) -> Any:
    """`result` with each path it holds under `work` moved to the same place under `out`."""
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        return result
    moved = {
        f.name: out / value.relative_to(work)
        for f in dataclasses.fields(result)
        if isinstance(value := getattr(result, f.name), Path) and value.is_relative_to(work)
    }
    return dataclasses.replace(result, **moved)


@contextlib.contextmanager
def _named_where_kept(out: Path) -> Iterator[None]:
    """A failed gate's message names its report where the report now is, under `out`."""
    work = next_dir(out)
    try:
        yield
    except GateFailed as err:
        if str(work) not in str(err):
            raise
        raise GateFailed(str(err).replace(str(work), str(out))) from err


@dataclass(frozen=True)
class Launched:
    """A stage that ran on `nproc` processes under torchrun; its outputs are in `out`."""

    stage: str
    nproc: int
    out: Path

    def summary(self) -> str:
        return f"ran on {self.nproc} processes; outputs in {self.out}"


def run_stage(stage: str, params: Params) -> Any:
    """Run one stage on `params`. Its outputs are built beside outputs/<stage>/ and take its
    place only when the stage returns (or fails a gate after writing its report): a stage
    that fails leaves the previous outputs as they were, and the training states it saved
    (`tlpipe.resume`) for the next try; a stage that returns drops them.

    A stage whose params ask for more than one process starts `python -m tasks.<stage>`
    under torchrun (whichever entry point called this), where each rank runs it again;
    rank 0 writes the outputs, the others build theirs in a folder that is then dropped."""
    wiring = STAGES[stage]
    out = stage_dir(stage)
    nproc = wiring.nproc(params)
    if nproc > 1 and not world().distributed:
        launch(f"tasks.{stage}", nproc)
        return Launched(stage, nproc, out)
    if world().distributed:
        section = wiring.trains(params) if wiring.trains is not None else None
        backend = backend_for(section.distributed.backend, section.device) if section else "gloo"
        with process_group(backend) as w:
            if not w.main:
                with tempfile.TemporaryDirectory(prefix=f"tlpipe-{stage}-rank{w.rank}-") as scratch:
                    return wiring.call(stage, params, Path(scratch))
            return _run_here(stage, wiring, params, out)
    return _run_here(stage, wiring, params, out)


def _run_here(stage: str, wiring: Wiring, params: Params, out: Path) -> Any:
    with _named_where_kept(out), replacing(out, keep=(GateFailed,)) as work:
        result = wiring.call(stage, params, work)
    clear_stage(stage)
    return _rebased(result, work, out)


def run_curve_point(point: CurvePoint, params: Params) -> dict[str, Any]:
    """One run of evaluate's curve, its record returned; taken from or resumed from what an
    interrupted try of evaluate left."""
    resume = CURVE_POINT.resume("evaluate", params)
    return CURVE_POINT.resolve()(point, *CURVE_POINT.inputs(params), **resume)


def finish_evaluate(params: Params, points: list[dict[str, Any]]) -> Any:
    """evaluate's summary, gate and report over the records of the curve's runs, built
    beside outputs/evaluate/ and taking its place as `run_stage` does."""
    out = stage_dir("evaluate")
    with _named_where_kept(out), replacing(out, keep=(GateFailed,)) as work:
        result = CURVE_FINISH.resolve()(*CURVE_FINISH.inputs(params), work, points)
    clear_stage("evaluate")
    return result


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(stage: str) -> None:
    """`python -m tasks.<stage>`: run it from params.yaml; a known failure exits 1 with a
    one-line reason. Among several ranks, rank 0 alone logs below warnings."""
    setup_logging(logging.INFO if world().main else logging.WARNING)
    try:
        run_stage(stage, load_params())
    except (TlpipeError, ParamsError) as err:
        print(f"tlpipe: {stage} failed: {err}", file=sys.stderr)
        sys.exit(1)
