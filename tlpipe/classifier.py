"""Text classification: the transfer and scratch classifiers the finetune and evaluate
stages train, built from the source model and the prepared splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from tlpipe.data import label_ids, read_split, texts
from tlpipe.model import load_mlm, load_transfer_classifier, tied_mlm_head
from tlpipe.params import FinetuneParams
from tlpipe.text import SpecialIds, encode, load_tokenizer
from tlpipe.train import Runtime, SourceMlm, train_mlm

log = logging.getLogger(__name__)

# Source rows kept in memory for the joint loss (it cycles through them).
JOINT_SOURCE_ROWS = 20_000


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


def scratch_params(ft: FinetuneParams, lr: float) -> FinetuneParams:
    """The control trains every layer, with no transfer objective, at its own learning rate
    (on the same budget as transfer)."""
    return ft.model_copy(
        update={
            "strategy": "full",
            "freeze_bottom": 0,
            "layer_decay": 1.0,
            "l2sp": 0.0,
            "joint_alpha": 0.0,
            "tapt_steps": 0,
            "optim": ft.optim.model_copy(update={"lr": lr}),
        }
    )
