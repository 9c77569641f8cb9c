"""What every setting's checkpoints share: tlpipe.json beside the weights (the params and
input hashes that made them), where a checkpoint named in params is found, and one seed per
stage."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

META_FILE = "tlpipe.json"
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
