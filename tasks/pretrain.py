"""pretrain: build the source model on the source corpus (masked-LM or its labels)."""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from tlpipe.data import read_split, sha256_file, source_split, texts
from tlpipe.errors import DataError
from tlpipe.model import (
    META_FILE,
    bert_config,
    fresh_dir,
    load_mlm,
    load_transfer_classifier,
    new_classifier,
    new_mlm,
    resolve_init,
    save_checkpoint,
    seed_everything,
    write_json,
)
from tlpipe.params import DataParams, FinetuneParams, PretrainParams, pretrain_objective
from tlpipe.setting import Arm
from tlpipe.settings.text_classification.classifier import classifier_task
from tlpipe.settings.text_classification.layers import layer_groups
from tlpipe.settings.text_classification.mlm import MLM_EVAL_ROWS, mlm_eval_loss, train_mlm
from tlpipe.text import SpecialIds, encode, load_tokenizer, train_wordpiece
from tlpipe.train import Runtime, train_model

log = logging.getLogger(__name__)

CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class PretrainResult:
    model_dir: Path
    # None: the checkpoint was taken as it is.
    objective: str | None
    steps: int
    # Held-out source metrics: masked-LM loss before/after (mlm), accuracy and macro-F1
    # (supervised).
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Trained:
    model: PreTrainedModel
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    timing: dict[str, float]


def pretrain(p: PretrainParams, data: DataParams, prepare_dir: Path, out_dir: Path) -> PretrainResult:
    """Train or continue a source model on `prepare_dir/source.parquet` with the objective
    `pretrain_objective` picks: masked-LM on the source text, or a classifier on a labelled
    source's own label set. Without a source, or with `steps: 0`, the checkpoint is taken as
    it is.

    Writes `out_dir/model` (a self-contained HF checkpoint), `metrics.json` (held-out
    source metrics, or `source: none`), `history.csv` (per logged step or validation) and
    `timing.json`. Raises FileNotFoundError when `init_from` names no checkpoint, DataError
    when a supervised source row has no label from the source's label set.
    """
    seed_everything(p.seed)
    source_file = prepare_dir / "source.parquet"
    fresh_dir(out_dir)
    model_dir = out_dir / "model"
    objective = pretrain_objective(p, data)
    meta = {
        "stage": "pretrain",
        "params": p.model_dump(mode="json"),
        "objective": objective,
        "inputs": {"source.parquet": sha256_file(source_file)},
        "max_length": p.max_length,
    }
    if objective is None:
        return _use_as_is(p, data.source_kind, model_dir, meta, out_dir)
    labels = data.source_labels or ()

    held_out, train = source_split(read_split(prepare_dir, "source"))
    with tempfile.TemporaryDirectory() as download:
        init_dir = resolve_init(p.init_from, Path(download)) if p.init_from is not None else None
        if init_dir is not None:
            tok = load_tokenizer(init_dir)
            log.info("continuing %s with %s for %d steps", p.init_from, p.objective, p.steps)
        else:
            tok = train_wordpiece([t for t in texts(train) if t.strip()], p.tokenizer)
        if objective == "supervised":
            trained = _supervised(p, labels, tok, init_dir, train, held_out)
        else:
            trained = _mlm(p, tok, init_dir, train, held_out)

    if objective == "supervised":
        meta["labels"] = list(labels)
    save_checkpoint(trained.model, tok, model_dir, meta)
    metrics = {
        "objective": objective,
        "source": data.source_kind,
        "steps": p.steps,
        "source_rows": len(train),
    } | trained.metrics
    write_json(out_dir / "metrics.json", metrics)
    with (out_dir / "history.csv").open("w", newline="") as f:
        fields = ["step", "loss", "lr"] if objective == "mlm" else ["step", "loss", "val_accuracy"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(trained.history)
    write_json(out_dir / "timing.json", trained.timing)
    result = PretrainResult(model_dir, objective, p.steps, trained.metrics)
    log.info("pretrain: %s", asdict(result))
    return result


def _mlm(
    p: PretrainParams, tok: Tokenizer, init_dir: Path | None, train: pd.DataFrame, held_out: pd.DataFrame
) -> _Trained:
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
    )
    log.info("pretrain: %d steps, %d tokens, %.0f tokens/s", run.steps, run.tokens, run.tokens_per_second)
    after = mlm_eval_loss(model, eval_ids, special, **eval_kw) if eval_ids else float("nan")
    return _Trained(
        model,
        {"mlm_eval_loss_before": before, "mlm_eval_loss_after": after},
        run.history,
        {"tokens_per_second": run.tokens_per_second},
    )


def _supervised(
    p: PretrainParams,
    labels: tuple[str, ...],
    tok: Tokenizer,
    init_dir: Path | None,
    train: pd.DataFrame,
    held_out: pd.DataFrame,
) -> _Trained:
    """A classifier on the source labels, validated on held-out source rows (best kept)."""
    if init_dir is not None:
        model, _ = load_transfer_classifier(init_dir, labels)
    else:
        special = SpecialIds.of(tok)
        model = new_classifier(bert_config(p.model, tok.get_vocab_size(), special.pad, p.max_length), labels)
    # The fine-tuning loop over the source rows: exactly `steps` steps, no early stop.
    plan = FinetuneParams(
        seed=p.seed,
        max_length=p.max_length,
        epochs=1,
        min_steps=p.steps,
        max_steps=p.steps,
        evaluations=p.evaluations,
        patience=p.evaluations,
        optim=p.optim,
        device=p.device,
        precision=p.precision,
    )
    runtime = Runtime.pick(p.device, p.precision)
    try:
        task = classifier_task(Arm(model), train, held_out, plan, labels, tok, runtime)
    except DataError as err:
        raise DataError(f"supervised pretraining needs a source label on every source row: {err}") from None
    run = train_model(model, task, plan, layer_groups(model), runtime=runtime, desc="pretrain (supervised)")
    best = run.best()
    log.info(
        "pretrain: %d supervised steps, held-out source accuracy %.4f (step %d)",
        run.steps,
        best["val_accuracy"],
        run.best_step,
    )
    history = [
        {"step": r["step"], "loss": r["train_loss"], "val_accuracy": r["val_accuracy"]} for r in run.history
    ]
    return _Trained(
        model,
        {
            "held_out_rows": len(held_out),
            "best_step": run.best_step,
            "source_accuracy": best["val_accuracy"],
            "source_macro_f1": best["val_macro_f1"],
        },
        history,
        {"examples_per_second": run.examples / max(run.seconds, 1e-9)},
    )


def _use_as_is(p: PretrainParams, source: str, model_dir: Path, meta: dict, out_dir: Path) -> PretrainResult:
    """No source, or steps: 0: the checkpoint's files unchanged (every weight kept, pooler
    included)."""
    assert p.init_from is not None
    with tempfile.TemporaryDirectory() as download:
        init_dir = resolve_init(p.init_from, Path(download))
        load_tokenizer(init_dir)  # fails here, not in finetune, if it has no fast tokenizer
        model_dir.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            if (init_dir / name).is_file():
                shutil.copyfile(init_dir / name, model_dir / name)
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
