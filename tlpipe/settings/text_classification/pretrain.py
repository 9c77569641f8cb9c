"""The text setting's source model: masked-LM on the source text, or a classifier on a
labelled source's own label set, from a checkpoint or from nothing (a WordPiece tokenizer
trained on the source first)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer

from tlpipe.data import texts
from tlpipe.params import PretrainParams
from tlpipe.resume import Resume
from tlpipe.setting import Arm, SourceRun
from tlpipe.settings.text_classification.classifier import classifier_task
from tlpipe.settings.text_classification.layers import layer_groups
from tlpipe.settings.text_classification.mlm import MLM_EVAL_ROWS, mlm_eval_loss, train_mlm
from tlpipe.settings.text_classification.model import (
    bert_config,
    load_mlm,
    load_transfer_classifier,
    new_classifier,
    new_mlm,
)
from tlpipe.settings.text_classification.text import SpecialIds, encode, load_tokenizer, train_wordpiece
from tlpipe.train import Runtime, train_supervised_source

log = logging.getLogger(__name__)

# A Hugging Face checkpoint's files that a source model is made of.
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def train_source(
    p: PretrainParams,
    objective: str,
    labels: tuple[str, ...],
    train: pd.DataFrame,
    held_out: pd.DataFrame,
    init_dir: Path | None,
    resume: Resume | None = None,
) -> SourceRun:
    """Continue `init_dir` (its tokenizer kept) or build a new encoder (a WordPiece
    tokenizer trained on the source text) with `objective`, masked-LM or supervised."""
    if init_dir is not None:
        tok = load_tokenizer(init_dir)
        log.info("continuing %s with %s for %d steps", p.init_from, objective, p.steps)
    else:
        tok = train_wordpiece([t for t in texts(train) if t.strip()], p.tokenizer)
    if objective == "supervised":
        return _supervised(p, labels, tok, init_dir, train, held_out, resume)
    return _mlm(p, tok, init_dir, train, held_out, resume)


def _mlm(
    p: PretrainParams,
    tok: Tokenizer,
    init_dir: Path | None,
    train: pd.DataFrame,
    held_out: pd.DataFrame,
    resume: Resume | None,
) -> SourceRun:
    """Masked-LM on the source text; held-out loss before (a loaded checkpoint) and after."""
    special = SpecialIds.of(tok)
    if init_dir is not None:
        model = load_mlm(init_dir)
    else:
        model = new_mlm(bert_config(p.model, tok.get_vocab_size(), special.pad, p.max_length))
        log.info("new encoder: %d parameters, vocab %d", model.num_parameters(), tok.get_vocab_size())
    train_ids = encode(tok, [t for t in texts(train) if t.strip()], p.max_length)
    eval_ids = encode(tok, [t for t in texts(held_out) if t.strip()][:MLM_EVAL_ROWS], p.max_length)
    eval_kw = {"mask_prob": p.mask_prob, "seed": p.seed}
    before = mlm_eval_loss(model, eval_ids, special, **eval_kw) if init_dir and eval_ids else None
    run = train_mlm(
        model,
        train_ids,
        special,
        steps=p.steps,
        optim=p.optim,
        mask_prob=p.mask_prob,
        seed=p.seed,
        log_every=p.log_every,
        runtime=Runtime.pick(p.device, p.precision),
        resume=resume,
    )
    log.info("pretrain: %d steps, %d tokens, %.0f tokens/s", run.steps, run.tokens, run.tokens_per_second)
    after = mlm_eval_loss(model, eval_ids, special, **eval_kw) if eval_ids else float("nan")
    return SourceRun(
        model,
        tok,
        {"mlm_eval_loss_before": before, "mlm_eval_loss_after": after},
        run.history,
        ("step", "loss", "lr"),
        {"tokens_per_second": run.tokens_per_second},
    )


def _supervised(
    p: PretrainParams,
    labels: tuple[str, ...],
    tok: Tokenizer,
    init_dir: Path | None,
    train: pd.DataFrame,
    held_out: pd.DataFrame,
    resume: Resume | None,
) -> SourceRun:
    """A classifier on the source labels, validated on held-out source rows (best kept)."""
    if init_dir is not None:
        model, _ = load_transfer_classifier(init_dir, labels)
    else:
        special = SpecialIds.of(tok)
        model = new_classifier(bert_config(p.model, tok.get_vocab_size(), special.pad, p.max_length), labels)
    return train_supervised_source(
        model,
        tok,
        lambda plan, runtime: classifier_task(Arm(model), train, held_out, plan, labels, tok, runtime),
        p,
        layer_groups(model),
        len(held_out),
        resume,
    )


def copy_checkpoint(init_dir: Path, model_dir: Path) -> None:
    """The checkpoint's files unchanged (every weight kept, pooler included); fails here,
    not in finetune, when it has no fast tokenizer."""
    load_tokenizer(init_dir)
    model_dir.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        if (init_dir / name).is_file():
            shutil.copyfile(init_dir / name, model_dir / name)
