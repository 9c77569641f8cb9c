"""Where a GPT training step's time goes on this machine, and what levers outside tlpipe's
loop would give it, side by side: step-time probes without a quality figure
(bench.generation trains whole runs against the Hugging Face Trainer, with held-out loss).

- The profile of tlpipe's bf16 step (the loop's step: autocast, host dropout, clipping in
  the fused AdamW): the share of its time in matrix products and their FLOP/s against this
  machine's 2048^3 bf16 rate in the same run. Everything else (layer norms, GELU, softmax,
  dropout, the cross entropy over the vocabulary, casts, the optimizer) is what fusion
  could remove: the step rate with none of it left is the ceiling of any such lever.
- torch.compile (inductor) of the model under the same autocast, its dropout in the graph
  (host dropout would break the graph at every layer), the loss on the compiled model's
  logits; compiling is timed apart.
- bf16 weights between steps, trained without autocast, the optimizer stepping fp32
  master weights and casting them back once a step.
- GPT-2's GELU as transformers writes it (`gelu_new`: eight elementwise operations), the
  loop's one-kernel tanh GELU fast path off.
- The loss unfused: the (B, T, V) logits cast to fp32, then the cross entropy, as a causal
  LM's forward computes it (tlpipe's loss projects and takes the softmax a chunk of rows at
  a time, and keeps only the logits' gradient for backward).
- fp32, for scale.
- GPT-2's GELU alone, forward and backward over one block's feed-forward activations
  (batch x block x 4 x width, bf16): written out as transformers writes it against the
  one kernel the loop swaps in.
- The memory of the fused loss against the unfused one at GPT-2's own vocabulary: the
  peak resident memory of one loss and backward over 2,048 rows of width 768 and a
  50,257-token vocabulary, each side in a fresh process, above a process that only builds
  the inputs.

The generation benchmark's GPT (the example's source tweets, its BPE, a GPT-2 config of its
width, blocks of `pretrain.max_length`, its batch and optimizer); every configuration takes
`--steps` steps a turn on the same batches, in turns for `--rounds` rounds after an untimed
warm-up round.

    python -m bench.gpt_levers [--steps 30] [--rounds 3] [--gpt-layers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from transformers.activations import GELUTanh, NewGELUActivation

from bench.common import in_turns, pin_threads, ratio, record, run_measured, stat, threads_from_env, timed
from bench.generation import EXAMPLE, source_corpus
from bench.levers import step_masters
from bench.train import matmul_flops
from tlpipe.params import OptimParams, load_params
from tlpipe.settings.text_generation.lm import (
    block_starts,
    gather,
    linear_cross_entropy,
    lm_loss,
    logits_loss,
)
from tlpipe.settings.text_generation.model import new_gpt
from tlpipe.train import Runtime, bf16_native, clip_and_step, make_optimizer

CPU = torch.device("cpu")
TLPIPE = "bf16 autocast (tlpipe)"
# The profiler's names for matrix products (a linear layer is addmm, attention bmm).
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def step_configs(model: torch.nn.Module, optim: OptimParams) -> dict[str, Callable[[torch.Tensor], None]]:
    """name -> step(windows): one optimizer step of its own copy of `model` on (B, T + 1)
    token windows. A step's `model` is what its `runtime`'s fast paths go on (None: the
    model keeps its own dropout and GELU)."""
    configs: dict[str, Callable] = {}

    def autocast_step(rt: Runtime, compiled: bool = False, loss: Callable = lm_loss) -> Callable:
        own = copy.deepcopy(model)
        rt.place(own)
        own.train()
        optimizer, _ = make_optimizer(own, optim, 10_000)
        params = list(own.parameters())
        forward = torch.compile(own, dynamic=False) if compiled else own

        def step(windows: torch.Tensor) -> None:
            with rt.autocast():
                value = loss(forward, windows)
            value.backward()
            clip_and_step(optimizer, params, optim.max_grad_norm)
            optimizer.zero_grad(set_to_none=True)

        step.model = None if compiled else own  # type: ignore[attr-defined]
        step.runtime = rt  # type: ignore[attr-defined]
        return step

    def bf16_weights_step() -> Callable:
        master = copy.deepcopy(model)
        own = copy.deepcopy(model).to(torch.bfloat16)
        Runtime(CPU, bf16=True).place(own)
        own.train()
        optimizer, _ = make_optimizer(master, optim, 10_000)
        masters, params = list(master.parameters()), list(own.parameters())

        def step(windows: torch.Tensor) -> None:
            lm_loss(own, windows).backward()
            step_masters(optimizer, masters, params, optim.max_grad_norm)

        step.model = own  # type: ignore[attr-defined]
        step.runtime = Runtime(CPU, bf16=True)  # type: ignore[attr-defined]
        return step

    configs["fp32"] = autocast_step(Runtime(CPU, bf16=False))
    if bf16_native(CPU):
        configs[TLPIPE] = autocast_step(Runtime(CPU, bf16=True))
        configs["bf16 autocast, logits then cross entropy"] = autocast_step(
            Runtime(CPU, bf16=True), loss=logits_loss
        )
        configs["bf16 autocast, torch.compile (inductor)"] = autocast_step(
            Runtime(CPU, bf16=True), True, logits_loss
        )
        configs["bf16 weights, fp32 masters"] = bf16_weights_step()
        configs["bf16 autocast, GELU written out (gelu_new)"] = autocast_step(
            Runtime(CPU, bf16=True).without("tanh_gelu")
        )
    return configs


def dropout_for(step: Callable, seed: int) -> contextlib.AbstractContextManager:
    """The step's runtime's fast paths on its model (host dropout, the tanh GELU), as
    tlpipe's loop trains; nothing for a step that keeps its own dropout and GELU."""
    if step.model is None:
        return contextlib.nullcontext()
    return step.runtime.fast_paths(step.model, seed)


def profile_step(step: Callable, batches: list[torch.Tensor], seed: int) -> dict[str, Any]:
    """The share of `step`'s time in matrix products over `batches` (after one untimed
    step), their FLOPs and FLOP/s, and the biggest other operators' shares."""
    from torch.profiler import ProfilerActivity, profile

    with dropout_for(step, seed):
        step(batches[0])
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            for windows in batches:
                step(windows)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = [e for e in events if e.key in MATMULS]
    mm_us = sum(e.self_cpu_time_total for e in mm)
    flops = sum(e.flops for e in mm)
    others = sorted((e for e in events if e.key not in MATMULS), key=lambda e: -e.self_cpu_time_total)
    return {
        "steps": len(batches),
        "matmul_share": mm_us / total,
        "matmul_flop_per_step": flops / len(batches),
        "matmul_flop_per_s": flops / (mm_us * 1e-6),
        "others": {e.key: e.self_cpu_time_total / total for e in others[:8]},
    }


def bench(corpus: dict[str, Any], steps: int, rounds: int, gpt_layers: int) -> dict[str, Any]:
    """Every configuration's tokens/s on `corpus` (`bench.generation.source_corpus`'s), the
    warm-up round's seconds, and the profile of tlpipe's step."""
    p = load_params(EXAMPLE).pretrain
    lm, block, optim = p.lm, p.max_length, p.optim
    torch.manual_seed(p.seed)
    model = new_gpt(
        corpus["vocab"], lm.hidden_size, gpt_layers, lm.num_heads, lm.dropout, block + 1, corpus["eos"]
    )
    ids = torch.as_tensor(corpus["train"].astype(np.int64))
    starts = block_starts(len(corpus["train"]), block)
    rng = np.random.default_rng(p.seed)
    batches = [
        gather(ids, starts[rng.integers(0, len(starts), optim.batch_size)], block + 1) for _ in range(steps)
    ]
    configs = step_configs(model, optim)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    warmup: dict[str, float] = {}
    tokens = steps * optim.batch_size * block
    for r, name in in_turns(list(configs), rounds + 1):  # round 0 warms up (and compiles), untimed
        step = configs[name]
        with dropout_for(step, p.seed + r):
            start = time.perf_counter()
            for windows in batches:
                step(windows)
            seconds = time.perf_counter() - start
        if r:
            rates[name].append(tokens / seconds)
            print(f"round {r}, {name}: {rates[name][-1]:.0f} tokens/s", flush=True)
        else:
            warmup[name] = seconds
    out = {name: stat(r, "tokens/s") for name, r in rates.items()}
    base = TLPIPE if TLPIPE in out else "fp32"
    profiled = profile_step(configs[base], batches[: min(10, steps)], p.seed)
    dtype = torch.bfloat16 if base == TLPIPE else torch.float32
    peak = matmul_flops(CPU, dtype, 2048)
    return {
        "model": f"GPT-2 {gpt_layers}x{lm.hidden_size}, vocab {corpus['vocab']}",
        "block": block,
        "batch_size": optim.batch_size,
        "steps_per_turn": steps,
        "rounds": rounds,
        "configs": out,
        "warmup_seconds": warmup,
        "vs": base,
        "ratio": {name: ratio(r, out[base]) for name, r in out.items()},
        "profile": profiled
        | {
            "peak_flop_per_s": peak,
            "peak_dtype": str(dtype).removeprefix("torch."),
            "ceiling_ratio": 1.0 / profiled["matmul_share"],
        },
    }


def gelu_times(shape: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """Milliseconds of one forward and backward of each GELU over a bf16 tensor of `shape`,
    the two taking turns for `rounds` rounds of 20 calls."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    grad = torch.ones_like(x)
    acts = {"gelu_new, written out": NewGELUActivation(), "one kernel (tlpipe)": GELUTanh()}
    ms: dict[str, list[float]] = {name: [] for name in acts}
    for _, name in in_turns(list(acts), rounds):
        xs = x.clone().requires_grad_()
        seconds = timed(lambda act=acts[name], xs=xs: act(xs).backward(grad), reps=20)
        ms[name].append(1e3 * statistics.median(seconds))
    return {"shape": list(shape), "ms": {name: stat(v, "ms") for name, v in ms.items()}}


# GPT-2's vocabulary and width, and a batch of 32 blocks of 64 tokens.
MEMORY_SHAPE = {"vocab": 50_257, "width": 768, "rows": 2_048}
MEMORY_SIDES = ("inputs only", "fused", "logits then cross entropy")


def loss_memory_side(side: str) -> None:
    """One side of `loss_memory`, in this process: the inputs, then (unless "inputs only")
    one bf16-autocast loss over them and its backward."""
    n, width, vocab = MEMORY_SHAPE["rows"], MEMORY_SHAPE["width"], MEMORY_SHAPE["vocab"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, width, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=gen)
    if side == "inputs only":
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if side == "fused":
            loss = linear_cross_entropy(hidden, weight, None, target)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight).float(), target)
    loss.backward()


def loss_memory(threads: int) -> dict[str, Any]:
    """Peak resident MiB of each side's loss and backward above the inputs' process."""
    peak = {}
    for side in MEMORY_SIDES:
        cmd = [sys.executable, "-m", "bench.gpt_levers", "--loss-memory", side, "--threads", str(threads)]
        peak[side] = run_measured(cmd)[1]
    base = peak.pop("inputs only")
    return MEMORY_SHAPE | {"mib_above_inputs": {side: mib - base for side, mib in peak.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpt-layers", type=int, default=4)
    parser.add_argument("--results", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--loss-memory", choices=MEMORY_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or threads_from_env()
    pin_threads(threads)
    if args.loss_memory:
        loss_memory_side(args.loss_memory)
        return
    out = {"threads": threads, **bench(source_corpus()[1], args.steps, args.rounds, args.gpt_layers)}
    p = load_params(EXAMPLE).pretrain
    out["gelu"] = gelu_times((p.optim.batch_size, p.max_length, 4 * p.lm.hidden_size), args.rounds)
    out["loss_memory"] = loss_memory(threads)
    for name, r in out["ratio"].items():
        print(f"{name}: {r:.2f}x {out['vs']}")
    prof = out["profile"]
    rate = prof["matmul_flop_per_s"]
    print(
        f"matrix products: {prof['matmul_share']:.0%} of the step at {rate / 1e9:.0f} GFLOP/s "
        f"({rate / prof['peak_flop_per_s']['median']:.0%} of the 2048^3 rate)"
    )
    for name, ms in out["gelu"]["ms"].items():
        print(f"GELU forward and backward, {name}: {ms['median']:.2f} ms")
    for side, mib in out["loss_memory"]["mib_above_inputs"].items():
        print(f"loss memory, {side}: {mib:.0f} MiB")
    record("gpt-levers-cpu", out, args.results)


if __name__ == "__main__":
    main()
