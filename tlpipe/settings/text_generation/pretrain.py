"""The language model's source model: a new LSTM or GPT (a byte-level BPE tokenizer trained
on the source text first), or a checkpoint continued, trained on the source corpus with the
next-token loss and scored on held-out source text."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer
from torch import nn

from tlpipe.data import texts
from tlpipe.params import PretrainParams
from tlpipe.resume import Resume
from tlpipe.setting import SourceRun
from tlpipe.settings.text_generation.lm import LanguageModelTask, scores, stream_nll
from tlpipe.settings.text_generation.model import (
    context_limit,
    layer_groups,
    load_lm,
    new_gpt,
    new_lstm,
    save_lm,
)
from tlpipe.settings.text_generation.tokenizer import eos_id, load_tokenizer, token_stream, train_bpe
from tlpipe.train import Runtime, source_plan, train_model

log = logging.getLogger(__name__)


def new_model(p: PretrainParams, tok: Tokenizer) -> nn.Module:
    """A new model of `p.lm` over `tok`'s vocabulary (a GPT reads `p.max_length` positions)."""
    m, vocab = p.lm, tok.get_vocab_size()
    if m.architecture == "lstm":
        return new_lstm(vocab, m.hidden_size, m.num_layers, m.dropout)
    return new_gpt(vocab, m.hidden_size, m.num_layers, m.num_heads, m.dropout, p.max_length, eos_id(tok))


def check_block(model: nn.Module, block: int, key: str) -> None:
    """A decoder trains on blocks no longer than its positions."""
    limit = context_limit(model)
    if limit is not None and block > limit:
        raise ValueError(f"{key} is {block} tokens, but the model reads at most {limit} positions")


def load_source(model_dir: Path) -> tuple[nn.Module, Tokenizer]:
    """A checkpoint's language model and tokenizer, checked to be one tlpipe generates with
    (the tokenizer has the EOS that separates texts)."""
    tok = load_tokenizer(model_dir)
    eos_id(tok)
    return load_lm(model_dir), tok


def train_source(
    p: PretrainParams,
    objective: str,
    labels: tuple[str, ...],
    train: pd.DataFrame,
    held_out: pd.DataFrame,
    init_dir: Path | None,
    resume: Resume | None = None,
) -> SourceRun:
    """Continue `init_dir` (its tokenizer kept) or build `p.lm` over a byte-level BPE
    tokenizer trained on the source text; `p.steps` steps of the next-token loss on
    blocks of `p.max_length` source tokens, validated `p.evaluations` times on held-out
    source text (the best kept)."""
    if init_dir is not None:
        model, tok = load_source(init_dir)
        log.info("continuing %s with %s for %d steps", p.init_from, objective, p.steps)
    else:
        tok = train_bpe([t for t in texts(train) if t.strip()], p.tokenizer)
        model = new_model(p, tok)
    check_block(model, p.max_length, "pretrain.max_length")
    runtime = Runtime.pick(p.device, p.precision)
    stream, val = token_stream(tok, texts(train)), token_stream(tok, texts(held_out))
    task = LanguageModelTask(stream, val, p.max_length, p.optim.batch_size, 64, runtime, p.seed)
    before = scores(stream_nll(model, val, task.block, 64)) if init_dir is not None else None
    run = train_model(
        model,
        task,
        source_plan(p),
        layer_groups(model),
        runtime=runtime,
        resume=resume,
        desc="pretrain (causal LM)",
    )
    best = run.best()
    log.info(
        "pretrain: %d steps, held-out source perplexity %.2f (step %d)",
        run.steps,
        best["val_perplexity"],
        run.best_step,
    )
    return SourceRun(
        model.cpu().eval(),
        tok,
        {
            "held_out_rows": len(held_out),
            "held_out_tokens": len(val) - 1,
            "source_tokens": len(stream) - 1,
            "vocab_size": tok.get_vocab_size(),
            "best_step": run.best_step,
            "source_perplexity_before": before and before["perplexity"],
            "source_perplexity": best["val_perplexity"],
            "source_loss": best["val_loss"],
        },
        [
            {"step": r["step"], "loss": r["train_loss"], "val_perplexity": r["val_perplexity"]}
            for r in run.history
        ],
        ("step", "loss", "val_perplexity"),
        {"tokens_per_second": run.examples * task.block / max(run.seconds, 1e-9)},
    )


def copy_checkpoint(init_dir: Path, model_dir: Path) -> None:
    """A checkpoint taken as it is, rewritten as tlpipe's (safetensors, tokenizer.json)."""
    model, tok = load_source(init_dir)
    save_lm(model, tok, model_dir, {})
