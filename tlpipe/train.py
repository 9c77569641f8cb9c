"""The training loop every setting shares, and where it runs.

Plain PyTorch: a setting's `TrainTask` makes the batches, the loss and the validation
scores; this loop owns the rest: the strategy's freezing and layer-wise learning rates over
the model's `LayerGroups`, L2-SP, a fused AdamW with warmup and decay, periodic validation
keeping the best weights, early stopping, the resumable training state, and no per-step
host syncs beyond validation. On one process, or data parallel on the ranks torchrun
started (tlpipe.distributed). The forward and backward passes run under bf16
autocast where it pays: on a GPU with bf16, on a CPU where a probe measured it faster than
fp32 (see `Runtime` and tlpipe.precision).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tlpipe import distributed
from tlpipe.distributed import World
from tlpipe.fastpath import ATTENTION, embedding_row_grads, host_dropout, tanh_gelu
from tlpipe.faults import failpoint
from tlpipe.params import FinetuneParams, OptimParams, PretrainParams
from tlpipe.precision import bf16_pays
from tlpipe.resume import Resume
from tlpipe.transfer import (
    L2SP,
    NO_DECAY,
    LayerGroups,
    apply_freezing,
    param_groups,
    schedule_factor,
    trainable_from,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd

    from tlpipe.params import DataParams
    from tlpipe.setting import Arm, Setting, SourceRun, TrainTask


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bf16 matrix products natively (a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 / AMX); emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# The fast paths a Runtime can turn off (benchmarks measure each one's share).
FAST_PATHS = (
    "first_token_only",
    "host_dropout",
    "embedding_row_grads",
    "clip_in_step",
    "shape_buckets",
    "tanh_gelu",
)
# On a GPU torch's dropout is a fast on-device kernel, where host masks would cross the bus
# every step.
_CPU_ONLY = ("host_dropout",)
# oneDNN builds a bf16 kernel for every new matrix shape (on an AMX CPU 1 to 17 ms each,
# more than the product itself at a tweet batch's size) and keeps the last 1,024. A
# masked-LM loss changes shape every step: the number of masked rows going through the
# (hidden x vocabulary) head, and the batch's length. Padding the rows to a multiple of
# ROWS_MULTIPLE and the length to one of LENGTH_MULTIPLE leaves few shapes, each built
# once (on an AMX Xeon a masked-LM step ran 1.5x faster for the rows, 1.08x more for the
# length). A classifier's batches are left as they are: with lengths rounded, MiniLM
# fine-tuning ran 0.94x as fast (the padding costs more than the kernels it saves). fp32
# kernels cost little to build, so fp32 pads no further.
_CPU_BF16_ONLY = ("shape_buckets",)
LENGTH_MULTIPLE = 8
ROWS_MULTIPLE = 32


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
        cpu = self.device.type == "cpu"
        return (
            fast_path not in self.off
            and (fast_path not in _CPU_ONLY or cpu)
            and (fast_path not in _CPU_BF16_ONLY or (cpu and self.bf16))
        )

    @property
    def length_multiple(self) -> int:
        """What a masked-LM batch's padded length is rounded up to."""
        return LENGTH_MULTIPLE if self.uses("shape_buckets") else 1

    @property
    def rows_multiple(self) -> int:
        """What a masked-LM loss's masked rows are padded to."""
        return ROWS_MULTIPLE if self.uses("shape_buckets") else 1

    def without(self, *fast_paths: str) -> Runtime:
        return replace(self, off=self.off | frozenset(fast_paths))

    def among(self, w: World) -> Runtime:
        """This runtime on one of `w`'s ranks. The row-sparse embedding gradient is off
        there: it clears, after each step, only the rows this rank's batch looked up, while
        the gradient averaged over the ranks also fills the rows of the others' batches,
        which would then stay in it. Clipping in the optimizer's step stays on: it runs after
        the average, on the same gradients on every rank."""
        return self.without("embedding_row_grads") if w.distributed else self

    @classmethod
    def pick(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """`device` auto is the GPU when torch sees one; `precision` auto is bf16 on a GPU
        that computes it natively and on a CPU where it also measured faster than fp32
        (`bf16_pays`), else fp32."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
        dev = torch.device(device)
        if precision == "bf16" and not bf16_native(dev):
            raise RuntimeError(f"precision: bf16 was asked for, but this {dev.type} has no native bf16")
        if precision != "auto":
            return cls(dev, precision == "bf16")
        return cls(dev, bf16_native(dev) and (dev.type == "cuda" or bf16_pays()))

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
        self, model: nn.Module, seed: int | np.random.Generator, *, row_grads: bool = False
    ) -> contextlib.ExitStack:
        """The shared fast paths for training `model`, active until the returned stack
        closes: the one-kernel tanh GELU; host dropout seeded by `seed` (or drawing from the
        generator given); if `row_grads` (nothing outside `model` shares its input
        embedding, and nothing adds to every row of its gradient), the row-sparse embedding
        gradient. A setting's task adds its own."""
        stack = contextlib.ExitStack()
        if self.uses("tanh_gelu"):
            stack.enter_context(tanh_gelu(model))
        if self.uses("host_dropout"):
            stack.enter_context(host_dropout(model, seed))
        if row_grads and self.uses("embedding_row_grads"):
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
class TrainResult:
    """`history` has a row per validation: step, epoch, train loss, the task's validation
    scores, and the examples and training seconds (validation excluded) since the start."""

    best_step: int
    best_score: float
    steps: int
    seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)

    def best(self) -> dict[str, float]:
        """The validation row whose weights were kept."""
        return next(row for row in self.history if row["step"] == self.best_step)


def train_model(
    model: nn.Module,
    task: TrainTask,
    p: FinetuneParams,
    groups: LayerGroups,
    *,
    transferred: set[str] | None = None,
    resume: Resume | None = None,
    runtime: Runtime = CPU_FP32,
    desc: str = "finetune",
) -> TrainResult:
    """Train `model` on `task` under `p`'s strategy and budget, keeping the weights of the
    best validation score (`task.selection`).

    `groups` are the model's layer groups (what freezing and layer-wise rates act on);
    `transferred` names the parameters that came from the source model (the L2-SP anchors).
    With `resume`, the run named `desc` continues from the state it saved there, and saves
    its whole state (weights, optimizer, schedule, every generator, the epoch's remaining
    batches, the best weights so far, the history) at validations `resume.every_s` apart:
    on a CPU, a run killed and resumed ends with the weights of a run never stopped.
    """
    w = distributed.world()
    runtime = runtime.among(w)
    device = runtime.device
    runtime.place(model)
    plan = plan_steps(task.rows, p)
    apply_freezing(model, groups, trainable_from(p, groups.blocks, epoch=1))
    anchored = (transferred or set()) if p.l2sp > 0 else set()
    optim_groups = param_groups(model, groups, p, anchored)
    own = {id(q) for q in model.parameters()}
    extra = [q for q in task.extra_parameters() if id(q) not in own]
    if extra:
        optim_groups.append({"params": extra, "lr": p.optim.lr, "weight_decay": 0.0, "depth": groups.head})
    trainable = [q for g in optim_groups for q in g["params"]]
    optimizer = adamw(optim_groups, p.optim.lr)
    scheduler = LambdaLR(optimizer, schedule_factor(p.optim, plan.total_steps))
    distributed.broadcast_parameters([*model.state_dict().values(), *extra], w)
    l2sp = L2SP.anchor(model, anchored, p.l2sp) if anchored else None

    loop = _Loop.start(p.seed, w, task.selection.worst)
    # A state saved on other ranks' count is another run's.
    run = desc if not w.distributed else f"{desc} on {w.size} ranks"
    fingerprint = run_fingerprint(run, p, model, extra) if resume is not None else ""
    saved = resume.load(desc, fingerprint) if resume is not None else None
    if saved is not None:
        loop.restore(saved, model, extra, optimizer, scheduler, task, w)
        if p.strategy == "gradual_unfreeze" and loop.epoch:
            apply_freezing(model, groups, trainable_from(p, groups.blocks, loop.epoch))
        log.info("%s: resumed at step %d of %d", desc, loop.step, plan.total_steps)
    selection = task.selection
    running, seen = torch.zeros((), device=device), 0
    start = time.perf_counter() - loop.clock
    last_save = time.perf_counter()
    model.train()
    bar = tqdm(
        total=plan.total_steps,
        initial=loop.step,
        desc=desc,
        unit="step",
        leave=False,
        disable=quiet() or not w.main,
    )
    # L2-SP adds to every row of the embedding's gradient, which leaves nothing row-sparse.
    fast = runtime.without("embedding_row_grads") if l2sp is not None else runtime
    with task.fast_paths(model, fast, loop.dropout):
        while loop.step < plan.total_steps and not loop.stopped:
            loop.step += 1
            if not loop.batches:
                loop.batches, loop.epoch = task.epoch(loop.rng), loop.epoch + 1
                if p.strategy == "gradual_unfreeze":
                    apply_freezing(model, groups, trainable_from(p, groups.blocks, loop.epoch))
            batch = loop.batches.pop()
            idx = w.shard(batch)
            if len(idx):
                with runtime.autocast():
                    loss = task.loss(model, idx, loop.draws)
                # The mean over the global batch, once the ranks' gradients are averaged.
                (loss * (len(idx) * w.size / len(batch)) if w.distributed else loss).backward()
                running += loss.detach() * len(idx)
                seen += len(idx)
            distributed.average_gradients(trainable, w)
            if l2sp is not None:
                l2sp.add_to_grads()
            clip_and_step(optimizer, trainable, p.optim.max_grad_norm, runtime.uses("clip_in_step"))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            failpoint("train.step")
            bar.update()
            if loop.step % plan.eval_every and loop.step != plan.total_steps:
                continue
            if w.distributed:
                total, seen_all = distributed.summed([float(running), seen], w)
            else:
                total, seen_all = float(running), seen  # the host sync, once a validation
            loop.examples += int(seen_all)
            train_loss = total / max(1, seen_all)
            paused = time.perf_counter()
            # Every rank takes rank 0's scores, and with them the same decisions.
            scores = distributed.from_main(task.validate(model) if w.main else None, w)
            loop.history.append(
                {
                    "step": loop.step,
                    "epoch": loop.epoch,
                    "train_loss": train_loss,
                    **scores,
                    "examples": loop.examples,
                    "seconds": paused - start - loop.validating,
                }
            )
            running.zero_()
            seen = 0
            score = scores[f"val_{selection.key}"]
            if selection.better(score, loop.best_score):
                loop.best_score, loop.best_step, loop.stale = score, loop.step, 0
                loop.best_state = copy.deepcopy(model.state_dict())
            else:
                loop.stale += 1
            loop.stopped = loop.stale >= p.patience
            now = time.perf_counter()
            more = loop.step < plan.total_steps and not loop.stopped
            due = distributed.from_main(resume is not None and more and now - last_save >= resume.every_s, w)
            if due:
                assert resume is not None
                loop.clock = now - start
                ranks = distributed.gathered(loop.own_state(task), w) if w.distributed else None
                if w.main:
                    state = loop.snapshot(model, extra, optimizer, scheduler, task, ranks)
                    resume.save(desc, fingerprint, state)
                last_save = time.perf_counter()
            loop.validating += time.perf_counter() - paused
    bar.close()
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    for q in model.parameters():
        q.requires_grad_(True)
    model.eval()
    return TrainResult(
        loop.best_step, loop.best_score, loop.step, time.perf_counter() - start, loop.examples, loop.history
    )


@dataclass
class _Loop:
    """What the loop carries from step to step, besides the model and the optimizer."""

    rng: np.random.Generator  # the batches (the same on every rank)
    dropout: np.random.Generator  # host dropout's masks
    best_score: float
    # The task's draws: `rng` itself on one process, a rank's own generator among several.
    draws: np.random.Generator | None = None
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped: bool = False
    step: int = 0
    epoch: int = 0
    batches: list[np.ndarray] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    examples: int = 0
    clock: float = 0.0  # seconds since the run began, when last saved
    validating: float = 0.0

    def __post_init__(self) -> None:
        if self.draws is None:
            self.draws = self.rng

    @classmethod
    def start(cls, seed: int, w: World, worst: float) -> _Loop:
        """The loop's generators at its start. Among several ranks the batches are drawn
        alike on every rank, and each rank's draws and dropout masks are its own."""
        if not w.distributed:
            return cls(np.random.default_rng(seed), np.random.default_rng(seed), worst)
        own = np.random.SeedSequence([seed, w.rank]).spawn(2)
        return cls(
            np.random.default_rng(seed),
            np.random.default_rng(own[0]),
            worst,
            draws=np.random.default_rng(own[1]),
        )

    def own_state(self, task: TrainTask) -> dict[str, Any]:
        """What is this rank's own: its generators (and the global ones) and its task's
        draws, which a state saved by rank 0 carries for every rank."""
        return {
            "generators": generator_states(draws=self.draws, dropout=self.dropout),
            "task": task.state_dict(),
        }

    def best_is_current(self) -> bool:
        return self.best_state is not None and self.best_step == self.step

    def snapshot(
        self,
        model: nn.Module,
        extra: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        task: TrainTask,
        ranks: list[Any] | None = None,
    ) -> dict[str, Any]:
        """The whole state at a validation (the running loss was just reset): a resumed run
        draws, steps and keeps exactly what this one would have. The best weights are saved
        apart only when they are not the current ones; `ranks`, every rank's `own_state`,
        when there are several."""
        return {
            "loop": {
                "best_score": self.best_score,
                "best_step": self.best_step,
                "stale": self.stale,
                "stopped": self.stopped,
                "step": self.step,
                "epoch": self.epoch,
                "history": self.history,
                "examples": self.examples,
                "clock": self.clock,
                "validating": self.validating,
            },
            "batches": [torch.from_numpy(b) for b in self.batches],
            "best": None if self.best_is_current() else self.best_state,
            "best_is_current": self.best_is_current(),
            "model": model.state_dict(),
            "extra": [q.detach() for q in extra],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "task": task.state_dict(),
            "generators": generator_states(rng=self.rng, dropout=self.dropout),
            "ranks": ranks or [],
        }

    def restore(
        self,
        state: dict[str, Any],
        model: nn.Module,
        extra: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        task: TrainTask,
        w: World,
    ) -> None:
        for key, value in state["loop"].items():
            setattr(self, key, value)
        self.batches = [b.numpy() for b in state["batches"]]
        model.load_state_dict(state["model"])
        with torch.no_grad():
            for q, value in zip(extra, state["extra"], strict=True):
                q.copy_(value)
        self.best_state = copy.deepcopy(model.state_dict()) if state["best_is_current"] else state["best"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task.load_state_dict(state["task"])
        restore_generators(state["generators"], rng=self.rng, dropout=self.dropout)
        if w.distributed:
            own = state["ranks"][w.rank]
            restore_generators(own["generators"], draws=self.draws, dropout=self.dropout)
            task.load_state_dict(own["task"])


def run_fingerprint(run: str, settings: Any, model: nn.Module, extra: Iterable[torch.Tensor] = ()) -> str:
    """A training run's identity: its name, what it was asked (params, JSON-able) and its
    starting weights."""
    asked = (
        settings.model_dump_json()
        if hasattr(settings, "model_dump_json")
        else json.dumps(settings, sort_keys=True)
    )
    h = hashlib.sha256(f"{run}\0{asked}\0".encode())
    tensors = [*model.state_dict().items(), *((f"extra.{i}", q) for i, q in enumerate(extra))]
    for name, tensor in tensors:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def generator_states(**generators: np.random.Generator | torch.Generator) -> dict[str, Any]:
    """The states of `generators` and of the global ones (Python's, numpy's, torch's on the
    CPU and on every CUDA device), in a form `torch.load(weights_only=True)` reads."""
    legacy = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    for name, gen in generators.items():
        states[name] = gen.get_state() if isinstance(gen, torch.Generator) else gen.bit_generator.state
    return states


def restore_generators(states: dict[str, Any], **generators: np.random.Generator | torch.Generator) -> None:
    """Put back what `generator_states` saved."""
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, gen in generators.items():
        if isinstance(gen, torch.Generator):
            gen.set_state(states[name])
        else:
            gen.bit_generator.state = states[name]


def fit(
    setting: Setting,
    arm: Arm,
    rows: pd.DataFrame,
    val: pd.DataFrame,
    p: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    *,
    runtime: Runtime,
    resume: Resume | None = None,
    desc: str = "finetune",
) -> tuple[TrainResult, TrainTask]:
    """`train_model` on an arm of `setting`: trained on `rows`, validated on `val`, the
    setting making the task and declaring the model's layer groups. Returns the run and the
    task it trained on."""
    task = setting.task(arm, rows, val, p, data, source_dir, runtime)
    run = train_model(
        arm.model,
        task,
        p,
        setting.layer_groups(arm.model),
        transferred=arm.transferred,
        resume=resume,
        runtime=runtime,
        desc=desc,
    )
    return run, task


def source_plan(p: PretrainParams) -> FinetuneParams:
    """The loop as supervised pretraining runs it over the source rows: exactly `steps`
    steps, validated `evaluations` times on held-out source rows, no early stop."""
    return FinetuneParams(
        seed=p.seed,
        max_length=p.max_length,
        epochs=1,
        min_steps=p.steps,
        max_steps=p.steps,
        evaluations=p.evaluations,
        patience=p.evaluations,
        optim=p.optim,
        augment=p.augment,
        device=p.device,
        precision=p.precision,
        distributed=p.distributed,
    )


def train_supervised_source(
    model: nn.Module,
    preprocessor: Any,
    make_task: Callable[[FinetuneParams, Runtime], TrainTask],
    p: PretrainParams,
    groups: LayerGroups,
    held_out_rows: int,
    resume: Resume | None = None,
) -> SourceRun:
    """Supervised pretraining as every setting runs it: `model` trained on the task
    `make_task(plan, runtime)` builds for `source_plan(p)` (source rows, validated on
    held-out ones, the best kept, resumed from `resume`), recorded with the best held-out
    scores, one history row per validation and the examples trained per second. A task that cannot be built (a
    source row without a label from the set) is a DataError that says so."""
    from tlpipe.errors import DataError
    from tlpipe.setting import SourceRun

    plan = source_plan(p)
    runtime = Runtime.pick(p.device, p.precision)
    try:
        task = make_task(plan, runtime)
    except DataError as err:
        raise DataError(f"supervised pretraining needs a source label on every source row: {err}") from None
    run = train_model(model, task, plan, groups, runtime=runtime, resume=resume, desc="pretrain (supervised)")
    best = run.best()
    log.info(
        "pretrain: %d supervised steps, held-out source accuracy %.4f (step %d)",
        run.steps,
        best["val_accuracy"],
        run.best_step,
    )
    history = [
        {"step": r["step"], "loss": r["train_loss"], "val_accuracy": r["val_accuracy"]} for r in run.history
    ]
    return SourceRun(
        model,
        preprocessor,
        {
            "held_out_rows": held_out_rows,
            "best_step": run.best_step,
            "source_accuracy": best["val_accuracy"],
            "source_macro_f1": best["val_macro_f1"],
        },
        history,
        ("step", "loss", "val_accuracy"),
        {"examples_per_second": run.examples / max(run.seconds, 1e-9)},
    )


def quiet() -> bool:
    return os.environ.get("TLPIPE_PROGRESS", "1") == "0"
