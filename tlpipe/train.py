"""The training loop shared by pretrain, finetune and the scratch control.

One process, plain PyTorch: length-bucketed batches with dynamic padding, the masked-LM
loss computed on masked positions only, a fused AdamW, no per-step host syncs beyond
logging. Batches are built and masked on the host and moved to the device; the
forward and backward passes run under bf16 autocast where the device computes bf16
natively (see `Runtime`). The fast paths in `tlpipe.fastpath` cut the rest: a classifier's
last layer runs for [CLS] alone, its word-embedding gradient is written row by row into
one buffer, and on a CPU dropout masks come from a faster generator.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tlpipe.batching import length_batches, pad_arrays
from tlpipe.fastpath import ATTENTION, embedding_row_grads, first_token_only, host_dropout
from tlpipe.model import mlm_head
from tlpipe.params import FinetuneParams, OptimParams
from tlpipe.text import SpecialIds
from tlpipe.transfer import (
    L2SP,
    NO_DECAY,
    apply_freezing,
    num_layers,
    param_groups,
    schedule_factor,
    trainable_from,
)


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bf16 matrix products natively (a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 / AMX); emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# The fast paths a Runtime can turn off (benchmarks measure each one's share).
FAST_PATHS = ("first_token_only", "host_dropout", "embedding_row_grads", "clip_in_step")
# On a GPU torch's dropout is a fast on-device kernel, where host masks would cross the bus
# every step.
_CPU_ONLY = ("host_dropout",)


@dataclass(frozen=True)
class Runtime:
    """Where training runs, whether its forward and backward passes use bf16 autocast
    (weights, gradients and optimizer state stay fp32), and which fast paths are off."""

    device: torch.device
    bf16: bool
    off: frozenset[str] = frozenset()

    def uses(self, fast_path: str) -> bool:
        """Whether `fast_path` (one of FAST_PATHS) applies on this runtime."""
        if fast_path not in FAST_PATHS:
            raise ValueError(f"unknown fast path {fast_path!r}; known: {', '.join(FAST_PATHS)}")
        return fast_path not in self.off and (fast_path not in _CPU_ONLY or self.device.type == "cpu")

    def without(self, *fast_paths: str) -> Runtime:
        return replace(self, off=self.off | frozenset(fast_paths))

    @classmethod
    def pick(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """`device` auto is the GPU when torch sees one; `precision` auto is bf16 where the
        device computes it natively, else fp32."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
        dev = torch.device(device)
        if precision == "bf16" and not bf16_native(dev):
            raise RuntimeError(f"precision: bf16 was asked for, but this {dev.type} has no native bf16")
        return cls(dev, precision == "bf16" or (precision == "auto" and bf16_native(dev)))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: PreTrainedModel) -> None:
        """Move `model` to the device. On a CPU, attention runs as plain matrix products:
        for tweet-length sequences they train ~1.3x faster than the fused SDPA kernel."""
        model.to(self.device)
        if self.device.type == "cpu" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION)

    def fast_paths(
        self, model: PreTrainedModel, seed: int, *, classifier: bool = False
    ) -> contextlib.ExitStack:
        """The fast paths for training `model`, active until the returned stack closes:
        host dropout seeded by `seed`; if `classifier` (the loss reads the logits alone, and
        nothing outside `model` shares its embedding), the [CLS]-only last layer and the
        row-sparse embedding gradient."""
        stack = contextlib.ExitStack()
        if self.uses("host_dropout"):
            stack.enter_context(host_dropout(model, seed))
        if classifier and self.uses("first_token_only"):
            stack.enter_context(first_token_only(model))
        if classifier and self.uses("embedding_row_grads"):
            stack.enter_context(embedding_row_grads(model))
        return stack


CPU_FP32 = Runtime(torch.device("cpu"), bf16=False)


def adamw(groups: Iterable[Any], lr: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one pass over all parameters a step."""
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def clip_and_step(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_norm: float, in_step: bool = True
) -> None:
    """`nn.utils.clip_grad_norm_(params, max_norm)`, then `optimizer.step()`. If `in_step`
    and the optimizer is fused, the clipping scale is applied inside its one pass over the
    gradients (its `grad_scale`, the hook AMP's GradScaler uses), not by a separate pass that
    multiplies every gradient; the scaled gradients are left in `.grad` either way."""
    grads = [q.grad for q in params if q.grad is not None]
    if not (in_step and getattr(optimizer, "_step_supports_amp_scaling", False)):
        nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        total = nn.utils.get_total_norm(grads)
        optimizer.grad_scale = torch.clamp((total + 1e-6) / max_norm, min=1.0)  # 1 / clip_grad_norm_'s coef
    optimizer.step()


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids (B, T) and attention_mask (B, T)."""
    ids, mask = pad_arrays(seqs, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def iterate_batches(
    ids: Sequence[np.ndarray], batches: Iterable[np.ndarray], pad_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    for idx in batches:
        input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
        yield idx, input_ids, mask


def mask_for_mlm(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special: SpecialIds,
    vocab_size: int,
    mask_prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT corruption: of a `mask_prob` share of real tokens, 80% [MASK], 10% random, 10% kept.

    Returns (corrupted input_ids (B, T), positions (N,) into the flattened (B*T) batch,
    target ids (N,)). The loss is computed on those N positions only.
    """
    maskable = (attention_mask == 1) & (input_ids != special.cls) & (input_ids != special.sep)
    maskable &= input_ids != special.pad
    probs = torch.rand(input_ids.shape, generator=gen)
    chosen = maskable & (probs < mask_prob)
    if not bool(chosen.any()):
        # Short batches can draw no mask at all; force one so every step has a loss.
        flat = maskable.flatten().nonzero().squeeze(1)
        pick = flat[torch.randint(len(flat), (1,), generator=gen)]
        chosen = chosen.flatten()
        chosen[pick] = True
        chosen = chosen.view_as(input_ids)
    positions = chosen.flatten().nonzero().squeeze(1)
    targets = input_ids.flatten()[positions]
    corrupted = input_ids.clone().flatten()
    roll = torch.rand(len(positions), generator=gen)
    to_mask = roll < 0.8
    to_random = (roll >= 0.8) & (roll < 0.9)
    corrupted[positions[to_mask]] = special.mask
    n_random = int(to_random.sum())
    if n_random:
        corrupted[positions[to_random]] = torch.randint(vocab_size, (n_random,), generator=gen)
    return corrupted.view_as(input_ids), positions, targets


def make_optimizer(
    model: nn.Module, p: OptimParams, total_steps: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW (no decay on biases and norms), warmup then the configured decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": p.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = adamw(groups, p.lr)
    return optimizer, LambdaLR(optimizer, schedule_factor(p, total_steps))


@dataclass
class MlmResult:
    """`history` logs, every `log_every` steps, the mean loss, the learning rate, and the
    tokens (non-padding) and seconds since the start."""

    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _mlm_loss(
    encoder: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    special: SpecialIds,
    vocab_size: int,
    mask_prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """Corrupt a host batch (B, T), move it to the encoder's device, and return the loss over
    the masked positions and their number."""
    device = next(encoder.parameters()).device
    batch = mask_for_mlm(input_ids, mask, special, vocab_size, mask_prob, gen)
    corrupted, positions, targets = (t.to(device, non_blocking=True) for t in batch)
    hidden = encoder(input_ids=corrupted, attention_mask=mask.to(device, non_blocking=True)).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, H) of (B, T, H)
    logits = head(picked)  # (N, V)
    return F.cross_entropy(logits.float(), targets), len(targets)


def train_mlm(
    model: PreTrainedModel,
    ids: Sequence[np.ndarray],
    special: SpecialIds,
    *,
    steps: int,
    optim: OptimParams,
    mask_prob: float,
    seed: int,
    log_every: int,
    runtime: Runtime = CPU_FP32,
    desc: str = "pretrain",
) -> MlmResult:
    """Masked-LM training for `steps` optimizer steps over `ids`, epoch after epoch."""
    device = runtime.device
    runtime.place(model)
    encoder, head = mlm_head(model)
    vocab = model.config.vocab_size
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, optim, steps)
    model.train()
    result = MlmResult(steps=steps, tokens=0, seconds=0.0)
    running = torch.zeros((), device=device)
    start = time.perf_counter()
    batches: list[np.ndarray] = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=_quiet())
    with runtime.fast_paths(model, seed):
        for step in range(steps):
            if not batches:
                batches = length_batches(lengths, optim.batch_size, rng)
            input_ids, mask = pad_batch([ids[i] for i in batches.pop()], special.pad)
            result.tokens += int(mask.sum())
            with runtime.autocast():
                loss, _ = _mlm_loss(encoder, head, input_ids, mask, special, vocab, mask_prob, gen)
            loss.backward()
            clip_and_step(optimizer, model.parameters(), optim.max_grad_norm, runtime.uses("clip_in_step"))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            bar.update()
            if (step + 1) % log_every == 0 or step + 1 == steps:
                n = (step % log_every) + 1
                avg = float(running) / n  # the one host sync, every log_every steps
                running.zero_()
                result.history.append(
                    {
                        "step": step + 1,
                        "loss": avg,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": result.tokens,
                        "seconds": time.perf_counter() - start,
                    }
                )
                bar.set_postfix(loss=f"{avg:.3f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


# Held-out source rows that measure masked-LM loss: after pretraining and for forgetting.
MLM_EVAL_ROWS = 512


@torch.no_grad()
def mlm_eval_loss(
    model: PreTrainedModel,
    ids: Sequence[np.ndarray],
    special: SpecialIds,
    *,
    mask_prob: float,
    seed: int,
    batch_size: int = 64,
) -> float:
    """Mean masked-LM loss over `ids` under a fixed, seeded corruption."""
    encoder, head = mlm_head(model)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    total, count = 0.0, 0
    for _, input_ids, mask in iterate_batches(ids, length_batches(lengths, batch_size, None), special.pad):
        loss, n = _mlm_loss(encoder, head, input_ids, mask, special, model.config.vocab_size, mask_prob, gen)
        total += float(loss) * n
        count += n
    return total / max(1, count)


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    eval_every: int


def plan_steps(n_train: int, p: FinetuneParams) -> StepPlan:
    """Optimizer steps for `n_train` rows: epochs, raised to min_steps, capped at max_steps."""
    per_epoch = math.ceil(n_train / p.optim.batch_size)
    total = max(p.epochs * per_epoch, p.min_steps)
    if p.max_steps is not None:
        total = min(total, p.max_steps)
    return StepPlan(per_epoch, total, math.ceil(total / p.evaluations))


@dataclass
class SourceMlm:
    """The source side of the joint loss: masked-LM on source text through an LM head tied
    to the classifier's input embeddings."""

    head: nn.Module
    ids: Sequence[np.ndarray]
    special: SpecialIds
    alpha: float
    mask_prob: float


@dataclass
class ClassifierResult:
    best_step: int
    best_val_macro_f1: float
    steps: int
    seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)


def train_classifier(
    model: PreTrainedModel,
    train_ids: Sequence[np.ndarray],
    train_y: np.ndarray,
    val_ids: Sequence[np.ndarray],
    val_y: np.ndarray,
    p: FinetuneParams,
    pad_id: int,
    *,
    transferred: set[str] | None = None,
    source_mlm: SourceMlm | None = None,
    checkpoint_dir: Path | None = None,
    runtime: Runtime = CPU_FP32,
    desc: str = "finetune",
) -> ClassifierResult:
    """Fine-tune under `p`'s strategy, keeping the weights of the best validation macro-F1.

    `transferred` names the parameters that came from the source model (the L2-SP anchors);
    `source_mlm` adds the joint loss. After each validation the full training state
    (weights, optimizer, scheduler, RNG) is written to `checkpoint_dir/last.pt` when given.
    Each validation appends to `history`, with the examples and the training seconds
    (validation excluded) since the start.
    """
    device = runtime.device
    runtime.place(model)
    if source_mlm is not None:
        source_mlm.head.to(device)
    plan = plan_steps(len(train_ids), p)
    n_layers = num_layers(model)
    lowest = trainable_from(p, n_layers, epoch=1)
    apply_freezing(model, lowest)
    anchored = (transferred or set()) if p.l2sp > 0 else set()
    groups = param_groups(model, p, anchored)
    if source_mlm is not None:
        own = {id(q) for q in model.parameters()}
        extra = [q for q in source_mlm.head.parameters() if id(q) not in own]
        groups.append({"params": extra, "lr": p.optim.lr, "weight_decay": 0.0, "depth": n_layers + 1})
        source_lengths = np.fromiter((len(s) for s in source_mlm.ids), dtype=np.int64)
    trainable = [q for g in groups for q in g["params"]]
    optimizer = adamw(groups, p.optim.lr)
    scheduler = LambdaLR(optimizer, schedule_factor(p.optim, plan.total_steps))
    l2sp = L2SP.anchor(model, anchored, p.l2sp) if anchored else None

    lengths = np.fromiter((len(s) for s in train_ids), dtype=np.int64, count=len(train_ids))
    rng = np.random.default_rng(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    labels_t = torch.tensor(train_y, dtype=torch.long, device=device)
    n_labels = model.config.num_labels
    best_f1, best_step, best_state, stale = -1.0, 0, None, 0
    result = ClassifierResult(best_step=0, best_val_macro_f1=0.0, steps=0, seconds=0.0, examples=0)
    batches: list[np.ndarray] = []
    source_batches: list[np.ndarray] = []
    running, seen, epoch = torch.zeros((), device=device), 0, 0
    start, validating = time.perf_counter(), 0.0
    model.train()
    bar = tqdm(total=plan.total_steps, desc=desc, unit="step", leave=False, disable=_quiet())
    # The joint loss reads every position of the last layer; L2-SP adds to every row of the
    # embedding's gradient, which leaves nothing row-sparse.
    fast = runtime.without("embedding_row_grads") if l2sp is not None else runtime
    with fast.fast_paths(model, p.seed, classifier=source_mlm is None):
        for step in range(1, plan.total_steps + 1):
            if not batches:
                batches, epoch = length_batches(lengths, p.optim.batch_size, rng), epoch + 1
                if p.strategy == "gradual_unfreeze":
                    apply_freezing(model, trainable_from(p, n_layers, epoch))
            idx = batches.pop()
            input_ids, mask = (t.to(device) for t in pad_batch([train_ids[i] for i in idx], pad_id))
            with runtime.autocast():
                logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, C)
                loss = F.cross_entropy(logits.float(), labels_t[torch.from_numpy(idx).to(device)])
                if source_mlm is not None:
                    if not source_batches:
                        source_batches = length_batches(source_lengths, p.optim.batch_size, rng)
                    src_ids, src_mask = pad_batch([source_mlm.ids[i] for i in source_batches.pop()], pad_id)
                    source_loss, _ = _mlm_loss(
                        model.base_model, source_mlm.head, src_ids, src_mask, source_mlm.special,
                        model.config.vocab_size, source_mlm.mask_prob, gen,
                    )  # fmt: skip
                    loss = (1 - source_mlm.alpha) * loss + source_mlm.alpha * source_loss
            loss.backward()
            if l2sp is not None:
                l2sp.add_to_grads()
            clip_and_step(optimizer, trainable, p.optim.max_grad_norm, runtime.uses("clip_in_step"))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach() * len(idx)
            seen += len(idx)
            bar.update()
            if step % plan.eval_every and step != plan.total_steps:
                continue
            result.examples += seen
            train_loss = float(running) / max(1, seen)  # the host sync, once a validation
            paused = time.perf_counter()
            pred = predict_logits(model, val_ids, pad_id, p.eval_batch_size, runtime).argmax(1)
            metrics = classification_metrics(val_y, pred, n_labels)
            result.history.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_accuracy": metrics["accuracy"],
                    "val_macro_f1": metrics["macro_f1"],
                    "examples": result.examples,
                    "seconds": paused - start - validating,
                }
            )
            running.zero_()
            seen = 0
            if metrics["macro_f1"] > best_f1:
                best_f1, best_step, stale = metrics["macro_f1"], step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if checkpoint_dir is not None:
                _save_training_state(checkpoint_dir, model, optimizer, scheduler, rng, step)
            validating += time.perf_counter() - paused
            if stale >= p.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    for q in model.parameters():
        q.requires_grad_(True)
    model.eval()
    result.best_step, result.best_val_macro_f1, result.steps = best_step, best_f1, step
    result.seconds = time.perf_counter() - start
    return result


def _save_training_state(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    rng: np.random.Generator,
    step: int,
) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / ".last.pt.tmp"
    torch.save(
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, ckpt_dir / "last.pt")


@torch.no_grad()
def predict_logits(
    model: PreTrainedModel,
    ids: Sequence[np.ndarray],
    pad_id: int,
    batch_size: int,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Logits (N, C) in the order of `ids`, batched by length to keep padding small, the
    last layer run for [CLS] alone; in fp32 on the model's device unless a `runtime` says
    otherwise."""
    was_training = model.training
    model.eval()
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    device = next(model.parameters()).device
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float32)
    batches = iterate_batches(ids, length_batches(lengths, batch_size, None), pad_id)
    with first_token_only(model):
        for idx, input_ids, mask in batches:
            with runtime.autocast() if runtime else contextlib.nullcontext():
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)  # rows: true, cols: predicted
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    predicted, support = confusion.sum(0).astype(float), confusion.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "macro_f1": float(f1.mean()),
        "per_class": [
            {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(n_labels)
        ],
        "confusion": confusion.tolist(),
    }


def _quiet() -> bool:
    return os.environ.get("TLPIPE_PROGRESS", "1") == "0"
