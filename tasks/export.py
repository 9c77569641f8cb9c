"""export: ONNX with dynamic batch and sequence axes (fused for the CPU, plus an int8 model),
gated on parity with PyTorch and on the int8 model's accuracy."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from tlpipe.data import label_ids, read_split, texts
from tlpipe.errors import GateFailed
from tlpipe.model import fresh_dir, read_meta, write_json
from tlpipe.params import ExportParams
from tlpipe.serve import Bundle, BundleSpec
from tlpipe.settings.text_classification.classifier import predict_logits
from tlpipe.text import SpecialIds, load_tokenizer

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
    fused: bool
    int8_accuracy_drop: float | None


def export_onnx(model: PreTrainedModel, path: Path, special: SpecialIds, vocab_size: int, opset: int) -> None:
    """The classifier as ONNX (TorchScript exporter) with dynamic batch and sequence axes."""
    sample = torch.tensor([[special.cls, 1000 % vocab_size, special.sep]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(model),
            (sample.repeat(2, 1), torch.ones(2, 3, dtype=torch.long)),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=opset,
            dynamo=False,
        )


def fuse(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer: attention, embedding layer norm and bias + GELU
    fused into single kernels for the CPU; residual adds stay apart from their layer norms
    (see tlpipe.serve.DISABLED_OPTIMIZERS). Returns the fused operators' counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimize_model(
            str(src),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=options,
        )
    fused.save_model_to_file(str(dst))
    return {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic quantisation: int8 weights for matrix products, attention and the embedding
    tables; activations quantised on the fly."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused contrib ops (Attention, BiasGelu) defeat ONNX shape inference:
    # their outputs are fp32.
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _parity(ort_logits: np.ndarray, torch_logits: np.ndarray) -> tuple[float, float]:
    if not len(ort_logits):
        return 0.0, 1.0
    diff = float(np.abs(ort_logits - torch_logits).max())
    return diff, float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean())


def export(p: ExportParams, finetune_dir: Path, prepare_dir: Path, out_dir: Path) -> ExportResult:
    """Export `finetune_dir/model` to `out_dir/bundle` (model.onnx, with `p.int8`
    model.int8.onnx, tokenizer.json, bundle.json, labels.json) and compare onnxruntime
    with PyTorch over the whole test split.

    With `p.optimize` the fused graph ships when it passes the parity gate, else the plain
    one. Writes `parity.json`; raises GateFailed unless max |Δlogit| <= p.max_abs_diff and
    the argmax agrees on every row, or when the int8 model's test accuracy falls more than
    `p.int8_max_drop` below the fp32 model's.
    """
    fresh_dir(out_dir)
    model_dir = finetune_dir / "model"
    # Attention as plain matrix products: the graph onnxruntime's optimizer fuses into its
    # Attention kernel (the SDPA export is not recognised).
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok = load_tokenizer(model_dir)
    special = SpecialIds.of(tok)
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))

    bundle_dir = out_dir / "bundle"
    bundle_dir.mkdir()
    fp32 = bundle_dir / "model.onnx"
    export_onnx(model, fp32, special, tok.get_vocab_size(), p.opset)
    shutil.copyfile(model_dir / "tokenizer.json", bundle_dir / "tokenizer.json")
    # The checkpoint says how it was trained to read text; serving reads it the same way.
    trained = read_meta(model_dir)["params"]
    spec = BundleSpec(
        labels=labels,
        max_length=trained["max_length"],
        pad_id=special.pad,
        input_names=INPUT_NAMES,
        truncation=trained["truncation"],
    )
    write_json(bundle_dir / "bundle.json", spec.to_json())
    write_json(bundle_dir / "labels.json", dict(enumerate(labels)))

    test = read_split(prepare_dir, "test")
    bundle = Bundle(bundle_dir)
    ids = bundle.encode(texts(test))
    torch_logits = predict_logits(model, ids, special.pad, p.batch_size)
    diff, agree = _parity(bundle.logits_of_ids(ids, p.batch_size), torch_logits)
    report: dict = {"plain": {"max_abs_diff": diff, "argmax_agreement": agree}}
    fused = False
    if p.optimize:
        candidate = out_dir / "fused.onnx"
        report["fused_operators"] = fuse(
            fp32, candidate, model.config.num_attention_heads, model.config.hidden_size
        )
        plain = out_dir / "plain.onnx"
        os.replace(fp32, plain)
        os.replace(candidate, fp32)
        f_diff, f_agree = _parity(Bundle(bundle_dir).logits_of_ids(ids, p.batch_size), torch_logits)
        report["fused"] = {"max_abs_diff": f_diff, "argmax_agreement": f_agree}
        fused = f_diff <= p.max_abs_diff and f_agree == 1.0
        if fused:
            diff, agree = f_diff, f_agree
            plain.unlink()
        else:
            log.warning(
                "export: the fused graph misses parity (max |Δlogit| %.2e); shipping the plain one", f_diff
            )
            os.replace(plain, fp32)

    failures = []
    if diff > p.max_abs_diff:
        failures.append(f"max |Δlogit| {diff:.3e} exceeds export.max_abs_diff {p.max_abs_diff:.1e}")
    if agree < 1.0:
        failures.append(f"argmax agrees on {agree:.2%} of {len(ids)} rows, not 100%")

    int8_drop = None
    if p.int8 and not failures:
        quantize_int8(fp32, bundle_dir / "model.int8.onnx")
        spec = replace(spec, models={**spec.models, "int8": "model.int8.onnx"})
        write_json(bundle_dir / "bundle.json", spec.to_json())
        y = label_ids(test, labels)
        acc32 = float((torch_logits.argmax(1) == y).mean()) if len(y) else 0.0
        acc8 = (
            float(
                (Bundle(bundle_dir, precision="int8").logits_of_ids(ids, p.batch_size).argmax(1) == y).mean()
            )
            if len(y)
            else 0.0
        )
        int8_drop = acc32 - acc8
        report["int8"] = {
            "fp32_accuracy": acc32,
            "int8_accuracy": acc8,
            "accuracy_drop": int8_drop,
            "max_drop_allowed": p.int8_max_drop,
            "onnx_bytes": (bundle_dir / "model.int8.onnx").stat().st_size,
        }
        if int8_drop > p.int8_max_drop:
            failures.append(
                f"int8 test accuracy {acc8:.4f} is {int8_drop:.4f} below fp32's {acc32:.4f}, more than "
                f"export.int8_max_drop {p.int8_max_drop} (set export.int8: false to ship fp32 alone)"
            )
    write_json(
        out_dir / "parity.json",
        {
            "rows": len(ids),
            "max_abs_diff": diff,
            "argmax_agreement": agree,
            "max_abs_diff_allowed": p.max_abs_diff,
            "graph": "fused" if fused else "plain",
            "onnx_bytes": fp32.stat().st_size,
            **report,
        },
    )
    log.info(
        "export: %d rows, max |Δlogit| %.2e, argmax agreement %.4f, %s graph",
        len(ids),
        diff,
        agree,
        "fused" if fused else "plain",
    )
    if failures:
        raise GateFailed("export gate failed: " + "; ".join(failures))
    return ExportResult(bundle_dir, len(ids), diff, agree, fused, int8_drop)


if __name__ == "__main__":
    from tasks.wiring import main

    main("export")
