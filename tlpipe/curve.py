"""The data-efficiency curve's plan: which runs, and how many worker processes take them.

No torch here: the flow imports it to lay out its task runs before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tlpipe.params import EvaluateParams, Size

Arm = Literal["transfer", "scratch", "reference"]
# The arms the gain and the gate compare; the reference (evaluate.reference) is reported beside them.
ARMS: tuple[Arm, ...] = ("transfer", "scratch")


@dataclass(frozen=True)
class CurvePoint:
    """One training run of the curve: an arm, a training-set size and a seed."""

    arm: Arm
    size: Size
    seed: int

    @property
    def key(self) -> str:
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
    """Process-pool initializer for curve workers."""
    import torch

    torch.set_num_threads(1)


def curve_plan(p: EvaluateParams) -> list[CurvePoint]:
    """Every run of the curve, each independent of the others (any order, any worker)."""
    arms: tuple[Arm, ...] = (*ARMS, "reference") if p.reference else ARMS
    return [CurvePoint(arm, size, seed) for size in p.sizes for seed in p.seeds for arm in arms]
