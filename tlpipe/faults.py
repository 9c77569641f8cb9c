"""Failpoints: named places where the fault tests kill tlpipe as the kernel would.

`TLPIPE_FAILPOINT=<name>[@<n>]` sends SIGKILL to the process the n-th time (the first by
default) it passes `failpoint(<name>)`; nothing is flushed, no handler runs. Unset, a
failpoint costs one environment lookup. The places:

- `train.step`: after an optimizer step (the shared loop and masked-LM pretraining);
- `resume.write`: a training state written in full beside the last one, not yet renamed;
- `export.write`: the ONNX bundle written, before its parity gate.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "TLPIPE_FAILPOINT"
POINTS = ("train.step", "resume.write", "export.write")

_passed: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """Kill the process here if `TLPIPE_FAILPOINT` names `name` and this is the pass it
    counts to."""
    armed = os.environ.get(ENV)
    if not armed:
        return
    point, _, nth = armed.partition("@")
    if point not in POINTS:
        raise ValueError(f"{ENV}={armed!r} names no failpoint; known: {', '.join(POINTS)}")
    if point != name:
        return
    _passed[name] += 1
    if _passed[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
