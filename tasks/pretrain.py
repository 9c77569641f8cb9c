"""pretrain: the source model, trained on the source data by the setting (masked-LM or the
source's own labels for text), or a checkpoint taken as it is when there is no source."""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlpipe.checkpoint import META_FILE, init_record, seed_everything
from tlpipe.data import read_split, sha256_file, source_split
from tlpipe.files import fresh_dir, write_json
from tlpipe.metrics import figures
from tlpipe.params import DataParams, PretrainParams, pretrain_objective
from tlpipe.resume import Resume
from tlpipe.setting import Setting, spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    model_dir: Path
    # None: the checkpoint was taken as it is.
    objective: str | None
    steps: int
    # Held-out source metrics: masked-LM loss before/after (mlm), accuracy and macro-F1
    # (supervised).
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.objective is None:
            return f"checkpoint taken as it is, in {self.model_dir}"
        return f"{self.objective}, {self.steps:,} steps: {figures(self.metrics)}; model {self.model_dir}"


def pretrain(
    setting: Setting,
    p: PretrainParams,
    data: DataParams,
    prepare_dir: Path,
    out_dir: Path,
    resume: Resume | None = None,
) -> PretrainResult:
    """Train or continue a source model on `prepare_dir/source.parquet` with the objective
    `pretrain_objective` picks (for text: masked-LM on the source text, or a classifier on
    a labelled source's own label set). Without a source, or with `steps: 0`, the
    checkpoint is taken as it is.

    Writes `out_dir/model` (a self-contained checkpoint), `metrics.json` (held-out source
    metrics, or `source: none`), `history.csv` (per logged step or validation) and
    `timing.json`; training resumes from the state it saved in `resume`. Raises
    FileNotFoundError when `init_from` names no checkpoint, DataError when a supervised
    source row has no label from the source's label set.
    """
    seed_everything(p.seed)
    source_file = prepare_dir / "source.parquet"
    fresh_dir(out_dir)
    model_dir = out_dir / "model"
    objective = pretrain_objective(p, data, spec(setting.name).objectives)
    meta = {
        "stage": "pretrain",
        "params": p.model_dump(mode="json"),
        "objective": objective,
        "inputs": {"source.parquet": sha256_file(source_file)},
        "max_length": p.max_length,
    }
    if objective is None:
        return _use_as_is(setting, p, data.source_kind, model_dir, meta, out_dir)
    labels = data.source_labels or ()

    held_out, train = source_split(read_split(prepare_dir, "source"))
    with tempfile.TemporaryDirectory() as download:
        init_dir = setting.resolve_init(p.init_from, p, Path(download)) if p.init_from is not None else None
        meta["init"] = init_record(p.init_from, init_dir)
        run = setting.pretrain(p, objective, labels, train, held_out, init_dir, resume)

    if objective == "supervised":
        meta["labels"] = list(labels)
    setting.save_source(run, model_dir, meta)
    metrics = {
        "objective": objective,
        "source": data.source_kind,
        "steps": p.steps,
        "source_rows": len(train),
    } | run.metrics
    write_json(out_dir / "metrics.json", metrics)
    with (out_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(run.history_fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(run.history)
    write_json(out_dir / "timing.json", run.timing)
    result = PretrainResult(model_dir, objective, p.steps, run.metrics)
    log.info("pretrain: %s", asdict(result))
    return result


def _use_as_is(
    setting: Setting, p: PretrainParams, source: str, model_dir: Path, meta: dict, out_dir: Path
) -> PretrainResult:
    """No source, or steps: 0: the checkpoint unchanged."""
    assert p.init_from is not None
    with tempfile.TemporaryDirectory() as download:
        init_dir = setting.resolve_init(p.init_from, p, Path(download))
        setting.copy_checkpoint(init_dir, model_dir)
        meta["init"] = init_record(p.init_from, init_dir)
    write_json(model_dir / META_FILE, meta)
    write_json(out_dir / "metrics.json", {"objective": None, "source": source, "steps": 0})
    (out_dir / "history.csv").write_text("step,loss,lr\n")
    write_json(out_dir / "timing.json", {})
    why = "no source" if source == "none" else "steps: 0"
    log.info("pretrain: %s; using %s as it is", why, p.init_from)
    return PretrainResult(model_dir, None, 0)


if __name__ == "__main__":
    from tasks.wiring import main

    main("pretrain")
