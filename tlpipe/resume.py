"""Resuming training after a kill: where a stage's runs keep their state, what identifies
it, and how it is written so that a kill during the write leaves the previous state whole.

A stage's training runs save under `.tlpipe/resume/<stage>/<key>/`, `key` a digest of
everything the stage reads (its params and the bytes of its input files), so changed inputs
never resume an old state. Each run saves `<run>.pt` at a validation once `every_s`
seconds have passed since its last save (`TLPIPE_CHECKPOINT_EVERY_S`, default 60), and a
finished curve run leaves `<run>.json`. The loop itself also stamps each state with a
fingerprint of its run (its params and its starting weights) and ignores a state stamped
otherwise. The stage's folder is removed once the stage has finished. torch is imported
only to read and write states.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlpipe.faults import failpoint

log = logging.getLogger(__name__)

RESUME_ROOT = Path(".tlpipe/resume")
EVERY_S_ENV = "TLPIPE_CHECKPOINT_EVERY_S"
DEFAULT_EVERY_S = 60.0
# A state's layout; a state of another layout is started over, never misread.
FORMAT = 1


def checkpoint_interval() -> float:
    """Seconds between a run's saved states (`TLPIPE_CHECKPOINT_EVERY_S`; 0 saves at every
    validation)."""
    raw = os.environ.get(EVERY_S_ENV)
    if raw is None:
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{EVERY_S_ENV} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{EVERY_S_ENV} must be 0 or more seconds, not {raw!r}")
    return value


def _file_name(run: str) -> str:
    """A run's name as a file name: what is not a letter, digit, dot or dash becomes `_`,
    with a digest of the name so two names never share a file."""
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9.-]+', '_', run)[:80]}-{digest}"


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _path_digest(path: Path) -> str:
    """A file's or a folder's content (every file under it, by relative path); a path that
    does not exist is `absent`."""
    if path.is_file():
        st = path.stat()
        return _file_digest(str(path), st.st_size, st.st_mtime_ns)
    if not path.is_dir():
        return "absent"
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path)}\0{_path_digest(file)}\0".encode())
    return h.hexdigest()


def inputs_digest(inputs: Iterable[Any]) -> str:
    """One digest of a stage's inputs: params by their JSON, paths by their bytes, a
    setting (or any other object) by its name."""
    h = hashlib.sha256()
    for value in inputs:
        if hasattr(value, "model_dump_json"):
            part = value.model_dump_json()
        elif isinstance(value, Path):
            part = _path_digest(value)
        else:
            part = str(getattr(value, "name", type(value).__qualname__))
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Resume:
    """The folder one stage's runs, on one set of inputs, resume from."""

    dir: Path
    every_s: float = field(default_factory=checkpoint_interval)

    def state_path(self, run: str) -> Path:
        return self.dir / f"{_file_name(run)}.pt"

    def load(self, run: str, fingerprint: str) -> dict[str, Any] | None:
        """The state `run` saved last, or None: nothing saved, saved by another run (another
        fingerprint or layout), or unreadable (each but the first says so in the log)."""
        import torch

        path = self.state_path(run)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: start over, say why
            log.warning("%s: cannot read the saved training state (%s); starting over", path, err)
            return None
        if state.get("format") != FORMAT or state.get("fingerprint") != fingerprint:
            log.warning("%s: saved by another run of %s (other params or weights); starting over", path, run)
            return None
        return state

    def save(self, run: str, fingerprint: str, state: dict[str, Any]) -> None:
        """Write `run`'s state beside the last one and swap it in with one rename (file and
        folder synced first): a kill at any moment leaves one whole state."""
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.state_path(run)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            torch.save({**state, "format": FORMAT, "fingerprint": fingerprint}, f)
            f.flush()
            os.fsync(f.fileno())
        failpoint("resume.write")
        os.replace(tmp, path)
        _sync_dir(self.dir)

    def result(self, run: str) -> dict[str, Any] | None:
        """What a finished run recorded (`finished`), or None."""
        path = self.dir / f"{_file_name(run)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finished(self, run: str, result: dict[str, Any]) -> None:
        """Record `run`'s result and drop its training state: a re-run takes the result."""
        from tlpipe.files import write_json

        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / f"{_file_name(run)}.json", result)
        self.state_path(run).unlink(missing_ok=True)


def stage_resume(stage: str, inputs: Iterable[Any], root: Path = RESUME_ROOT) -> Resume:
    """Where `stage`'s runs resume from on `inputs`."""
    return Resume(root / stage / inputs_digest(inputs))


def clear_stage(stage: str, root: Path = RESUME_ROOT) -> None:
    """Drop every saved state of `stage` (it has finished)."""
    shutil.rmtree(root / stage, ignore_errors=True)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
