"""Choosing the next token from a model's logits: greedy, or sampled at a temperature from
the top-k tokens and the top-p nucleus (Holtzman et al. 2020), from a seeded generator.
NumPy alone: serving and PyTorch generation share it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How a continuation is drawn. `greedy` takes the most likely token every step (the
    other fields then do nothing but `max_new_tokens`); otherwise logits are divided by
    `temperature`, cut to the `top_k` most likely tokens (0: all) and to the smallest set
    whose probability reaches `top_p` (1: all), and sampled with `seed`."""

    max_new_tokens: int = 40
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no cut) or positive, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def next_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token for one position's logits (V,)."""
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < len(z):
        cut = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= cut, z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if s.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        # Keep every token up to and including the one that brings the mass to top_p.
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), s.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


def new_tokens(prompt: int, max_new_tokens: int, max_positions: int | None) -> int:
    """How many tokens may follow a prompt of `prompt` tokens: `max_new_tokens`, fewer
    where the model's positions run out (a decoder reads at most `max_positions`)."""
    if max_positions is None:
        return max_new_tokens
    if prompt > max_positions:
        raise ValueError(
            f"the prompt is {prompt} tokens (EOS included) but the model reads at most {max_positions}"
        )
    # The last new token is chosen from the logits at position max_positions - 1.
    return min(max_new_tokens, max_positions - prompt + 1)
