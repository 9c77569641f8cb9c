"""Writing stage outputs: atomic JSON, fresh output folders, folders replaced in one step
(no torch, cheap to import)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (stage outputs are rebuilt from nothing)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def next_dir(path: Path) -> Path:
    """Where `path`'s next contents are built before they replace it (a hidden sibling)."""
    return path.with_name(f".{path.name}.next")


def _old_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


@functools.cache
def _renameat2() -> Any:
    """The C library's renameat2, looked up once (find_library may run ldconfig), or None."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one rename (Linux renameat2); False where the C library
    or the filesystem does not offer it."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def recover_dir(path: Path) -> None:
    """Put back `path` where a replacement was cut off between its two renames (only where
    no exchange is offered): the previous contents wait under the `.old` sibling."""
    old = _old_dir(path)
    if old.exists() and not path.exists():
        os.rename(old, path)
        log.warning("%s: restored the previous contents left by an interrupted replacement", path)
    elif old.exists():
        shutil.rmtree(old)


def replace_dir(new: Path, path: Path) -> None:
    """Put the folder `new` in `path`'s place: at no moment is `path` empty or missing (one
    exchange), or, where the filesystem cannot exchange, missing only between two renames,
    which `recover_dir` undoes. The previous contents are deleted afterwards."""
    recover_dir(path)
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)
    else:
        old = _old_dir(path)
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)


@contextlib.contextmanager
def replacing(path: Path, *, keep: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Build `path`'s next contents in `next_dir(path)`, emptied first, and yield it. When
    the body returns, the new folder replaces `path` (`replace_dir`); when it raises one of
    `keep` (a gate that failed after writing its report) it replaces `path` too and the
    error goes on; any other error removes it and leaves `path` as it was."""
    work = next_dir(path)
    recover_dir(path)
    fresh_dir(work)
    try:
        yield work
    except keep:
        replace_dir(work, path)
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_dir(work, path)
