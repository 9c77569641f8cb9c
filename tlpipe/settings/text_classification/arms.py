"""The text classifiers each arm trains: transfer (the source model with the target's head,
its transfer objectives attached) and the from-scratch control."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tlpipe.data import read_split, texts
from tlpipe.params import DataParams, EncoderConfig, FinetuneParams
from tlpipe.setting import Arm
from tlpipe.settings.text_classification.mlm import SourceMlm, train_mlm
from tlpipe.settings.text_classification.model import (
    load_mlm,
    load_transfer_classifier,
    scratch_classifier,
    tied_mlm_head,
)
from tlpipe.settings.text_classification.text import SpecialIds, encode, load_tokenizer
from tlpipe.train import Runtime

log = logging.getLogger(__name__)

# Source rows kept in memory for the joint loss (it cycles through them).
JOINT_SOURCE_ROWS = 20_000


def unlabelled_target(prepare_dir: Path, tok_dir: Path, max_length: int) -> list[np.ndarray]:
    """The target's text without labels (train and pool): what task-adaptive pretraining reads."""
    rows = [t for split in ("train", "pool") for t in texts(read_split(prepare_dir, split))]
    return encode(load_tokenizer(tok_dir), rows, max_length)


def transfer_arm(p: FinetuneParams, labels: tuple[str, ...], source_dir: Path, prepare_dir: Path) -> Arm:
    """The source model with a new head, after `tapt_steps` of masked-LM on the target's
    unlabelled text (`facts["tapt"]`), and with the source masked-LM objective attached
    (`extras`, a SourceMlm) when `joint_alpha`."""
    model, transferred = load_transfer_classifier(source_dir, labels)
    if not (p.tapt_steps or p.joint_alpha):
        return Arm(model, transferred, None, {"tapt": None})
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
    return Arm(model, transferred, source_mlm, {"tapt": tapt})


def scratch_arm(data: DataParams, source_dir: Path, size: EncoderConfig | None) -> Arm:
    """A randomly initialised classifier on the source model's vocabulary: its architecture,
    or an encoder of `size`."""
    return Arm(scratch_classifier(source_dir, data.labels, size))
