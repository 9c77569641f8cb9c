"""Masked-LM for text encoders: BERT corruption, its loss on masked positions only, the
pretraining loop, held-out loss, and the source side of the joint objective."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tlpipe import distributed
from tlpipe.batching import length_batches, pad_arrays, round_up
from tlpipe.faults import failpoint
from tlpipe.params import OptimParams
from tlpipe.resume import Resume
from tlpipe.settings.text_classification.model import mlm_head
from tlpipe.settings.text_classification.text import SpecialIds
from tlpipe.train import (
    CPU_FP32,
    Runtime,
    clip_and_step,
    generator_states,
    make_optimizer,
    quiet,
    restore_generators,
    run_fingerprint,
)

log = logging.getLogger(__name__)


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


# The target of a padding row: cross entropy leaves it out.
IGNORED = -100


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


def mlm_loss(
    encoder: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    special: SpecialIds,
    vocab_size: int,
    mask_prob: float,
    gen: torch.Generator,
    runtime: Runtime = CPU_FP32,
) -> tuple[torch.Tensor, int]:
    """Corrupt a host batch (B, T), move it to the encoder's device, and return the loss over
    the masked positions and their number. The corruption is drawn on the batch as given;
    then, where the runtime buckets shapes, its length is padded to the runtime's multiple
    (at most the encoder's positions) and the masked rows to its rows multiple (padding rows
    that the loss ignores), which leaves the loss as it was."""
    device = next(encoder.parameters()).device
    corrupted, positions, targets = mask_for_mlm(input_ids, mask, special, vocab_size, mask_prob, gen)
    n = len(targets)
    width = round_up(input_ids.shape[1], runtime.length_multiple, encoder.config.max_position_embeddings)
    if width > input_ids.shape[1]:
        extra = width - input_ids.shape[1]
        positions = positions // input_ids.shape[1] * width + positions % input_ids.shape[1]
        corrupted, mask = F.pad(corrupted, (0, extra), value=special.pad), F.pad(mask, (0, extra))
    rows = round_up(n, runtime.rows_multiple)
    if rows > n:
        positions = torch.cat([positions, positions.new_zeros(rows - n)])
        targets = torch.cat([targets, targets.new_full((rows - n,), IGNORED)])
    corrupted, positions, targets = (t.to(device, non_blocking=True) for t in (corrupted, positions, targets))
    hidden = encoder(input_ids=corrupted, attention_mask=mask.to(device, non_blocking=True)).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, H) of (B, T, H)
    logits = head(picked)  # (N, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORED), n


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
    resume: Resume | None = None,
    desc: str = "pretrain",
) -> MlmResult:
    """Masked-LM training for `steps` optimizer steps over `ids`, epoch after epoch. With
    `resume`, the run named `desc` continues from the state it saved there and saves its
    whole state at logged steps `resume.every_s` apart (as `train_model` does). Among the
    ranks torchrun started, data parallel as `train_model` is (tlpipe.distributed): each
    rank corrupts and trains on its slice of every batch, the loss weighted so that the
    averaged gradient is the mean over every masked position of the batch."""
    w = distributed.world()
    runtime = runtime.among(w)
    device = runtime.device
    runtime.place(model)
    encoder, head = mlm_head(model)
    vocab = model.config.vocab_size
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    rng, dropout = np.random.default_rng(seed), np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if w.distributed:  # each rank's own masks and dropout; the batches alike on every rank
        dropout = np.random.default_rng([seed, w.rank])
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, w.rank]).generate_state(1)[0]))
    optimizer, scheduler = make_optimizer(model, optim, steps)
    distributed.broadcast_parameters(model.state_dict().values(), w)
    result = MlmResult(steps=steps, tokens=0, seconds=0.0)
    batches: list[np.ndarray] = []
    done, clock = 0, 0.0
    fingerprint = run_fingerprint(
        desc if not w.distributed else f"{desc} on {w.size} ranks",
        {
            "steps": steps,
            "optim": optim.model_dump(),
            "mask_prob": mask_prob,
            "seed": seed,
            "log_every": log_every,
        },
        model,
    )
    saved = resume.load(desc, fingerprint) if resume is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_generators(saved["generators"], rng=rng, dropout=dropout, gen=gen)
        if w.distributed:
            restore_generators(saved["ranks"][w.rank], dropout=dropout, gen=gen)
        batches = [b.numpy() for b in saved["batches"]]
        done, clock, result.tokens = saved["step"], saved["clock"], saved["tokens"]
        result.history = saved["history"]
        log.info("%s: resumed at step %d of %d", desc, done, steps)
    model.train()
    running = torch.zeros((), device=device)
    start = time.perf_counter() - clock
    last_save = time.perf_counter()
    bar = tqdm(total=steps, initial=done, desc=desc, unit="step", disable=quiet() or not w.main)
    with runtime.fast_paths(model, dropout):
        for step in range(done, steps):
            if not batches:
                batches = length_batches(lengths, optim.batch_size, rng)
            batch = batches.pop()
            result.tokens += int(lengths[batch].sum())
            idx = w.shard(batch)
            if len(idx):
                input_ids, mask = pad_batch([ids[i] for i in idx], special.pad)
                with runtime.autocast():
                    loss, n = mlm_loss(
                        encoder, head, input_ids, mask, special, vocab, mask_prob, gen, runtime
                    )
            else:
                loss, n = torch.zeros((), device=device), 0
            if w.distributed:
                # The mean over the batch's masked positions, once the gradients are averaged.
                (n_all,) = distributed.summed([n], w)
                if n:
                    (loss * (n * w.size / n_all)).backward()
                distributed.average_gradients(model.parameters(), w)
            else:
                loss.backward()
            clip_and_step(optimizer, model.parameters(), optim.max_grad_norm, runtime.uses("clip_in_step"))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            failpoint("train.step")
            running += loss.detach()
            bar.update()
            if (step + 1) % log_every == 0 or step + 1 == steps:
                logged = (step % log_every) + 1
                # The one host sync, every log_every steps; the ranks' mean among several.
                (total,) = distributed.summed([float(running)], w)
                avg = total / w.size / logged
                running.zero_()
                now = time.perf_counter()
                result.history.append(
                    {
                        "step": step + 1,
                        "loss": avg,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": result.tokens,
                        "seconds": now - start,
                    }
                )
                bar.set_postfix(loss=f"{avg:.3f}")
                due = resume is not None and step + 1 < steps and now - last_save >= resume.every_s
                if distributed.from_main(due, w):
                    assert resume is not None
                    own = generator_states(dropout=dropout, gen=gen)
                    ranks = distributed.gathered(own, w) if w.distributed else []
                    state = {
                        "step": step + 1,
                        "clock": now - start,
                        "tokens": result.tokens,
                        "history": result.history,
                        "batches": [torch.from_numpy(b) for b in batches],
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generators": generator_states(rng=rng, dropout=dropout, gen=gen),
                        "ranks": ranks,
                    }
                    if w.main:
                        resume.save(desc, fingerprint, state)
                    last_save = time.perf_counter()
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
        loss, n = mlm_loss(encoder, head, input_ids, mask, special, model.config.vocab_size, mask_prob, gen)
        total += float(loss) * n
        count += n
    return total / max(1, count)


@dataclass
class SourceMlm:
    """The source side of the joint loss: masked-LM on source text through an LM head tied
    to the classifier's input embeddings."""

    head: nn.Module
    ids: Sequence[np.ndarray]
    special: SpecialIds
    alpha: float
    mask_prob: float
