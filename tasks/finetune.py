"""finetune: put the target's head on the source model and train it on the target task."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from tlpipe.checkpoint import WEIGHTS, seed_everything, source_lineage
from tlpipe.data import read_split, sha256_file
from tlpipe.files import fresh_dir, write_json
from tlpipe.params import DataParams, FinetuneParams
from tlpipe.resume import Resume
from tlpipe.setting import Setting
from tlpipe.train import Runtime, TrainResult, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    model_dir: Path
    best_step: int
    # The validation score that kept the best weights (the setting's selection metric).
    val_score: float

    def summary(self) -> str:
        return f"best at step {self.best_step:,} (validation {self.val_score:.4g}); model {self.model_dir}"


def write_history(path: Path, run: TrainResult) -> None:
    """One row per validation: step, epoch, train loss and every validation score."""
    fields = ["step", "epoch", "train_loss", *(k for k in run.history[0] if k.startswith("val_"))]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(run.history)


def finetune(
    setting: Setting,
    p: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    prepare_dir: Path,
    out_dir: Path,
    resume: Resume | None = None,
) -> FinetuneResult:
    """Fine-tune the checkpoint in `source_dir` on train under `p`'s strategy, keeping the
    weights of the best validation score; training resumes from the state it saved in
    `resume`.

    Writes `out_dir/model` (a self-contained checkpoint with its preprocessor and label
    map), `metrics.json`, `history.csv` (per validation) and `timing.json`.
    """
    seed_everything(p.seed)
    fresh_dir(out_dir)
    train_rows, val_rows = read_split(prepare_dir, "train"), read_split(prepare_dir, "val")
    arm = setting.transfer_arm(p, data, source_dir, prepare_dir)
    runtime = Runtime.pick(p.device, p.precision)
    run, task = fit(
        setting, arm, train_rows, val_rows, p, data, source_dir,
        runtime=runtime, resume=resume,
    )  # fmt: skip
    log.info("finetune: best step %d, val %s %.4f", run.best_step, task.selection.label, run.best_score)

    model_dir = out_dir / "model"
    setting.save(
        arm.model,
        source_dir,
        model_dir,
        {
            "stage": "finetune",
            "setting": setting.name,
            "params": p.model_dump(mode="json"),
            "labels": list(data.labels),
            "inputs": {name: sha256_file(prepare_dir / f"{name}.parquet") for name in ("train", "val")}
            | {"source_model": sha256_file(source_dir / WEIGHTS)},
            "max_length": p.max_length,
            "source": source_lineage(source_dir),
        },
    )
    write_json(
        out_dir / "metrics.json",
        {
            "best_step": run.best_step,
            "steps_run": run.steps,
            **{k: v for k, v in run.best().items() if k.startswith("val_")},
            "train_rows": task.rows,
            **setting.input_facts({"train": train_rows, "val": val_rows}, p, source_dir),
            "strategy": p.strategy,
            **arm.facts,
        },
    )
    write_history(out_dir / "history.csv", run)
    write_json(
        out_dir / "timing.json",
        {"seconds": run.seconds, "examples_per_second": run.examples / max(run.seconds, 1e-9)},
    )
    return FinetuneResult(model_dir, run.best_step, run.best_score)


if __name__ == "__main__":
    from tasks.wiring import main

    main("finetune")
