"""The classical reference: an interpolated Kneser-Ney n-gram model over token ids.

Chen & Goodman's interpolated Kneser-Ney with one absolute discount per order, estimated
as D = n1 / (n1 + 2 n2) from the order's counts of counts. The highest order counts
n-grams; each lower order counts continuations (the distinct tokens seen before it), and
the lowest interpolates with the uniform distribution over the vocabulary, so every token,
seen or not, has a probability. No torch: plain counting over the same token streams the
neural models read, scored on exactly the tokens they are scored on.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Level:
    """One order's statistics: counts of (context, token), and per context their sum and
    the number of distinct tokens after it."""

    counts: dict[tuple[int, ...], int]
    totals: dict[tuple[int, ...], int]
    types: dict[tuple[int, ...], int]
    discount: float


def _level(counts: Counter[tuple[int, ...]]) -> _Level:
    totals: defaultdict[tuple[int, ...], int] = defaultdict(int)
    types: defaultdict[tuple[int, ...], int] = defaultdict(int)
    for gram, c in counts.items():
        totals[gram[:-1]] += c
        types[gram[:-1]] += 1
    of = Counter(counts.values())
    n1, n2 = of.get(1, 0), of.get(2, 0)
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
    return _Level(dict(counts), dict(totals), dict(types), min(max(discount, 0.05), 0.95))


@dataclass(frozen=True)
class KneserNey:
    """An interpolated Kneser-Ney model of `order` (1: continuation unigrams) over a
    vocabulary of `vocab_size` token ids."""

    order: int
    vocab_size: int
    levels: tuple[_Level, ...]

    @classmethod
    def fit(cls, stream: np.ndarray, order: int, vocab_size: int) -> KneserNey:
        """The model of a token stream (tlpipe.settings.text_generation.tokenizer.token_stream)."""
        if order < 1:
            raise ValueError(f"an n-gram order is at least 1, not {order}")
        tokens = [int(t) for t in stream]
        if len(tokens) < order:
            raise ValueError(f"{len(tokens)} tokens are too few for an order-{order} model")
        top: Counter[tuple[int, ...]] = Counter(
            tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1)
        )
        grams = [top]
        # Each lower order counts continuations: how many distinct tokens precede the gram.
        for _ in range(order - 1):
            grams.append(Counter(gram[1:] for gram in grams[-1]))
        levels = tuple(_level(c) for c in reversed(grams))  # levels[k - 1]: order k
        return cls(order, vocab_size, levels)

    def prob(self, context: tuple[int, ...], token: int) -> float:
        """P(token | the last order - 1 tokens of context)."""
        context = context[len(context) - (self.order - 1) :] if self.order > 1 else ()
        p = 1.0 / self.vocab_size
        for k in range(1, self.order + 1):
            if k - 1 > len(context):
                break
            level = self.levels[k - 1]
            ctx = context[len(context) - (k - 1) :] if k > 1 else ()
            total = level.totals.get(ctx)
            if not total:
                continue  # an unseen context: the lower order's estimate stands
            c = level.counts.get((*ctx, token), 0)
            p = max(c - level.discount, 0.0) / total + level.discount * level.types[ctx] / total * p
        return p

    def log_probs(self, stream: np.ndarray) -> np.ndarray:
        """ln P of every token of `stream` after the first, given the tokens before it in
        the stream (at most order - 1 of them)."""
        tokens = [int(t) for t in stream]
        n = self.order - 1
        out = np.empty(max(0, len(tokens) - 1), dtype=np.float64)
        for i in range(1, len(tokens)):
            out[i - 1] = math.log(self.prob(tuple(tokens[max(0, i - n) : i]), tokens[i]))
        return out
