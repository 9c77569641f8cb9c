"""The text classifier's part of export: the ONNX graph over (input_ids, attention_mask),
the tokenizer and bundle.json beside it, and onnxruntime's transformer fusions."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from tlpipe.checkpoint import read_meta
from tlpipe.data import label_ids, read_split, texts
from tlpipe.files import write_json
from tlpipe.quantize import quantize_dynamic_int8
from tlpipe.serve import BUNDLE_JSON, SERVING_ROWS
from tlpipe.setting import Metric
from tlpipe.settings.text_classification import METRICS, SPEC
from tlpipe.settings.text_classification.classifier import predict_logits
from tlpipe.settings.text_classification.serve import INPUT_NAMES, BundleSpec, ClassifierBundle
from tlpipe.settings.text_classification.text import SpecialIds, load_tokenizer


class _Logits(nn.Module):
    """The classifier as a function of (input_ids, attention_mask) returning logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: nn.Module, path: Path, special: SpecialIds, vocab_size: int, opset: int) -> None:
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


class ClassifierExporter:
    """finetune's checkpoint (a sequence classifier with its tokenizer and the params that
    trained it) and how it becomes a bundle."""

    setting = SPEC.name
    quality_metric: Metric = METRICS["accuracy"]

    def __init__(self, model_dir: Path) -> None:
        # Attention as plain matrix products: the graph onnxruntime's optimizer fuses into
        # its Attention kernel (the SDPA export is not recognised).
        self.model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            model_dir, attn_implementation="eager"
        ).eval()
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(model_dir)
        self.special = SpecialIds.of(self.tokenizer)
        config = self.model.config
        self.labels = tuple(config.id2label[i] for i in range(config.num_labels))

    def write(self, bundle_dir: Path, opset: int) -> None:
        vocab = self.tokenizer.get_vocab_size()
        export_onnx(self.model, bundle_dir / "model.onnx", self.special, vocab, opset)
        shutil.copyfile(self.model_dir / "tokenizer.json", bundle_dir / "tokenizer.json")
        # The checkpoint says how it was trained to read text; serving reads it the same way.
        trained = read_meta(self.model_dir)["params"]
        spec = BundleSpec(
            labels=self.labels,
            max_length=trained["max_length"],
            pad_id=self.special.pad,
            truncation=trained["truncation"],
        )
        write_json(bundle_dir / BUNDLE_JSON, spec.to_json())
        write_json(bundle_dir / "labels.json", dict(enumerate(self.labels)))

    def parity_inputs(self, bundle_dir: Path, prepare_dir: Path) -> list[np.ndarray]:
        return ClassifierBundle(bundle_dir).encode(texts(read_split(prepare_dir, "test")))

    def torch_outputs(self, inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
        return predict_logits(self.model, inputs, self.special.pad, batch_size)

    def optimize(self, src: Path, dst: Path) -> dict[str, int]:
        return fuse(src, dst, self.model.config.num_attention_heads, self.model.config.hidden_size)

    def quantize(self, src: Path, dst: Path, prepare_dir: Path) -> dict[str, Any]:
        return quantize_dynamic_int8(src, dst)

    def serving_inputs(self, prepare_dir: Path) -> list[Any]:
        return texts(read_split(prepare_dir, "test").head(SERVING_ROWS))

    def checks(self, bundle_dir: Path, prepare_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """Nothing beyond the outputs' parity: a classifier's outputs are its logits."""
        return {}, []

    def quality(self, outputs: np.ndarray, prepare_dir: Path) -> float:
        y = label_ids(read_split(prepare_dir, "test"), self.labels)
        return float((outputs.argmax(1) == y).mean()) if len(y) else 0.0


EXPORTER = ClassifierExporter
