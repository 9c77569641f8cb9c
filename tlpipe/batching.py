"""Length-bucketed batching and padding in NumPy alone (serving imports no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None, window: int = 64
) -> list[np.ndarray]:
    """Batches of indices of similar length; padding stays small.

    With an rng the order is shuffled, then sorted by length within windows of
    `window * batch_size` items, and the batches themselves are shuffled. Without one
    (inference), batches follow length order.
    """
    n = len(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    order = rng.permutation(n)
    chunk = window * batch_size
    parts = []
    for i in range(0, n, chunk):
        part = order[i : i + chunk]
        parts.append(part[np.argsort(lengths[part], kind="stable")])
    order = np.concatenate(parts) if parts else order
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def round_up(n: int, multiple: int, limit: int | None = None) -> int:
    """`n` rounded up to a multiple of `multiple`, but never past `limit` (nor below `n`)."""
    rounded = -(-n // multiple) * multiple
    return max(n, min(rounded, limit)) if limit is not None else rounded


def pad_arrays(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: input_ids (B, T) and attention_mask (B, T), int64."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
