"""Data-parallel training over several processes, started by torchrun.

A training stage whose params ask for `distributed.nproc` > 1 starts itself again under
`torch.distributed.run --standalone` (a rendezvous on a free port of its own, so stages
side by side never collide): every rank runs the same stage and the same training loop.
Each step the loop draws one global batch on every rank alike (so length bucketing holds),
each rank trains on its own slice of it, and the gradients are averaged over the ranks by
one all-reduce (gloo on a CPU, NCCL on a GPU) before the optimizer steps: every rank holds
the same weights at every step. Rank 0 alone validates, saves training states and writes
the stage's outputs; its validation scores, and with them every early-stopping decision,
reach the other ranks by broadcast, so all of them stop at the same step.

The loop reduces the gradients itself rather than through DistributedDataParallel's
wrapper: the strategies change which parameters train in the middle of a run (gradual
unfreezing), some tasks train parameters outside the model (the joint loss's masked-LM
head) and call the model's parts directly, all of which DDP's fixed set of hooked
parameters does not allow. torch is imported only where a collective runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlpipe.errors import TlpipeError
from tlpipe.processes import die_with_parent

if TYPE_CHECKING:
    import numpy as np
    import torch

# A rank's last word after the group is told to stop, before it is killed.
STOP_TIMEOUT_S = 10.0


class DistributedError(TlpipeError):
    """A stage on several processes failed: its ranks' messages are above this one."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started (one rank alone without it)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this rank is the one that validates and writes."""
        return self.rank == 0

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch: every size-th, from its rank on (a batch
        bucketed by length stays bucketed in each slice)."""
        return idx[self.rank :: self.size] if self.distributed else idx


def world() -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    return World(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def backend_for(backend: str, device: str) -> str:
    """`auto` is NCCL when the stage trains on a GPU (device cuda, or auto with one seen),
    else gloo."""
    if backend != "auto":
        return backend
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


@contextlib.contextmanager
def process_group(backend: str) -> Iterator[World]:
    """The process group of the ranks torchrun started, for as long as the block runs;
    with NCCL, each rank's device is its local rank's GPU."""
    import torch
    import torch.distributed as dist

    w = world()
    if backend == "nccl":
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group(backend)
    try:
        yield w
    finally:
        dist.destroy_process_group()


def launch_command(module: str, nproc: int) -> list[str]:
    """torchrun on this interpreter: `nproc` ranks of `python -m module`, rendezvous on a
    free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
    ]


def launch(module: str, nproc: int) -> None:
    """Run `python -m module` on `nproc` ranks under torchrun and wait for them. torchrun and
    its ranks are a process group of their own, stopped whole if this process is
    interrupted (SIGTERM turned into an exception, Ctrl-C) and sent SIGTERM if it dies even
    by SIGKILL. Raises DistributedError naming the exit status when any rank fails. What
    torchrun and the ranks put in the temporary folder goes with it (a folder of its own)."""
    with tempfile.TemporaryDirectory(prefix="tlpipe-torchrun-") as scratch:
        proc = subprocess.Popen(
            [*die_with_parent(), *launch_command(module, nproc)],
            start_new_session=True,
            env={**os.environ, "TMPDIR": scratch},
        )
        try:
            code = proc.wait()
        finally:
            _stop_group(proc)
    if code != 0:
        raise DistributedError(f"{module} on {nproc} processes failed (torchrun exit {code}); see above")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """If torchrun still runs (this process was interrupted): SIGTERM to it and its ranks,
    which torchrun passes on, and STOP_TIMEOUT_S for them to end. Then SIGKILL to whatever
    is left of the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def average_gradients(params: Iterable[torch.Tensor], w: World) -> None:
    """Each parameter's gradient becomes its mean over the ranks, by one all-reduce of one
    flat buffer per device and dtype. A rank without a gradient for a parameter (a slice
    too small to reach it) counts zero; a parameter no rank has a gradient for keeps none,
    as it would on one process (the optimizer skips it)."""
    import torch
    import torch.distributed as dist

    if not w.distributed:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for q in params:
        groups.setdefault((q.device, q.dtype), []).append(q)
    for (device, dtype), group in groups.items():
        present = torch.tensor([q.grad is not None for q in group], dtype=dtype, device=device)
        flat = torch.cat([present] + [_grad(q).reshape(-1) for q in group])
        dist.all_reduce(flat)
        had, values = flat[: len(group)], flat[len(group) :].div_(w.size)
        offset = 0
        for q, count in zip(group, had.tolist(), strict=True):
            n = q.numel()
            if count:
                q.grad = values[offset : offset + n].view_as(q).clone()
            offset += n


def _grad(q: torch.Tensor) -> torch.Tensor:
    import torch

    return q.grad if q.grad is not None else torch.zeros_like(q)


def broadcast_parameters(tensors: Iterable[torch.Tensor], w: World) -> None:
    """Every rank starts from rank 0's weights."""
    import torch
    import torch.distributed as dist

    if not w.distributed:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def from_main(value: Any, w: World) -> Any:
    """Rank 0's `value` on every rank (a small picklable object)."""
    import torch.distributed as dist

    if not w.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def summed(values: Iterable[float], w: World) -> list[float]:
    """`values` summed over the ranks, in float64."""
    import torch
    import torch.distributed as dist

    found = [float(v) for v in values]
    if not w.distributed:
        return found
    # NCCL reduces tensors on the rank's GPU alone.
    device = f"cuda:{w.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(found, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gathered(value: Any, w: World) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
    import torch.distributed as dist

    if not w.distributed:
        return [value]
    found: list[Any] | None = [None] * w.size if w.main else None
    dist.gather_object(value, found, dst=0)
    return found
