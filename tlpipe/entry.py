"""The `python -m tasks.<stage>` shell that dvc.yaml runs: load params, call the stage, exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tlpipe.errors import TlpipeError
from tlpipe.params import Params, ParamsError, load_params, stage_dir


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(stage: str, run: Callable[[Params, Path], object]) -> None:
    """Run one stage from params.yaml; a known failure exits 1 with a one-line reason."""
    setup_logging()
    try:
        params = load_params()
        run(params, stage_dir(stage))
    except (TlpipeError, ParamsError) as err:
        print(f"tlpipe: {stage} failed: {err}", file=sys.stderr)
        sys.exit(1)
