"""finetune: put a classification head on the source model and train it on the target task."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from tlpipe.classifier import encode_split, transfer_setup
from tlpipe.data import read_split, sha256_file, texts
from tlpipe.model import fresh_dir, save_checkpoint, seed_everything, write_json
from tlpipe.params import FinetuneParams
from tlpipe.text import SpecialIds, load_tokenizer, truncated_share
from tlpipe.train import ClassifierResult, Runtime, train_classifier

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["step", "epoch", "train_loss", "val_accuracy", "val_macro_f1"]


@dataclass(frozen=True)
class FinetuneResult:
    model_dir: Path
    best_step: int
    val_macro_f1: float


def write_history(path: Path, run: ClassifierResult) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(run.history)


def finetune(
    p: FinetuneParams, labels: tuple[str, ...], source_dir: Path, prepare_dir: Path, out_dir: Path
) -> FinetuneResult:
    """Fine-tune the checkpoint in `source_dir` on train under `p`'s strategy, keeping the
    weights of the best validation macro-F1.

    Writes `out_dir/model` (a self-contained HF checkpoint with its tokenizer and label
    map), `metrics.json`, `history.csv` (per validation), `timing.json` and
    `checkpoints/last.pt` (full training state after the latest validation).
    """
    seed_everything(p.seed)
    fresh_dir(out_dir)
    tok = load_tokenizer(source_dir)
    pad = SpecialIds.of(tok).pad
    train_ids, train_y = encode_split(prepare_dir, "train", source_dir, labels, p.max_length)
    val_ids, val_y = encode_split(prepare_dir, "val", source_dir, labels, p.max_length)
    setup = transfer_setup(p, labels, source_dir, prepare_dir)
    run = train_classifier(
        setup.model,
        train_ids,
        train_y,
        val_ids,
        val_y,
        p,
        pad,
        transferred=setup.transferred,
        source_mlm=setup.source_mlm,
        checkpoint_dir=out_dir / "checkpoints",
        runtime=Runtime.pick(p.device, p.precision),
    )
    log.info("finetune: best step %d, val macro-F1 %.4f", run.best_step, run.best_val_macro_f1)

    model_dir = out_dir / "model"
    save_checkpoint(
        setup.model,
        tok,
        model_dir,
        {
            "stage": "finetune",
            "params": p.model_dump(mode="json"),
            "labels": list(labels),
            "inputs": {name: sha256_file(prepare_dir / f"{name}.parquet") for name in ("train", "val")}
            | {"source_model": sha256_file(source_dir / "model.safetensors")},
            "max_length": p.max_length,
        },
    )
    best = next(row for row in run.history if row["step"] == run.best_step)
    write_json(
        out_dir / "metrics.json",
        {
            "best_step": run.best_step,
            "steps_run": run.steps,
            "val_accuracy": best["val_accuracy"],
            "val_macro_f1": best["val_macro_f1"],
            "train_rows": len(train_ids),
            # Rows longer than max_length tokens keep their head; how many were cut.
            "truncated": {
                "max_length": p.max_length,
                **{
                    f"{split}_share": truncated_share(
                        tok, texts(read_split(prepare_dir, split)), p.max_length
                    )
                    for split in ("train", "val")
                },
            },
            "strategy": p.strategy,
            "tapt": setup.tapt,
        },
    )
    write_history(out_dir / "history.csv", run)
    write_json(
        out_dir / "timing.json",
        {"seconds": run.seconds, "examples_per_second": run.examples / max(run.seconds, 1e-9)},
    )
    return FinetuneResult(model_dir, run.best_step, run.best_val_macro_f1)


if __name__ == "__main__":
    from tasks.wiring import main

    main("finetune")
