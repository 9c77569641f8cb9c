"""Transfer strategies: which layers train, at which learning rate, and what anchors them.

A model's parameters are grouped by depth (`LayerGroups`, declared by each setting for each
architecture it supports): 0 for the input embeddings, l for the backbone's block l (1..L),
L + 1 for the head. Freezing, gradual unfreezing and layer-wise learning-rate decay are all
rules over that depth, so they act the same on any architecture that declares its groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tlpipe.params import FinetuneParams, OptimParams

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class LayerGroups:
    """Each parameter's depth: 0 the input embeddings, 1..`blocks` the backbone's blocks
    from the bottom, `blocks` + 1 (the head) everything else."""

    blocks: int
    depths: dict[str, int]

    @property
    def head(self) -> int:
        return self.blocks + 1

    def depth(self, name: str) -> int:
        return self.depths.get(name, self.head)

    @classmethod
    def match(cls, names: Iterable[str], embeddings: str, block: str, blocks: int) -> LayerGroups:
        """Groups from two patterns over parameter names (timm's group matcher): `embeddings`
        marks depth 0; `block` captures a block's 0-based index. Names matching neither (a
        pooler, a classifier, an LM head) are the head. Raises ValueError when the blocks
        found are not exactly 0..`blocks` - 1."""
        emb, blk = re.compile(embeddings), re.compile(block)
        depths: dict[str, int] = {}
        for name in names:
            if emb.search(name):
                depths[name] = 0
            elif found := blk.search(name):
                depths[name] = int(found[1]) + 1
        seen = {d for d in depths.values() if d > 0}
        if seen != set(range(1, blocks + 1)):
            raise ValueError(
                f"the model declares {blocks} blocks, but its parameter names give blocks "
                f"{sorted(d - 1 for d in seen)} (pattern {block!r})"
            )
        return cls(blocks, depths)

    @classmethod
    def below_base(cls, model: nn.Module, embeddings: str, block: str, blocks: int) -> LayerGroups:
        """`match` over a Hugging Face model's parameter names below its base model
        (`bert.encoder.layer.0...` in a classifier is `encoder.layer.0...` in a bare
        encoder), keyed by the full names."""
        prefix = f"{model.base_model_prefix}."
        local = {name: name.removeprefix(prefix) for name, _ in model.named_parameters()}
        groups = cls.match(local.values(), embeddings, block, blocks)
        return cls(
            groups.blocks,
            {name: groups.depths[short] for name, short in local.items() if short in groups.depths},
        )


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


def apply_freezing(model: nn.Module, groups: LayerGroups, lowest: int) -> None:
    """Parameters below depth `lowest` stop receiving gradients (and so never change)."""
    for name, param in model.named_parameters():
        param.requires_grad_(groups.depth(name) >= lowest)


def layer_lr(p: FinetuneParams, depth: int, n_layers: int) -> float:
    """lr * layer_decay ** (L - depth): the top layer and the head train at the full rate."""
    return p.optim.lr * p.layer_decay ** max(0, n_layers - depth)


def param_groups(
    model: nn.Module, groups: LayerGroups, p: FinetuneParams, anchored: set[str] | None = None
) -> list[dict[str, object]]:
    """AdamW groups by (depth, decay): every parameter, frozen ones included, so unfreezing
    later needs no new optimizer (AdamW skips parameters without a gradient).

    Biases and norms get no weight decay; neither do `anchored` (L2-SP) parameters, which are
    pulled toward their source values instead of toward zero.
    """
    anchored = anchored or set()
    by: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        decays = not name.endswith(NO_DECAY) and name not in anchored
        by.setdefault((groups.depth(name), decays), []).append(param)
    return [
        {
            "params": params,
            "lr": layer_lr(p, depth, groups.blocks),
            "weight_decay": p.optim.weight_decay if decays else 0.0,
            "depth": depth,
        }
        for (depth, decays), params in sorted(by.items())
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
