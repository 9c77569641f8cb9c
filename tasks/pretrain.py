"""pretrain: build the source model with masked-LM on the source corpus."""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tlpipe.data import read_split, sha256_file, texts
from tlpipe.model import (
    META_FILE,
    bert_config,
    fresh_dir,
    load_mlm,
    new_mlm,
    resolve_init,
    save_checkpoint,
    seed_everything,
    write_json,
)
from tlpipe.params import PretrainParams
from tlpipe.text import SpecialIds, encode, load_tokenizer, train_wordpiece
from tlpipe.train import Runtime, mlm_eval_loss, train_mlm

log = logging.getLogger(__name__)

CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

# Source rows held out to measure masked-LM loss (before/after, and forgetting later on).
EVAL_ROWS = 512


@dataclass(frozen=True)
class PretrainResult:
    model_dir: Path
    steps: int
    mlm_loss_before: float | None
    mlm_loss_after: float
    tokens_per_second: float


def pretrain(p: PretrainParams, prepare_dir: Path, out_dir: Path) -> PretrainResult:
    """Train or continue a masked-LM encoder on `prepare_dir/source.parquet`.

    Writes `out_dir/model` (a self-contained HF checkpoint), `metrics.json` (held-out
    masked-LM loss before and after), `history.csv` (loss per logged step) and
    `timing.json`. Raises FileNotFoundError when `init_from` names no checkpoint.
    """
    seed_everything(p.seed)
    source_file = prepare_dir / "source.parquet"
    fresh_dir(out_dir)
    model_dir = out_dir / "model"
    meta = {
        "stage": "pretrain",
        "params": p.model_dump(mode="json"),
        "inputs": {"source.parquet": sha256_file(source_file)},
        "max_length": p.max_length,
    }
    if p.init_from is not None and p.steps == 0:
        return _use_as_is(p, model_dir, meta, out_dir)

    corpus = [t for t in texts(read_split(prepare_dir, "source")) if t.strip()]
    n_eval = min(EVAL_ROWS, len(corpus) // 10)
    eval_texts, train_texts = corpus[:n_eval], corpus[n_eval:]

    with tempfile.TemporaryDirectory() as download:
        if p.init_from is not None:
            init_dir = resolve_init(p.init_from, Path(download))
            tok = load_tokenizer(init_dir)
            model = load_mlm(init_dir)
            log.info("continuing %s (%s) for %d steps", p.init_from, type(model).__name__, p.steps)
        else:
            tok = train_wordpiece(train_texts, p.tokenizer)
            special = SpecialIds.of(tok)
            model = new_mlm(bert_config(p.model, tok.get_vocab_size(), special.pad, p.max_length))
            log.info("new encoder: %d parameters, vocab %d", model.num_parameters(), tok.get_vocab_size())
    special = SpecialIds.of(tok)
    train_ids = encode(tok, train_texts, p.max_length)
    eval_ids = encode(tok, eval_texts, p.max_length)
    eval_kw = {"mask_prob": p.mask_prob, "seed": p.seed}

    before = mlm_eval_loss(model, eval_ids, special, **eval_kw) if p.init_from and eval_ids else None
    history, tps = [], 0.0
    if p.steps:
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
        history, tps = run.history, run.tokens_per_second
        log.info("pretrain: %d steps, %d tokens, %.0f tokens/s", run.steps, run.tokens, tps)
    after = mlm_eval_loss(model, eval_ids, special, **eval_kw) if eval_ids else float("nan")

    model_dir = out_dir / "model"
    save_checkpoint(
        model,
        tok,
        model_dir,
        {
            "stage": "pretrain",
            "params": p.model_dump(mode="json"),
            "inputs": {"source.parquet": sha256_file(source_file)},
            "max_length": p.max_length,
        },
    )
    write_json(
        out_dir / "metrics.json",
        {
            "steps": p.steps,
            "source_rows": len(train_texts),
            "mlm_eval_loss_before": before,
            "mlm_eval_loss_after": after,
        },
    )
    with (out_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    result = PretrainResult(model_dir, p.steps, before, after, tps)
    write_json(out_dir / "timing.json", {"tokens_per_second": tps})
    log.info("pretrain: %s", asdict(result))
    return result


def _use_as_is(p: PretrainParams, model_dir: Path, meta: dict, out_dir: Path) -> PretrainResult:
    """steps: 0 takes the checkpoint's files unchanged (every weight kept, pooler included)."""
    assert p.init_from is not None
    with tempfile.TemporaryDirectory() as download:
        init_dir = resolve_init(p.init_from, Path(download))
        load_tokenizer(init_dir)  # fails here, not in finetune, if it has no fast tokenizer
        model_dir.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            if (init_dir / name).is_file():
                shutil.copyfile(init_dir / name, model_dir / name)
    write_json(model_dir / META_FILE, meta)
    write_json(
        out_dir / "metrics.json", {"steps": 0, "mlm_eval_loss_before": None, "mlm_eval_loss_after": None}
    )
    (out_dir / "history.csv").write_text("step,loss,lr\n")
    write_json(out_dir / "timing.json", {"tokens_per_second": 0.0})
    log.info("pretrain: using %s as it is", p.init_from)
    return PretrainResult(model_dir, 0, None, float("nan"), 0.0)


if __name__ == "__main__":
    from tlpipe.entry import main
    from tlpipe.params import stage_dir

    main("pretrain", lambda params, out: pretrain(params.pretrain, stage_dir("prepare"), out))
