"""Transfer strategies: which layers train, at which learning rate, and what anchors them.

A classifier's parameters are grouped by depth: 0 for the embeddings, l for encoder layer l
(1..L), L + 1 for the head (pooler and classifier). Freezing, gradual unfreezing and
layer-wise learning-rate decay are all rules over that depth.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tlpipe.params import FinetuneParams, OptimParams

_LAYER = re.compile(r"\.layer\.(\d+)\.")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def depth_of(name: str, n_layers: int) -> int:
    """0 for embeddings, l (1..L) for encoder layer l, L + 1 for everything above."""
    if ".embeddings." in f".{name}":
        return 0
    match = _LAYER.search(f".{name}")
    return int(match[1]) + 1 if match else n_layers + 1


def trainable_from(p: FinetuneParams, n_layers: int, epoch: int = 1) -> int:
    """The lowest depth that trains during `epoch` (1-based); everything below is frozen."""
    head = n_layers + 1
    if p.strategy == "freeze_embeddings":
        return 1
    if p.strategy == "freeze_bottom":
        if p.freeze_bottom > n_layers:
            raise ValueError(
                f"finetune.freeze_bottom is {p.freeze_bottom} but the model has {n_layers} layers"
            )
        return p.freeze_bottom + 1
    if p.strategy == "head_only":
        return head
    if p.strategy == "gradual_unfreeze":
        return max(0, head - (epoch - 1))
    return 0


def apply_freezing(model: nn.Module, lowest: int) -> None:
    """Parameters below depth `lowest` stop receiving gradients (and so never change)."""
    n = num_layers(model)
    for name, param in model.named_parameters():
        param.requires_grad_(depth_of(name, n) >= lowest)


def layer_lr(p: FinetuneParams, depth: int, n_layers: int) -> float:
    """lr * layer_decay ** (L - depth): the top layer and the head train at the full rate."""
    return p.optim.lr * p.layer_decay ** max(0, n_layers - depth)


def param_groups(
    model: nn.Module, p: FinetuneParams, anchored: set[str] | None = None
) -> list[dict[str, object]]:
    """AdamW groups by (depth, decay): every parameter, frozen ones included, so unfreezing
    later needs no new optimizer (AdamW skips parameters without a gradient).

    Biases and norms get no weight decay; neither do `anchored` (L2-SP) parameters, which are
    pulled toward their source values instead of toward zero.
    """
    n = num_layers(model)
    anchored = anchored or set()
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        decays = not name.endswith(NO_DECAY) and name not in anchored
        groups.setdefault((depth_of(name, n), decays), []).append(param)
    return [
        {
            "params": params,
            "lr": layer_lr(p, depth, n),
            "weight_decay": p.optim.weight_decay if decays else 0.0,
            "depth": depth,
        }
        for (depth, decays), params in sorted(groups.items())
    ]


@dataclass
class L2SP:
    """lambda * ||theta - theta_source||^2 over the transferred weights, applied to gradients.

    Adding 2 * lambda * (theta - theta_source) to each gradient is exactly the gradient of
    the penalty, without building it into the autograd graph.
    """

    strength: float
    params: list[nn.Parameter]
    source: list[torch.Tensor]

    @classmethod
    def anchor(cls, model: nn.Module, names: set[str], strength: float) -> L2SP:
        named = [(n, q) for n, q in model.named_parameters() if n in names]
        return cls(strength, [q for _, q in named], [q.detach().clone() for _, q in named])

    @torch.no_grad()
    def add_to_grads(self) -> None:
        pairs = [(q, s) for q, s in zip(self.params, self.source, strict=True) if q.grad is not None]
        if not pairs:
            return
        params, source = zip(*pairs, strict=True)
        grads = [q.grad for q in params]
        diffs = torch._foreach_sub(list(params), list(source))
        torch._foreach_add_(grads, diffs, alpha=2.0 * self.strength)

    @torch.no_grad()
    def penalty(self) -> float:
        pairs = zip(self.params, self.source, strict=True)
        return self.strength * sum(float((q - s).pow(2).sum()) for q, s in pairs)


def schedule_factor(optim: OptimParams, total_steps: int) -> Callable[[int], float]:
    """The multiplier on each group's lr at a step: linear warmup, then the configured decay."""
    warmup = int(total_steps * optim.warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
