"""Whether bf16 training pays on this CPU: measured once per machine, then remembered.

A CPU that computes bf16 natively (AVX512-BF16, AMX) does not always train faster in it:
autocast casts weights and activations every step, and oneDNN builds a bf16 kernel for
each new matrix shape. So `precision: auto` trains in bf16 on a CPU only where a short
probe found it faster: a training step of a transformer layer (the dense products every
setting's models are made of) at a few batch shapes, timed in fp32 and in bf16 autocast in
turn. The verdict is cached under TLPIPE_CACHE_DIR (default ~/.cache/tlpipe), keyed by
what decides it: the CPU model and its matrix-unit flags, torch's version and the thread
count. Concurrent processes probe once: the first holds a lock while the others wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# The CPU flags that decide how fast bf16 and fp32 matrix products run.
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# bf16 is chosen only when its probe step is at least this much faster than fp32's.
MARGIN = 0.95
# Sequence lengths of the probe's batches (multiples of 8, as bf16 batches are padded).
PROBE_LENGTHS = (24, 32, 48)
PROBE_ROUNDS = 3


def cpu_identity() -> dict[str, Any]:
    """The CPU model and which of MATRIX_FLAGS it has, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"cpu": model, "flags": [f for f in MATRIX_FLAGS if f in flags]}


def cache_dir() -> Path:
    return Path(os.environ.get("TLPIPE_CACHE_DIR", Path.home() / ".cache" / "tlpipe"))


def probe_key(threads: int) -> str:
    ident = cpu_identity()
    return f"{ident['cpu']}|{'+'.join(ident['flags'])}|torch {torch.__version__}|{threads} threads"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def probe_step_seconds(threads: int) -> dict[str, float]:
    """Median seconds of one training step of the probe model, in fp32 and in bf16 autocast,
    measured in turn with `threads` torch threads (the global RNG and thread count are left
    as they were)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            batches = [torch.randn(32, t, 256) for t in PROBE_LENGTHS]

            def step(x: torch.Tensor, bf16: bool) -> None:
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                with ctx:
                    loss = model(x).float().square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            times: dict[bool, list[float]] = {False: [], True: []}
            for bf16 in (False, True):
                for x in batches:  # warm-up: every shape's kernels built once
                    step(x, bf16)
            for _ in range(PROBE_ROUNDS):
                for bf16 in (False, True):
                    start = time.perf_counter()
                    for x in batches:
                        step(x, bf16)
                    times[bf16].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {"fp32": statistics.median(times[False]), "bf16": statistics.median(times[True])}


def bf16_pays(threads: int | None = None) -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU with `threads` threads
    (default: torch's current count), probed once and cached."""
    threads = threads or torch.get_num_threads()
    path, key = cache_dir() / "precision.json", probe_key(threads)
    known = _read(path).get(key)
    if known is not None:
        return bool(known["bf16"])
    with _locked(path):
        known = _read(path).get(key)  # another process may have probed while we waited
        if known is None:
            seconds = probe_step_seconds(threads)
            known = {
                "bf16": seconds["bf16"] <= MARGIN * seconds["fp32"],
                "seconds_per_probe": seconds,
                "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            }
            log.info(
                "precision: auto: a training step took %.3f s in bf16 and %.3f s in fp32 on this CPU "
                "with %d threads, so it trains in %s (kept in %s)",
                seconds["bf16"], seconds["fp32"], threads, "bf16" if known["bf16"] else "fp32", path,
            )  # fmt: skip
            records = _read(path) | {key: known}
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
            os.replace(tmp, path)
    return bool(known["bf16"])
