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
from tlpipe.settings.text_generation.model import LstmLM, context_limit, features, logits
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


# Rows of logits the fused loss holds in fp32 at once: 256 x a 4,000-token vocabulary is 4 MB,
# within the last-level cache, so the softmax passes over it do not go to memory.
LOSS_CHUNK_ROWS = 256


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of logits = hidden @ weight.T + bias against `target`, without
    the (N, V) fp32 logits and their log-softmax kept for backward: each chunk of rows is
    projected, its softmax taken in fp32 in cache, and softmax - one-hot (the logits'
    gradient up to 1/N) stored once in the matmul dtype; backward is two matrix products.
    Under autocast the products run in its dtype, as the linear layer's would, and the
    weight's gradient arrives in fp32."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        h, w = hidden.to(dtype), weight.to(dtype)  # (N, H), (V, H)
        b = None if bias is None else bias.to(dtype)
        n = h.shape[0]
        probs = torch.empty(n, w.shape[0], dtype=dtype, device=h.device)  # softmax - one-hot
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for lo in range(0, n, LOSS_CHUNK_ROWS):
            rows, t = slice(lo, lo + LOSS_CHUNK_ROWS), target[lo : lo + LOSS_CHUNK_ROWS]
            z = (h[rows] @ w.T if b is None else torch.addmm(b, h[rows], w.T)).float()  # (C, V)
            z.sub_(z.amax(1, keepdim=True))
            picked = z.gather(1, t[:, None])  # (C, 1), before exp: a tiny probability stays finite
            z.exp_()  # one exp a logit: the softmax is exp(z) / its sum
            sums = z.sum(1, keepdim=True)
            total += (sums.log() - picked).sum()
            z.div_(sums)
            z[torch.arange(len(t), device=z.device), t] -= 1.0
            probs[rows] = z
        ctx.save_for_backward(h, w, probs)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w, probs = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        scale = grad / h.shape[0]
        grad_hidden = (probs @ w).to(hidden_dtype) * scale
        grad_weight = (probs.T @ h).to(weight_dtype) * scale
        grad_bias = None if bias_dtype is None else probs.sum(0, dtype=torch.float32).to(bias_dtype) * scale
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias).float(), target) for hidden (N, H),
    fused (`_LinearCrossEntropy`); in autocast's dtype when autocast is on."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, target, dtype)


def logits_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over windows (B, T + 1) as a causal LM's forward computes
    it: the (B, T, V) logits, cast to fp32, then the cross entropy."""
    out = logits(model, windows[:, :-1])  # (B, T, V)
    return F.cross_entropy(out.flatten(0, 1).float(), windows[:, 1:].flatten())


def lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over windows (B, T + 1), the output projection fused
    into the loss (`logits_loss` for a decoder family whose projection is not declared)."""
    found = features(model, windows[:, :-1])
    if found is None:
        return logits_loss(model, windows)
    hidden, weight, bias = found  # (B, T, H), (V, H), (V,) or None
    return linear_cross_entropy(hidden.flatten(0, 1), weight, bias, windows[:, 1:].flatten())


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
