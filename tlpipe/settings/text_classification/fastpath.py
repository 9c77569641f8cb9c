"""The text classifier's training fast paths: the shared ones (tlpipe.fastpath) plus
`first_token_only`. A BERT sequence classifier reads only position 0 of the last layer, so
that layer computes queries, the attention output and the feed-forward for [CLS] alone
(keys and values still for every position). The logits are the same.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tlpipe.fastpath import eager_attention
from tlpipe.train import Runtime


def classifier_fast_paths(
    runtime: Runtime, model: PreTrainedModel, seed: int | np.random.Generator, *, logits_only: bool = True
) -> contextlib.ExitStack:
    """The fast paths for training a classifier on `runtime`, active until the stack
    closes: host dropout seeded by `seed` (or drawing from it); if `logits_only` (the loss reads the logits
    alone, and nothing outside `model` shares its embedding), the [CLS]-only last layer and
    the row-sparse embedding gradient."""
    stack = runtime.fast_paths(model, seed, row_grads=logits_only)
    if logits_only and runtime.uses("first_token_only"):
        stack.enter_context(first_token_only(model))
    return stack


def _last_bert_layer(model: nn.Module) -> nn.Module | None:
    from transformers.models.bert.modeling_bert import BertForSequenceClassification, BertLayer

    if not isinstance(model, BertForSequenceClassification) or model.bert.pooler is None:
        return None
    layer = model.bert.encoder.layer[-1]
    plain = isinstance(layer, BertLayer) and not layer.is_decoder and not layer.chunk_size_feed_forward
    return layer if plain else None


def _first_token_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """BertLayer.forward for position 0 only: (B, T, H) in, (B, 1, H) out."""
    att = self.attention.self
    b, t, _ = hidden_states.shape
    first = hidden_states[:, :1]  # (B, 1, H)
    q = att.query(first).view(b, 1, -1, att.attention_head_size).transpose(1, 2)  # (B, h, 1, d)
    k = att.key(hidden_states).view(b, t, -1, att.attention_head_size).transpose(1, 2)  # (B, h, T, d)
    v = att.value(hidden_states).view(b, t, -1, att.attention_head_size).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(att.config._attn_implementation, eager_attention)
    mask = attention_mask[:, :, :1] if attention_mask is not None else None  # (B, 1, 1, T)
    dropout = att.dropout.p if self.training else 0.0
    context, _ = attend(att, q, k, v, mask, dropout=dropout, scaling=att.scaling)
    attended = self.attention.output(context.reshape(b, 1, -1), first)
    return self.output(self.intermediate(attended), attended)


@contextlib.contextmanager
def first_token_only(model: PreTrainedModel) -> Iterator[bool]:
    """Run a BERT classifier's last layer for [CLS] alone while inside (a no-op for other
    architectures, or when already active); yields whether it applies."""
    layer = _last_bert_layer(model)
    if layer is None or "forward" in vars(layer):
        yield False
        return
    layer.forward = types.MethodType(_first_token_forward, layer)
    try:
        yield True
    finally:
        del layer.forward
