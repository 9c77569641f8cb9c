"""What every setting's checkpoints share: tlpipe.json beside the weights (the params and
input hashes that made them), where a checkpoint named in params is found, and one seed per
stage."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

META_FILE = "tlpipe.json"
# Every setting's checkpoint keeps its weights in this file.
WEIGHTS = "model.safetensors"
PACKAGE_PREFIX = "package:"


def resolve_init(init_from: str, download_dir: Path) -> Path:
    """The local directory of a checkpoint named `package:<module>`, a path, or `s3://...`.

    A package checkpoint is the `model/` folder (or `get_model_path()`) of an installed
    module. An s3:// prefix is downloaded into `download_dir`. Raises FileNotFoundError
    naming the checkpoint when it has no config.json.
    """
    if init_from.startswith(PACKAGE_PREFIX):
        name = init_from[len(PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise FileNotFoundError(f"pretrain.init_from {init_from!r}: {err}") from None
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
    elif init_from.startswith("s3://"):
        from tlpipe.store import download_folder

        path = download_folder(init_from, download_dir)
    else:
        path = Path(init_from)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pretrain.init_from {init_from!r}: no config.json in {path}")
    return path


def init_record(init_from: str | None, init_dir: Path | None) -> dict[str, Any] | None:
    """What a source model started from, for its lineage: `pretrain.init_from` as params
    name it and the SHA-256 of every file of the checkpoint it resolved to (None: a new
    model)."""
    if init_from is None or init_dir is None:
        return None
    from tlpipe.data import sha256_file

    files = sorted(f for f in init_dir.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    return {"from": init_from, "files": {f.relative_to(init_dir).as_posix(): sha256_file(f) for f in files}}


def source_lineage(source_dir: Path) -> dict[str, Any]:
    """What the source model in `source_dir` came from (its stage, objective, input hashes
    and starting checkpoint, as its tlpipe.json says) and the SHA-256 of its weights: what
    a fine-tuned checkpoint records of its source."""
    from tlpipe.data import sha256_file

    meta = read_meta(source_dir)
    return {key: meta.get(key) for key in ("stage", "objective", "inputs", "init")} | {
        "weights": sha256_file(source_dir / WEIGHTS)
    }


def read_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_everything(seed: int) -> None:
    """One seed per stage, set once at its start."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
