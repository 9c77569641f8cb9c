"""A language model's part of export: the ONNX graph over token ids with dynamic batch and
sequence axes whose state goes in and comes out (an LSTM's h and c; a decoder's keys and
values of every earlier position, its KV cache), so serving generates incrementally; the
tokenizer and bundle.json beside it."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from tlpipe.checkpoint import read_meta
from tlpipe.data import read_split, texts
from tlpipe.files import write_json
from tlpipe.quantize import quantize_dynamic_int8
from tlpipe.serve import BUNDLE_JSON
from tlpipe.setting import Metric
from tlpipe.settings.text_generation import METRICS, SPEC
from tlpipe.settings.text_generation.lm import block_starts, torch_continuation
from tlpipe.settings.text_generation.model import LstmLM, context_limit, load_lm, logits
from tlpipe.settings.text_generation.sampling import Sampling
from tlpipe.settings.text_generation.serve import (
    INPUT_NAME,
    LOGITS,
    STATE_OUT,
    BundleSpec,
    LanguageModelBundle,
    next_token_nll,
)
from tlpipe.settings.text_generation.tokenizer import TOKENIZER_FILE, eos_id, load_tokenizer, token_stream

LSTM_STATE = ("state_h", "state_c")
DECODER_STATE = ("past_keys", "past_values")
# Parity: the first test blocks' logits (a checkpoint without a recorded block reads this
# many tokens at once), and the greedy continuations of the first test texts' first words.
PARITY_BLOCKS = 32
PARITY_BLOCK = 128
PARITY_PROMPTS = 8
PARITY_NEW_TOKENS = 24


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
    # The wrapper in eval mode: the exporter puts it back in its own mode when done, and a new
    # module's is training (dropout on).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LstmGraph(model).eval(),
            (ids, h, h.clone()),
            str(path),
            input_names=[INPUT_NAME, *LSTM_STATE],
            output_names=[LOGITS, *outputs],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return {name: [cfg.num_layers, "batch", cfg.hidden_size] for name in LSTM_STATE}


class _DecoderGraph(nn.Module):
    """A GPT-2 decoder with its KV cache as two stacked tensors, each (layers, B, heads,
    P, head_dim): (ids, keys, values) -> (logits, keys', values') with P + T positions."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = DynamicCache()
        for i in range(past_keys.shape[0]):
            cache.update(past_keys[i], past_values[i], i)
        # The new tokens' positions follow the cached ones.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past_keys.shape[3]
        out = self.lm(
            input_ids=input_ids,
            past_key_values=cache,
            use_cache=True,
            position_ids=positions[None].expand(input_ids.shape[0], -1),
            cache_position=positions,
        )
        layers = out.past_key_values.layers
        return out.logits, torch.stack([c.keys for c in layers]), torch.stack([c.values for c in layers])


def write_decoder_graph(model: PreTrainedModel, path: Path, opset: int) -> dict[str, list[int | str]]:
    """model.onnx of a GPT-2 decoder with its KV cache; the cache inputs' shapes."""
    cfg = model.config
    heads, layers = int(cfg.n_head), int(cfg.n_layer)
    head_dim = int(cfg.n_embd) // heads
    model.eval().set_attn_implementation("eager")  # plain matrix products trace to ONNX ops
    ids = torch.zeros(2, 3, dtype=torch.long)
    past = torch.zeros(layers, 2, heads, 1, head_dim)
    outputs = [f"{name}{STATE_OUT}" for name in DECODER_STATE]
    axes = {INPUT_NAME: {0: "batch", 1: "sequence"}, LOGITS: {0: "batch", 1: "sequence"}}
    axes |= {name: {1: "batch", 3: "past"} for name in DECODER_STATE}
    axes |= {name: {1: "batch", 3: "positions"} for name in outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _DecoderGraph(model).eval(),
            (ids, past, past.clone()),
            str(path),
            input_names=[INPUT_NAME, *DECODER_STATE],
            output_names=[LOGITS, *outputs],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return {name: [layers, "batch", heads, "past", head_dim] for name in DECODER_STATE}


def write_bundle(model: nn.Module, model_dir: Path, bundle_dir: Path, opset: int) -> BundleSpec:
    """model.onnx, tokenizer.json and bundle.json of the checkpoint in `model_dir`
    (`model`, loaded from it) in `bundle_dir`."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, LstmLM):
        architecture, state = "lstm", write_lstm_graph(model, bundle_dir / "model.onnx", opset)
    elif getattr(model.config, "model_type", None) == "gpt2":
        architecture, state = "gpt", write_decoder_graph(model, bundle_dir / "model.onnx", opset)
    else:
        raise TypeError(
            f"a language-model bundle is written for the LSTM and GPT-2 decoders, not {type(model).__name__}"
        )
    shutil.copyfile(model_dir / TOKENIZER_FILE, bundle_dir / TOKENIZER_FILE)
    spec = BundleSpec(architecture, eos_id(load_tokenizer(model_dir)), state, context_limit(model))
    write_json(bundle_dir / BUNDLE_JSON, {"setting": "text-generation", **spec.to_json()})
    return spec


class LanguageModelExporter:
    """finetune's checkpoint (the language model with its tokenizer) and how it becomes a
    bundle. Parity compares the next-token logits over the first PARITY_BLOCKS blocks of
    the test text and the greedy continuations of the first words of PARITY_PROMPTS test
    texts; int8 is dynamically quantised and gated on the loss per token over those blocks."""

    setting = SPEC.name
    quality_metric: Metric = METRICS["loss"]

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.model = load_lm(model_dir)
        self.block = int(read_meta(model_dir).get("max_length", PARITY_BLOCK))
        self._blocks: np.ndarray | None = None

    def write(self, bundle_dir: Path, opset: int) -> None:
        write_bundle(self.model, self.model_dir, bundle_dir, opset)

    def _test_blocks(self, prepare_dir: Path) -> np.ndarray:
        """The first PARITY_BLOCKS blocks of block + 1 test tokens (N, block + 1)."""
        if self._blocks is None:
            tok = load_tokenizer(self.model_dir)
            stream = token_stream(tok, texts(read_split(prepare_dir, "test"))).astype(np.int64)
            block = min(self.block, len(stream) - 1)
            starts = block_starts(len(stream), block)[:PARITY_BLOCKS]
            self._blocks = stream[starts[:, None] + np.arange(block + 1)]
        return self._blocks

    def parity_inputs(self, bundle_dir: Path, prepare_dir: Path) -> np.ndarray:
        return self._test_blocks(prepare_dir)

    @torch.no_grad()
    def torch_outputs(self, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        self.model.eval()
        ids = torch.as_tensor(inputs[:, :-1])
        return np.concatenate(
            [logits(self.model, ids[i : i + batch_size]).numpy() for i in range(0, len(ids), batch_size)]
        )

    def optimize(self, src: Path, dst: Path) -> None:
        return None

    def quantize(self, src: Path, dst: Path, prepare_dir: Path) -> dict[str, Any]:
        return quantize_dynamic_int8(src, dst)

    def quality(self, outputs: np.ndarray, prepare_dir: Path) -> float:
        """The mean loss per token of `outputs` (N, block, V) on the test blocks' next tokens."""
        return float(next_token_nll(outputs, self._test_blocks(prepare_dir)[:, 1:]).mean())

    def serving_inputs(self, prepare_dir: Path) -> list[Any]:
        """The first words of PARITY_PROMPTS test texts, as prompts."""
        return [" ".join(t.split()[:3]) for t in texts(read_split(prepare_dir, "test"))[:PARITY_PROMPTS]]

    def checks(self, bundle_dir: Path, prepare_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """onnxruntime and PyTorch continue the same prompts with the same greedy tokens."""
        bundle = LanguageModelBundle(bundle_dir)
        s = Sampling(greedy=True, max_new_tokens=PARITY_NEW_TOKENS)
        prompts = self.serving_inputs(prepare_dir)
        differ = []
        tokens = 0
        for prompt in prompts:
            ids = bundle.prompt_ids(prompt)
            served = list(bundle.continuation_ids(ids, s))
            tokens += len(served)
            if served != torch_continuation(self.model, ids, s, bundle.spec.eos_id):
                differ.append(prompt)
        report = {"greedy": {"prompts": len(prompts), "tokens": tokens, "differ": differ}}
        failures = (
            [
                f"the greedy continuation of {len(differ)} of {len(prompts)} prompts differs from PyTorch's "
                f"(first: {differ[0]!r})"
            ]
            if differ
            else []
        )
        return report, failures


EXPORTER = LanguageModelExporter
