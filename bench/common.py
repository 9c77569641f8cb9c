"""What every benchmark shares: the machine, pinned threads, repeated timings, results.json.

Each benchmark module writes its own section of bench/results.json (merged, never
overwritten wholesale, so a GPU section survives a CPU re-run); bench/report.py turns the
file into docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path("bench/results.json")
REPS = 5


def threads_from_env() -> int:
    """The thread count every benchmark pins (TLPIPE_BENCH_THREADS, default: all cores)."""
    return int(os.environ.get("TLPIPE_BENCH_THREADS", len(os.sched_getaffinity(0))))


def pin_threads(n: int) -> None:
    """torch's intra-op threads (onnxruntime sessions take theirs from their options)."""
    import torch

    torch.set_num_threads(n)


def machine() -> dict[str, Any]:
    """The CPU, memory, accelerator and library versions a figure was measured on."""
    import torch

    from tlpipe.precision import cpu_identity

    ident = cpu_identity()
    cpu = ident["cpu"] if ident["cpu"] != "unknown" else platform.processor() or platform.machine()
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": None,
    }
    info["cpu_flags"] = ident["flags"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    for name in ("transformers", "onnxruntime"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def stat(samples: Sequence[float], unit: str) -> dict[str, Any]:
    """Median, min and max of repeated measurements."""
    if len(samples) < 1:
        raise ValueError("no samples")
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "reps": len(samples),
        "unit": unit,
    }


def in_turns(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) for `rounds` rounds of every name in turn, each round in the reverse
    order of the last, so the drift of a shared machine falls on every side alike."""
    order = list(names)
    for r in range(rounds):
        yield from ((r, name) for name in order)
        order.reverse()


def timed(
    fn: Callable[[], Any], reps: int = REPS, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Wall seconds of `reps` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - start)
    return out


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The ratio of two stats' medians."""
    return a["median"] / b["median"]


def machine_kind(m: dict[str, Any]) -> str:
    """What makes two machines' figures incomparable: the CPU model, its matrix-unit flags,
    the GPU."""
    flags = "+".join(m.get("cpu_flags") or [])
    return " ".join(part for part in (m["cpu"], f"({flags})" if flags else "", m.get("gpu") or "") if part)


def same_machine_section(section: str, path: Path = RESULTS) -> dict[str, Any]:
    """`section` of results.json if this kind of machine measured it, else nothing."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    found = data.get(section)
    return found if found is not None and machine_kind(found["machine"]) == machine_kind(machine()) else {}


def record(section: str, payload: dict[str, Any], path: Path = RESULTS) -> None:
    """Write `section` of results.json (with the machine and the date), keeping the others.
    A section last measured on another kind of machine is kept under "earlier", by section
    and machine, so its figures stay on the page, labelled, and never mix with these; one
    kept there from this kind of machine is replaced by these."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    here = machine()
    old = data.get(section)
    if old is not None and machine_kind(old["machine"]) != machine_kind(here):
        data.setdefault("earlier", {})[f"{section} on {machine_kind(old['machine'])}"] = old
    data.get("earlier", {}).pop(f"{section} on {machine_kind(here)}", None)
    data[section] = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": here,
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# Linux carries a process's memory high-water mark through fork and exec, so a child's
# ru_maxrss is at least its parent's peak: a benchmark holding a model would read its own
# size as the child's. The command is started by this small Python process instead, which
# writes its child's peak (KiB) to the file it is given.
_PEAK_OF_CHILD = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Run `cmd` in its own process (in `cwd`): (wall seconds, that process's peak RSS in
    MiB, its stdout). Output goes through files, not pipes, so a chatty child never blocks;
    raises RuntimeError with the end of its stderr when it fails."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        peak_file = Path(tmp) / "peak"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_OF_CHILD, str(peak_file), *cmd],
            stdout=out,
            stderr=err,
            text=True,
            cwd=cwd,
        )
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd[2:4])} failed: {err.read()[-2000:]}")
        return seconds, int(peak_file.read_text()) / 1024, out.read()
