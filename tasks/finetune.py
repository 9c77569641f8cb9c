"""finetune: put a classification head on the source model and train it on the target task."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe.data import label_ids, read_split, sha256_file, texts
from tlpipe.model import fresh_dir, load_classifier, save_checkpoint, seed_everything, write_json
from tlpipe.params import FinetuneParams
from tlpipe.text import SpecialIds, encode, load_tokenizer
from tlpipe.train import ClassifierResult, train_classifier

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "val_accuracy", "val_macro_f1"]


@dataclass(frozen=True)
class FinetuneResult:
    model_dir: Path
    best_epoch: int
    val_macro_f1: float


def encode_split(
    prepare_dir: Path, split: str, tok_dir: Path, labels: tuple[str, ...], max_length: int
) -> tuple[list[np.ndarray], np.ndarray]:
    frame = read_split(prepare_dir, split)
    return encode(load_tokenizer(tok_dir), texts(frame), max_length), label_ids(frame, labels)


def write_history(path: Path, run: ClassifierResult) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(run.history)


def finetune(
    p: FinetuneParams, labels: tuple[str, ...], source_dir: Path, prepare_dir: Path, out_dir: Path
) -> FinetuneResult:
    """Fine-tune the checkpoint in `source_dir` on train, early-stopping on val macro-F1.

    Writes `out_dir/model` (the best epoch, a self-contained HF checkpoint with its
    tokenizer and label map), `metrics.json`, `history.csv` (per epoch), `timing.json`
    and `checkpoints/last.pt` (full training state after the latest epoch).
    """
    seed_everything(p.seed)
    fresh_dir(out_dir)
    tok = load_tokenizer(source_dir)
    pad = SpecialIds.of(tok).pad
    train_ids, train_y = encode_split(prepare_dir, "train", source_dir, labels, p.max_length)
    val_ids, val_y = encode_split(prepare_dir, "val", source_dir, labels, p.max_length)
    model = load_classifier(source_dir, labels)
    run = train_classifier(
        model, train_ids, train_y, val_ids, val_y, p, pad, checkpoint_dir=out_dir / "checkpoints"
    )
    log.info("finetune: best epoch %d, val macro-F1 %.4f", run.best_epoch, run.best_val_macro_f1)

    model_dir = out_dir / "model"
    save_checkpoint(
        model,
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
    best = run.history[run.best_epoch - 1]
    write_json(
        out_dir / "metrics.json",
        {
            "best_epoch": run.best_epoch,
            "epochs_run": len(run.history),
            "val_accuracy": best["val_accuracy"],
            "val_macro_f1": best["val_macro_f1"],
            "train_rows": len(train_ids),
        },
    )
    write_history(out_dir / "history.csv", run)
    write_json(
        out_dir / "timing.json",
        {"seconds": run.seconds, "examples_per_second": run.examples / max(run.seconds, 1e-9)},
    )
    return FinetuneResult(model_dir, run.best_epoch, run.best_val_macro_f1)


if __name__ == "__main__":
    from tlpipe.entry import main
    from tlpipe.params import stage_dir

    main(
        "finetune",
        lambda params, out: finetune(
            params.finetune,
            params.prepare.labels,
            stage_dir("pretrain") / "model",
            stage_dir("prepare"),
            out,
        ),
    )
