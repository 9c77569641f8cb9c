"""export: ONNX with dynamic batch and sequence axes, gated on parity with PyTorch."""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from tlpipe.data import read_split, texts
from tlpipe.errors import GateFailed
from tlpipe.model import fresh_dir, write_json
from tlpipe.params import ExportParams
from tlpipe.serve import Bundle, BundleSpec
from tlpipe.text import SpecialIds, load_tokenizer
from tlpipe.train import predict_logits

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")


class _Logits(nn.Module):
    """The classifier as a function of (input_ids, attention_mask) returning logits only."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass(frozen=True)
class ExportResult:
    bundle_dir: Path
    rows: int
    max_abs_diff: float
    argmax_agreement: float


def export(
    p: ExportParams, max_length: int, finetune_dir: Path, prepare_dir: Path, out_dir: Path
) -> ExportResult:
    """Export `finetune_dir/model` to `out_dir/bundle` (model.onnx, tokenizer.json,
    bundle.json, labels.json) and compare onnxruntime with PyTorch over the whole test split.

    Writes `parity.json`; raises GateFailed unless max |Δlogit| <= p.max_abs_diff and the
    argmax agrees on every row.
    """
    fresh_dir(out_dir)
    model_dir = finetune_dir / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    pad = SpecialIds.of(tok).pad
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))

    bundle_dir = out_dir / "bundle"
    bundle_dir.mkdir()
    sample = torch.tensor([[SpecialIds.of(tok).cls, 1000 % tok.get_vocab_size(), SpecialIds.of(tok).sep]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(model),
            (sample.repeat(2, 1), torch.ones(2, 3, dtype=torch.long)),
            str(bundle_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=p.opset,
            dynamo=False,
        )
    shutil.copyfile(model_dir / "tokenizer.json", bundle_dir / "tokenizer.json")
    spec = BundleSpec(labels=labels, max_length=max_length, pad_id=pad, input_names=INPUT_NAMES)
    write_json(bundle_dir / "bundle.json", spec.to_json())
    write_json(bundle_dir / "labels.json", dict(enumerate(labels)))

    bundle = Bundle(bundle_dir)
    ids = bundle.encode(texts(read_split(prepare_dir, "test")))
    ort_logits = bundle.logits_of_ids(ids, p.batch_size)
    torch_logits = predict_logits(model, ids, pad, p.batch_size)
    diff = float(np.abs(ort_logits - torch_logits).max()) if len(ids) else 0.0
    agree = float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()) if len(ids) else 1.0
    write_json(
        out_dir / "parity.json",
        {
            "rows": len(ids),
            "max_abs_diff": diff,
            "argmax_agreement": agree,
            "max_abs_diff_allowed": p.max_abs_diff,
            "onnx_bytes": (bundle_dir / "model.onnx").stat().st_size,
        },
    )
    log.info("export: %d rows, max |Δlogit| %.2e, argmax agreement %.4f", len(ids), diff, agree)
    failures = []
    if diff > p.max_abs_diff:
        failures.append(f"max |Δlogit| {diff:.3e} exceeds export.max_abs_diff {p.max_abs_diff:.1e}")
    if agree < 1.0:
        failures.append(f"argmax agrees on {agree:.2%} of {len(ids)} rows, not 100%")
    if failures:
        raise GateFailed("ONNX parity failed: " + "; ".join(failures))
    return ExportResult(bundle_dir, len(ids), diff, agree)


if __name__ == "__main__":
    from tlpipe.entry import main
    from tlpipe.params import stage_dir

    main(
        "export",
        lambda params, out: export(
            params.export, params.finetune.max_length, stage_dir("finetune"), stage_dir("prepare"), out
        ),
    )
