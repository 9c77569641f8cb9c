"""Rows to batches, loss and validation for a text classifier, and its predictions."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from tlpipe.batching import length_batches
from tlpipe.data import label_ids, texts
from tlpipe.metrics import classification_metrics, write_confusion
from tlpipe.params import FinetuneParams
from tlpipe.setting import Arm, Metric
from tlpipe.settings.text_classification import METRICS
from tlpipe.settings.text_classification.fastpath import classifier_fast_paths, first_token_only
from tlpipe.settings.text_classification.mlm import SourceMlm, iterate_batches, mlm_loss, pad_batch
from tlpipe.settings.text_classification.text import SpecialIds, encode, load_tokenizer, truncated_share
from tlpipe.train import Runtime

# The validation score that keeps a run's best weights: macro-F1 does not reward a model
# for favouring the majority class.
SELECTION = METRICS["macro_f1"]


@dataclass
class ClassifierTask:
    """A text classifier's `TrainTask`: length-bucketed batches with dynamic padding, cross
    entropy (mixed with the source masked-LM loss under the joint objective), and
    accuracy and macro-F1 on validation."""

    ids: Sequence[np.ndarray]
    y: np.ndarray
    val_ids: Sequence[np.ndarray]
    val_y: np.ndarray
    pad: int
    n_labels: int
    batch_size: int
    eval_batch_size: int
    runtime: Runtime
    seed: int
    source_mlm: SourceMlm | None = None
    selection: Metric = SELECTION
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.ids)
        self._lengths = np.fromiter((len(s) for s in self.ids), dtype=np.int64, count=len(self.ids))
        self._labels = torch.tensor(self.y, dtype=torch.long, device=self.runtime.device)
        # The joint loss's masking draws and source batches.
        self._gen = torch.Generator().manual_seed(self.seed)
        self._source_batches: list[np.ndarray] = []
        if self.source_mlm is not None:
            self.source_mlm.head.to(self.runtime.device)
            self._source_lengths = np.fromiter((len(s) for s in self.source_mlm.ids), dtype=np.int64)

    def epoch(self, rng: np.random.Generator) -> list[np.ndarray]:
        return length_batches(self._lengths, self.batch_size, rng)

    def loss(self, model: nn.Module, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        device = self.runtime.device
        input_ids, mask = (t.to(device) for t in pad_batch([self.ids[i] for i in idx], self.pad))
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, C)
        loss = F.cross_entropy(logits.float(), self._labels[torch.from_numpy(idx).to(device)])
        src = self.source_mlm
        if src is None:
            return loss
        if not self._source_batches:
            self._source_batches = length_batches(self._source_lengths, self.batch_size, rng)
        src_ids, src_mask = pad_batch([src.ids[i] for i in self._source_batches.pop()], self.pad)
        source_loss, _ = mlm_loss(
            model.base_model, src.head, src_ids, src_mask, src.special,
            model.config.vocab_size, src.mask_prob, self._gen, self.runtime,
        )  # fmt: skip
        return (1 - src.alpha) * loss + src.alpha * source_loss

    def validate(self, model: nn.Module) -> dict[str, float]:
        pred = predict_logits(model, self.val_ids, self.pad, self.eval_batch_size, self.runtime).argmax(1)
        scores = classification_metrics(self.val_y, pred, self.n_labels)
        return {f"val_{key}": scores[key] for key in METRICS}

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.source_mlm.head.parameters()) if self.source_mlm is not None else []

    def fast_paths(
        self, model: nn.Module, runtime: Runtime, seed: int | np.random.Generator
    ) -> contextlib.ExitStack:
        # The joint loss reads every position of the last layer and shares the embedding
        # with the source head: the [CLS]-only and row-sparse paths do not apply.
        return classifier_fast_paths(runtime, model, seed, logits_only=self.source_mlm is None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "gen": self._gen.get_state(),
            "source_batches": [torch.from_numpy(b) for b in self._source_batches],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["gen"])
        self._source_batches = [b.numpy() for b in state["source_batches"]]


@torch.no_grad()
def predict_logits(
    model: PreTrainedModel,
    ids: Sequence[np.ndarray],
    pad_id: int,
    batch_size: int,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Logits (N, C) in the order of `ids`, batched by length to keep padding small, the
    last layer run for [CLS] alone; in fp32 on the model's device unless a `runtime` says
    otherwise."""
    was_training = model.training
    model.eval()
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    device = next(model.parameters()).device
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float32)
    batches = iterate_batches(ids, length_batches(lengths, batch_size, None), pad_id)
    with first_token_only(model):
        for idx, input_ids, mask in batches:
            with runtime.autocast() if runtime else contextlib.nullcontext():
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def classifier_task(
    arm: Arm,
    train: pd.DataFrame,
    val: pd.DataFrame,
    p: FinetuneParams,
    labels: tuple[str, ...],
    tok: Tokenizer,
    runtime: Runtime,
) -> ClassifierTask:
    """`arm` trained on `train` and validated on `val`, its text encoded by `tok`."""
    return ClassifierTask(
        encode(tok, texts(train), p.max_length, p.truncation),
        label_ids(train, labels),
        encode(tok, texts(val), p.max_length, p.truncation),
        label_ids(val, labels),
        pad=SpecialIds.of(tok).pad,
        n_labels=len(labels),
        batch_size=p.optim.batch_size,
        eval_batch_size=p.eval_batch_size,
        runtime=runtime,
        seed=p.seed,
        source_mlm=arm.extras,
    )


def score(
    model: PreTrainedModel,
    rows: pd.DataFrame,
    p: FinetuneParams,
    labels: tuple[str, ...],
    tok_dir: Path,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 of `model` on `rows` (in fp32 unless `runtime` says otherwise)."""
    tok = load_tokenizer(tok_dir)
    pred = predict_logits(
        model,
        encode(tok, texts(rows), p.max_length, p.truncation),
        SpecialIds.of(tok).pad,
        p.eval_batch_size,
        runtime,
    )
    scores = classification_metrics(label_ids(rows, labels), pred.argmax(1), len(labels))
    return {key: scores[key] for key in METRICS}


def shipped(
    model_dir: Path, test: pd.DataFrame, p: FinetuneParams, labels: tuple[str, ...], out_dir: Path
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The shipped classifier on test: every classification metric, per class by name, the
    share of test rows cut to max_length (`p.truncation`); writes `out_dir/confusion.csv` (a DVC plot)."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    test_ids, test_y = encode(tok, texts(test), p.max_length, p.truncation), label_ids(test, labels)
    pred = predict_logits(model, test_ids, SpecialIds.of(tok).pad, p.eval_batch_size).argmax(1)
    metrics = classification_metrics(test_y, pred, len(labels))
    metrics["per_class"] = dict(zip(labels, metrics["per_class"], strict=True))
    metrics["truncated_share"] = truncated_share(tok, texts(test), p.max_length)
    write_confusion(out_dir / "confusion.csv", labels, test_y, pred)
    return model, metrics
