"""Writing stage outputs: atomic JSON, fresh output folders (no torch, cheap to import)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


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
