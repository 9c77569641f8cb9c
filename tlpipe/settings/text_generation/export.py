"""A language model's part of export: the ONNX graph over token ids with dynamic batch and
sequence axes whose state (an LSTM's h and c) goes in and comes out, so serving generates
incrementally; the tokenizer and bundle.json beside it."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from tlpipe.files import write_json
from tlpipe.serve import BUNDLE_JSON
from tlpipe.settings.text_generation.model import LstmLM
from tlpipe.settings.text_generation.serve import INPUT_NAME, LOGITS, STATE_OUT, BundleSpec
from tlpipe.settings.text_generation.tokenizer import TOKENIZER_FILE, eos_id, load_tokenizer

LSTM_STATE = ("state_h", "state_c")


class _LstmGraph(nn.Module):
    """The LSTM with its state as plain tensors: (ids, h, c) -> (logits, h', c')."""

    def __init__(self, lm: LstmLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, state_h: torch.Tensor, state_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, (h, c) = self.lm(input_ids, (state_h, state_c))
        return logits, h, c


def write_lstm_graph(model: LstmLM, path: Path, opset: int) -> dict[str, list[int | str]]:
    """model.onnx of an LSTM language model; its state inputs' shapes (bundle.json's)."""
    cfg = model.config
    ids = torch.zeros(2, 3, dtype=torch.long)
    h = torch.zeros(cfg.num_layers, 2, cfg.hidden_size)
    outputs = [f"{name}{STATE_OUT}" for name in LSTM_STATE]
    axes = {INPUT_NAME: {0: "batch", 1: "sequence"}, LOGITS: {0: "batch", 1: "sequence"}}
    axes |= {name: {1: "batch"} for name in (*LSTM_STATE, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LstmGraph(model.eval()),
            (ids, h, h.clone()),
            str(path),
            input_names=[INPUT_NAME, *LSTM_STATE],
            output_names=[LOGITS, *outputs],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return {name: [cfg.num_layers, "batch", cfg.hidden_size] for name in LSTM_STATE}


def write_bundle(model: nn.Module, model_dir: Path, bundle_dir: Path, opset: int) -> BundleSpec:
    """model.onnx, tokenizer.json and bundle.json of the checkpoint in `model_dir`
    (`model`, loaded from it) in `bundle_dir`."""
    if not isinstance(model, LstmLM):
        raise TypeError(f"a language-model bundle is written for the LSTM, not {type(model).__name__}")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    state = write_lstm_graph(model, bundle_dir / "model.onnx", opset)
    shutil.copyfile(model_dir / TOKENIZER_FILE, bundle_dir / TOKENIZER_FILE)
    spec = BundleSpec("lstm", eos_id(load_tokenizer(model_dir)), state)
    write_json(bundle_dir / BUNDLE_JSON, {"setting": "text-generation", **spec.to_json()})
    return spec
