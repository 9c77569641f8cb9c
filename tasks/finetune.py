"""finetune: put a classification head on the source model and train it on the target task."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from tlpipe.data import label_ids, read_split, sha256_file, texts
from tlpipe.model import (
    fresh_dir,
    load_mlm,
    load_transfer_classifier,
    save_checkpoint,
    seed_everything,
    tied_mlm_head,
    write_json,
)
from tlpipe.params import FinetuneParams
from tlpipe.text import SpecialIds, encode, load_tokenizer
from tlpipe.train import ClassifierResult, Runtime, SourceMlm, train_classifier, train_mlm

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["step", "epoch", "train_loss", "val_accuracy", "val_macro_f1"]
# Source rows kept in memory for the joint loss (it cycles through them).
JOINT_SOURCE_ROWS = 20_000


@dataclass(frozen=True)
class FinetuneResult:
    model_dir: Path
    best_step: int
    val_macro_f1: float


@dataclass
class TransferSetup:
    """A classifier built from the source model under a strategy, ready to train."""

    model: PreTrainedModel
    transferred: set[str]
    source_mlm: SourceMlm | None
    tapt: dict[str, float] | None


def encode_split(
    prepare_dir: Path, split: str, tok_dir: Path, labels: tuple[str, ...], max_length: int
) -> tuple[list[np.ndarray], np.ndarray]:
    frame = read_split(prepare_dir, split)
    return encode(load_tokenizer(tok_dir), texts(frame), max_length), label_ids(frame, labels)


def unlabelled_target(prepare_dir: Path, tok_dir: Path, max_length: int) -> list[np.ndarray]:
    """The target's text without labels (train and pool): what task-adaptive pretraining reads."""
    rows = [t for split in ("train", "pool") for t in texts(read_split(prepare_dir, split))]
    return encode(load_tokenizer(tok_dir), rows, max_length)


def transfer_setup(
    p: FinetuneParams, labels: tuple[str, ...], source_dir: Path, prepare_dir: Path
) -> TransferSetup:
    """The source model with a new head, after `tapt_steps` of masked-LM on the target's
    unlabelled text, and with the source masked-LM objective attached when `joint_alpha`."""
    model, transferred = load_transfer_classifier(source_dir, labels)
    if not (p.tapt_steps or p.joint_alpha):
        return TransferSetup(model, transferred, None, None)
    tok = load_tokenizer(source_dir)
    special = SpecialIds.of(tok)
    tapt = None
    if p.tapt_steps:
        mlm = load_mlm(source_dir)
        run = train_mlm(
            mlm,
            unlabelled_target(prepare_dir, source_dir, p.max_length),
            special,
            steps=p.tapt_steps,
            optim=p.optim,
            mask_prob=p.mask_prob,
            seed=p.seed,
            log_every=max(1, p.tapt_steps // 10),
            runtime=Runtime.pick(p.device, p.precision),
            desc="task-adaptive pretraining",
        )
        model.base_model.load_state_dict(mlm.base_model.state_dict(), strict=False)
        tapt = {
            "steps": run.steps,
            "first_loss": run.history[0]["loss"],
            "last_loss": run.history[-1]["loss"],
        }
        log.info(
            "task-adaptive pretraining: %d steps, loss %.3f -> %.3f", run.steps, *list(tapt.values())[1:]
        )
    source_mlm = None
    if p.joint_alpha:
        source = texts(read_split(prepare_dir, "source"))[:JOINT_SOURCE_ROWS]
        source_mlm = SourceMlm(
            head=tied_mlm_head(source_dir, model),
            ids=encode(tok, source, p.max_length),
            special=special,
            alpha=p.joint_alpha,
            mask_prob=p.mask_prob,
        )
    return TransferSetup(model, transferred, source_mlm, tapt)


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
