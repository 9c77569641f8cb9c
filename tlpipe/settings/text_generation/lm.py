"""Token streams to training blocks, the causal-LM loss and perplexity.

A corpus is one token stream (`tokenizer.token_stream`). Training reads blocks of
`block` + 1 consecutive tokens (inputs and their next tokens), laid end to end from a
random offset each epoch so block boundaries move; scoring reads the stream in blocks that
overlap by one token, so every token after the first is predicted exactly once, with up to
`block` - 1 tokens of context: the neural models and the n-gram reference are scored on
the same tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tlpipe.setting import Metric
from tlpipe.settings.text_generation import METRICS
from tlpipe.settings.text_generation.model import LstmLM, context_limit, logits
from tlpipe.settings.text_generation.sampling import Sampling, new_tokens, next_token
from tlpipe.train import Runtime

SELECTION = METRICS["perplexity"]


def block_starts(tokens: int, block: int, offset: int = 0) -> np.ndarray:
    """Starts of the full blocks of `block` + 1 tokens laid end to end from `offset` (each
    block's last token is the next one's first)."""
    last = tokens - (block + 1)
    if last < offset:
        return np.zeros(0, dtype=np.int64)
    return np.arange(offset, last + 1, block, dtype=np.int64)


def training_block(tokens: int, block: int) -> int:
    """The block length a stream of `tokens` trains on: `block`, or all of a shorter stream."""
    if tokens < 2:
        raise ValueError(f"a language model needs at least 2 tokens to train on, not {tokens}")
    return min(block, tokens - 1)


def gather(stream: torch.Tensor, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows stream[s : s + length] for each start s: (len(starts), length)."""
    index = torch.as_tensor(starts, device=stream.device)[:, None] + torch.arange(
        length, device=stream.device
    )
    return stream[index]


def lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over windows (B, T + 1)."""
    out = logits(model, windows[:, :-1])  # (B, T, V)
    return F.cross_entropy(out.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def stream_nll(
    model: nn.Module, stream: np.ndarray, block: int, batch_size: int, runtime: Runtime | None = None
) -> np.ndarray:
    """The negative log-likelihood (nats) of every token of `stream` after the first, in
    order, in fp32 on the model's device unless `runtime` says otherwise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.as_tensor(stream.astype(np.int64), device=device)
    n = len(stream)
    starts = np.arange(0, max(n - 1, 0), block, dtype=np.int64)
    out = torch.empty(max(n - 1, 0), dtype=torch.float32, device=device)
    ctx = runtime.autocast() if runtime is not None else contextlib.nullcontext()
    full = starts[starts + block + 1 <= n]
    with ctx:
        for i in range(0, len(full), batch_size):
            chunk = full[i : i + batch_size]
            windows = gather(ids, chunk, block + 1)
            nll = F.cross_entropy(
                logits(model, windows[:, :-1]).float().transpose(1, 2), windows[:, 1:], reduction="none"
            )  # (B, T)
            out[gather(torch.arange(n - 1, device=device), chunk, block).flatten()] = nll.flatten()
        if len(full) < len(starts):  # the shorter last block
            s = int(starts[len(full)])
            window = ids[s:][None]
            nll = F.cross_entropy(
                logits(model, window[:, :-1]).float().transpose(1, 2), window[:, 1:], reduction="none"
            )
            out[s:] = nll.flatten()
    model.train(was_training)
    return out.cpu().numpy()


def scores(nll: np.ndarray) -> dict[str, float]:
    """Every metric of the setting from per-token losses."""
    loss = float(nll.mean()) if len(nll) else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if len(nll) else float("nan")}


@dataclass
class SourceLm:
    """The joint objective's other half: the source stream, weighted `alpha` against the
    target loss's 1 - alpha."""

    stream: np.ndarray
    alpha: float


@dataclass
class LanguageModelTask:
    """A language model's `TrainTask`: blocks of the target stream (rows are full blocks
    from offset 0), next-token cross entropy (mixed with the source stream's under the
    joint objective), and validation perplexity."""

    stream: np.ndarray
    val_stream: np.ndarray
    block: int
    batch_size: int
    eval_batch_size: int
    runtime: Runtime
    seed: int
    source: SourceLm | None = None
    selection: Metric = SELECTION
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.block = training_block(len(self.stream), self.block)
        self.rows = max(1, len(block_starts(len(self.stream), self.block)))
        device = self.runtime.device
        self._ids = torch.as_tensor(self.stream.astype(np.int64), device=device)
        if self.source is not None:
            self._source_ids = torch.as_tensor(self.source.stream.astype(np.int64), device=device)
            self._source_starts = block_starts(len(self.source.stream), self.block)
            if not len(self._source_starts):
                raise ValueError(f"the source stream has fewer than {self.block + 1} tokens")

    def epoch(self, rng: np.random.Generator) -> list[np.ndarray]:
        spare = len(self.stream) - 1 - self.block * self.rows
        starts = block_starts(
            len(self.stream), self.block, int(rng.integers(0, spare + 1)) if spare > 0 else 0
        )
        starts = starts[rng.permutation(len(starts))]
        return [starts[i : i + self.batch_size] for i in range(0, len(starts), self.batch_size)]

    def loss(self, model: nn.Module, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        target = lm_loss(model, gather(self._ids, idx, self.block + 1))
        if self.source is None:
            return target
        picked = self._source_starts[rng.integers(0, len(self._source_starts), len(idx))]
        source = lm_loss(model, gather(self._source_ids, picked, self.block + 1))
        return self.source.alpha * source + (1.0 - self.source.alpha) * target

    def validate(self, model: nn.Module) -> dict[str, float]:
        found = scores(stream_nll(model, self.val_stream, self.block, self.eval_batch_size, self.runtime))
        return {f"val_{key}": value for key, value in found.items()}

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def fast_paths(
        self, model: nn.Module, runtime: Runtime, seed: int | np.random.Generator
    ) -> contextlib.ExitStack:
        # Both architectures tie the output projection to the embedding: its gradient is
        # dense, so the row-sparse embedding path does not apply.
        return runtime.fast_paths(model, seed)

    def state_dict(self) -> dict[str, Any]:
        return {}  # every draw comes from the loop's generators (an LSTM's dropout: torch's)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def torch_continuation(model: nn.Module, prompt_ids: list[int], s: Sampling, eos: int) -> list[int]:
    """The continuation PyTorch generates after `prompt_ids`, choosing each token as serving
    does (`sampling.next_token`), until EOS (not included) or `s.max_new_tokens`: the LSTM
    carries its state, a decoder re-reads its whole context each step (up to its last
    position, as serving stops)."""
    model.eval()
    rng = s.rng()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    state = None
    step_ids = ids
    for _ in range(new_tokens(len(prompt_ids), s.max_new_tokens, context_limit(model))):
        if isinstance(model, LstmLM):
            step_logits, state = model(step_ids, state)
        else:
            step_logits = logits(model, ids)
        token = next_token(step_logits[0, -1].float().cpu().numpy(), s, rng)
        if token == eos:
            break
        out.append(token)
        step_ids = torch.tensor([[token]], device=device)
        ids = torch.cat([ids, step_ids], 1)
    return out
