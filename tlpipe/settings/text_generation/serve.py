"""Serving a language model's bundle with onnxruntime, tokenizers and NumPy alone (no torch).

The bundle holds model.onnx, tokenizer.json and bundle.json: the architecture, EOS, the
most positions the model reads (a decoder's learned positions; none for an LSTM), and the
names and shapes of the state the graph carries between calls: an LSTM's h and c, each
(layers, B, H); a decoder's cached keys and values, each (layers, B, heads, P, head_dim)
with P the positions read so far. Generation runs the prompt through the graph once, then
feeds one token at a time with the state it returned: each new token costs one position,
not the whole text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from tlpipe.serve import BUNDLE_JSON, precision_session, read_texts, require_files
from tlpipe.settings.text_generation.sampling import Sampling, new_tokens, next_token
from tlpipe.settings.text_generation.tokenizer import TOKENIZER_FILE, token_stream

if TYPE_CHECKING:
    import pandas as pd

BUNDLE_FILES = ("model.onnx", TOKENIZER_FILE, BUNDLE_JSON)
INPUT_NAME = "input_ids"
LOGITS = "logits"
# How `score` reads a text stream: blocks of this many tokens (or the model's most
# positions), this many blocks per call.
SCORE_BLOCK = 128
SCORE_BATCH = 8
# The graph's state inputs; each output is the same name with this suffix.
STATE_OUT = "_out"


@dataclass(frozen=True)
class BundleSpec:
    architecture: str
    eos_id: int
    # State input name -> its shape: "batch" the batch axis, "past" the positions read so
    # far (0 for a new text), e.g. [2, "batch", 256] or [4, "batch", 4, "past", 64].
    state: dict[str, list[int | str]]
    # The most positions the model reads (None: unbounded).
    max_positions: int | None = None
    models: dict[str, str] = field(default_factory=lambda: {"fp32": "model.onnx"})

    @classmethod
    def read(cls, path: Path) -> BundleSpec:
        raw = json.loads(path.read_text())
        limit = raw.get("max_positions")
        return cls(
            str(raw["architecture"]),
            int(raw["eos_id"]),
            dict(raw["state"]),
            None if limit is None else int(limit),
            dict(raw["models"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "eos_id": self.eos_id,
            "state": self.state,
            "max_positions": self.max_positions,
            "models": self.models,
        }


class LanguageModelBundle:
    """An exported language model on onnxruntime's CPU provider."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32") -> None:
        require_files(path, BUNDLE_FILES)
        self.path = path
        self.spec = BundleSpec.read(path / BUNDLE_JSON)
        self.tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        self.session = precision_session(path, self.spec.models, precision, threads)

    def outputs(self, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Next-token logits (N, T, V) of blocks of token ids (N, T + 1): each block read
        from a fresh state, its last token only predicted (`Exporter.parity_inputs`)."""
        return np.concatenate(
            [self.step(inputs[i : i + batch_size, :-1])[0] for i in range(0, len(inputs), batch_size)]
        )

    def predict(self, rows: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """The greedy continuation of each prompt (`tlpipe generate` samples)."""
        s = Sampling(greedy=True)
        return [{"prompt": prompt, "continuation": self.generate(prompt, s)} for prompt in rows]

    def score(self, rows: pd.DataFrame, batch_size: int = 64) -> dict[str, float]:
        """Loss per token and perplexity on the rows' `text` column as one token stream (each
        text read from a text boundary, as evaluate reads it), in blocks of up to SCORE_BLOCK
        tokens, each from a fresh state. Both are per token of this bundle's tokenizer."""
        stream = token_stream(self.tokenizer, rows["text"].astype(str).tolist()).astype(np.int64)
        block = min(SCORE_BLOCK, self.spec.max_positions or SCORE_BLOCK)
        starts = np.arange(0, max(len(stream) - 1, 0), block)
        full = starts[starts + block + 1 <= len(stream)]
        nll = []
        for i in range(0, len(full), SCORE_BATCH):
            windows = stream[full[i : i + SCORE_BATCH, None] + np.arange(block + 1)]  # (B, block + 1)
            nll.append(next_token_nll(self.step(windows[:, :-1])[0], windows[:, 1:]))
        if len(full) < len(starts):  # the shorter last block
            window = stream[None, int(starts[len(full)]) :]
            nll.append(next_token_nll(self.step(window[:, :-1])[0], window[:, 1:]))
        if not nll:
            raise ValueError(f"{len(rows)} rows hold too little text to score (under two tokens)")
        loss = float(np.concatenate(nll).mean())
        return {"loss": loss, "perplexity": math.exp(loss)}

    @staticmethod
    def read_inputs(path: Path, column: str, chunk_rows: int) -> Iterator[list[str]]:
        """Prompts from a CSV / TSV / JSONL / Parquet file's `column` or a text file's lines."""
        return read_texts(path, column, chunk_rows)

    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        return {
            name: np.zeros([{"batch": batch, "past": 0}.get(d, d) for d in shape], dtype=np.float32)
            for name, shape in self.spec.state.items()
        }

    def step(
        self, ids: np.ndarray, state: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (B, T, V) for token ids (B, T) after `state` (None: a fresh text), and
        the state after the last position."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        state = state if state is not None else self.initial_state(ids.shape[0])
        names = [LOGITS, *(f"{name}{STATE_OUT}" for name in state)]
        out = self.session.run(names, {INPUT_NAME: ids, **state})
        return out[0], {name: value for name, value in zip(state, out[1:], strict=True)}

    def prompt_ids(self, prompt: str) -> list[int]:
        """EOS then the prompt's tokens: a prompt is read as the start of a new text."""
        return [self.spec.eos_id, *self.tokenizer.encode(prompt, add_special_tokens=False).ids]

    def continuation_ids(self, prompt_ids: list[int], s: Sampling) -> Iterator[int]:
        """New token ids after `prompt_ids`, one at a time, until EOS (not yielded),
        `s.max_new_tokens`, or the model's last position. ValueError when the prompt alone
        is longer than the model reads."""
        limit = self.spec.max_positions
        new = new_tokens(len(prompt_ids), s.max_new_tokens, limit)
        rng = s.rng()
        logits, state = self.step(np.asarray([prompt_ids]))
        for i in range(new):
            token = next_token(logits[0, -1], s, rng)
            if token == self.spec.eos_id:
                return
            yield token
            if i + 1 < new:
                logits, state = self.step(np.asarray([[token]]), state)

    def stream(self, prompt: str, s: Sampling) -> Iterator[str]:
        """The continuation of `prompt` as text pieces (`decoded_pieces`)."""
        return decoded_pieces(self.tokenizer, self.continuation_ids(self.prompt_ids(prompt), s))

    def generate(self, prompt: str, s: Sampling) -> str:
        return "".join(self.stream(prompt, s))


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The negative log-likelihood (nats) of each target (B, T) under logits (B, T, V)."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1))
    return (log_z - np.take_along_axis(shifted, targets[..., None], -1)[..., 0]).ravel()


def decoded_pieces(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Token ids as text pieces, each as soon as it decodes: a byte-level token that ends
    inside a multi-byte character waits for the token that completes it. Bytes that never
    form a character stay U+FFFD, as a full decode shows them."""
    seen: list[int] = []
    shown = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(seen)
    if len(text) > len(shown):
        yield text[len(shown) :]


PREDICTOR = LanguageModelBundle
