"""The data-efficiency curve's plan: which runs, and how many worker processes take them.

The scratch control is tuned first: one run per (learning rate, encoder size) of its grid,
at `tune_size` rows with the first seed, judged on the validation split; every scratch run
of the curve then uses the best. No torch here: the flow imports it to lay out its task runs
before any training starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from tlpipe.errors import CurveError
from tlpipe.params import EvaluateParams, FinetuneParams, Size
from tlpipe.setting import Metric

Arm = Literal["transfer", "scratch", "reference"]
# The arms the gain and the gate compare; the reference (evaluate.reference) is reported beside them.
ARMS: tuple[Arm, ...] = ("transfer", "scratch")


@dataclass(frozen=True)
class CurvePoint:
    """One training run of the curve: an arm, a training-set size and a seed. A scratch run
    names its learning rate and encoder (an index into `evaluate.scratch_models`); a tuning
    run (`tune`) is scored on the validation split alone."""

    arm: Arm
    size: Size
    seed: int
    lr: float | None = None
    model: int | None = None
    tune: bool = False

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> CurvePoint:
        """The point a run's record (what `tasks.evaluate.run_point` returns) is of."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})

    @property
    def key(self) -> str:
        if self.tune:
            return f"tune-{self.arm}-{self.size}-lr{self.lr:g}-model{self.model}"
        return f"{self.arm}-{self.size}-seed{self.seed}"


def curve_workers() -> int:
    """Curve runs go to one process per core (TLPIPE_CURVE_WORKERS overrides), each with one
    torch thread: on small models two 1-thread runs train ~1.4x faster than one 2-thread
    run, and one thread per run keeps every run's numbers the same whatever the core count.
    With a GPU, runs take turns on it in one worker."""
    default = 1 if _has_nvidia_gpu() else os.cpu_count() or 1
    return max(1, int(os.environ.get("TLPIPE_CURVE_WORKERS", default)))


def _has_nvidia_gpu() -> bool:
    """The NVIDIA driver lists a GPU (checked without importing torch, which takes seconds)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def one_thread() -> None:
    """Each curve run trains on one torch thread, whatever its worker's runner."""
    import torch

    torch.set_num_threads(1)


def tune_size(p: EvaluateParams) -> Size:
    return p.gate_size if p.tune_size is None else p.tune_size


def tuning_plan(p: EvaluateParams) -> list[CurvePoint]:
    """The scratch control's grid: every learning rate with every encoder size, at
    `tune_size` rows with the first seed (one run each; none when the grid has one cell)."""
    grid = [(lr, m) for m in range(len(p.scratch_models)) for lr in p.scratch_lrs]
    if len(grid) == 1:
        return []
    return [CurvePoint("scratch", tune_size(p), p.seeds[0], lr, m, tune=True) for lr, m in grid]


def choose_scratch(tuning: list[dict[str, Any]], p: EvaluateParams, metric: Metric) -> tuple[float, int]:
    """(learning rate, encoder index) of the tuning run with the best validation score on
    the primary `metric` (the first on a tie, in grid order); the one cell without a grid."""
    if not tuning:
        return p.scratch_lrs[0], 0
    best = tuning[0]
    for run in tuning[1:]:
        if metric.better(run[f"val_{metric.key}"], best[f"val_{metric.key}"]):
            best = run
    return best["lr"], best["model"]


def scratch_params(ft: FinetuneParams, lr: float) -> FinetuneParams:
    """The control trains every layer, with no transfer objective, at its own learning rate
    (on the same budget as transfer)."""
    return ft.model_copy(
        update={
            "strategy": "full",
            "freeze_bottom": 0,
            "layer_decay": 1.0,
            "l2sp": 0.0,
            "joint_alpha": 0.0,
            "tapt_steps": 0,
            "optim": ft.optim.model_copy(update={"lr": lr}),
        }
    )


def one_fit(arm: Arm, size: Size) -> bool:
    """Whether one run stands for every seed: the reference is deterministic given its rows,
    and at "all" every seed draws the same rows."""
    return arm == "reference" and size == "all"


def curve_plan(p: EvaluateParams, scratch: tuple[float, int]) -> list[CurvePoint]:
    """Every run of the curve, each independent of the others (any order, any worker); the
    scratch control at the (learning rate, encoder) `scratch` names; a `one_fit` cell runs
    with the first seed alone. The largest sizes come first: the longest runs start first,
    so the workers finish together."""
    arms: tuple[Arm, ...] = (*ARMS, "reference") if p.reference else ARMS
    lr, model = scratch
    largest_first = sorted(p.sizes, key=lambda s: float("inf") if s == "all" else s, reverse=True)
    return [
        CurvePoint(arm, size, seed, lr, model) if arm == "scratch" else CurvePoint(arm, size, seed)
        for size in largest_first
        for seed in p.seeds
        for arm in arms
        if seed == p.seeds[0] or not one_fit(arm, size)
    ]


@dataclass(frozen=True)
class CurveNeed:
    """How much labelled target data (train + pool) the curve draws at most: its largest
    size (None when every size is `all`), counted in the setting's unit (rows, or a text's
    tokens), and the params key that asks for it. validate checks the data holds it."""

    largest: int | None
    unit: str = "rows"
    key: str = "evaluate.sizes"


def curve_need(p: EvaluateParams, unit: str) -> CurveNeed:
    """The largest size `p` asks for: one of `sizes`, or `tune_size` when larger."""
    sizes = [s for s in p.sizes if isinstance(s, int)]
    largest = max(sizes, default=None)
    if isinstance(p.tune_size, int) and (largest is None or p.tune_size > largest):
        return CurveNeed(p.tune_size, unit, "evaluate.tune_size")
    return CurveNeed(largest, unit)


def check_runs(results: list[dict[str, Any]], p: EvaluateParams, metric: Metric) -> None:
    """Every run the plan names arrived exactly once and no other did (the tuning runs, then
    the curve at the scratch cell they chose): a runner that lost, repeated or mixed in a run
    fails evaluate instead of skewing its curve."""
    points = [CurvePoint.of(r) for r in results]
    tuning = [r for r in results if r["tune"]]
    planned = {*tuning_plan(p), *curve_plan(p, choose_scratch(tuning, p, metric))}

    def named(found: set[CurvePoint]) -> list[str]:
        return sorted(
            f"{pt.key} (lr {pt.lr:g}, encoder {pt.model})" if pt.arm == "scratch" and not pt.tune else pt.key
            for pt in found
        )

    problems = {
        "missing": named(planned - set(points)),
        "recorded twice": named({pt for pt in points if points.count(pt) > 1}),
        "not in the plan": named(set(points) - planned),
    }
    if any(problems.values()):
        raise CurveError(
            "the curve's runs are not its plan's: "
            + "; ".join(f"{what}: {', '.join(found)}" for what, found in problems.items() if found)
        )
