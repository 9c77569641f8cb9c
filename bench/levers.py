"""What training-speed levers not in tlpipe's loop would give a masked-LM step, side by side
on this machine: step-time probes that size a lever before it is built, without a quality
figure (bench.train measures whole runs and their held-out loss).

- bf16 weights: the model kept in bf16 between steps and trained without autocast, the
  optimizer stepping fp32 master weights and casting them back once a step, against bf16
  autocast (tlpipe's bf16), which casts every weight at each use and every gradient back;
- fused QKV: one (d, 3d) product for queries, keys and values instead of three (d, d), the
  forward and backward of the projection alone.

Every configuration trains the pretrain stage's from-scratch BERT on the same source batches
(padded as tlpipe pads them in bf16), `--steps` steps a turn, taking turns for `--rounds`
rounds after an untimed warm-up round; fp32 and autocast with unrounded shapes run beside
them for scale.

    python -m bench.levers [--steps 40] [--rounds 3] [--batch-size N]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import in_turns, pin_threads, ratio, record, stat, threads_from_env, timed
from tlpipe.batching import length_batches
from tlpipe.data import read_split, texts
from tlpipe.params import load_params
from tlpipe.settings.text_classification.mlm import mlm_loss, pad_batch
from tlpipe.settings.text_classification.model import bert_config, mlm_head, new_mlm
from tlpipe.settings.text_classification.text import SpecialIds, encode, train_wordpiece
from tlpipe.train import Runtime, bf16_native, clip_and_step, make_optimizer

PREPARE = Path("outputs/prepare")
CPU = torch.device("cpu")


def step_masters(
    optimizer: torch.optim.Optimizer, masters: list[torch.Tensor], params: list[torch.Tensor], max_norm: float
) -> None:
    """The bf16 weights' gradients moved onto their fp32 masters, a clipped optimizer step
    there, and the masters cast back into the bf16 weights."""
    for m, q in zip(masters, params, strict=True):
        m.grad = q.grad.float() if q.grad is not None else None
        q.grad = None
    clip_and_step(optimizer, masters, max_norm)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_copy_(params, masters)


def step_configs(model: torch.nn.Module, special: SpecialIds, batch_size: int) -> dict[str, Callable]:
    """name -> step(input_ids, mask, gen): one optimizer step of its own copy of `model`."""
    p = load_params().pretrain
    optim = p.optim.model_copy(update={"batch_size": batch_size})
    vocab = model.config.vocab_size
    configs: dict[str, Callable] = {}

    def autocast_step(rt: Runtime) -> Callable:
        own = copy.deepcopy(model)
        rt.place(own)
        own.train()
        encoder, head = mlm_head(own)
        optimizer, _ = make_optimizer(own, optim, 10_000)
        params = list(own.parameters())

        def step(input_ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> None:
            with rt.autocast():
                loss, _ = mlm_loss(encoder, head, input_ids, mask, special, vocab, p.mask_prob, gen, rt)
            loss.backward()
            clip_and_step(optimizer, params, optim.max_grad_norm)
            optimizer.zero_grad(set_to_none=True)

        step.model = own  # type: ignore[attr-defined]
        return step

    def bf16_weights_step() -> Callable:
        rt = Runtime(CPU, bf16=True)
        master = copy.deepcopy(model)
        own = copy.deepcopy(model).to(torch.bfloat16)
        rt.place(own)
        own.train()
        encoder, head = mlm_head(own)
        optimizer, _ = make_optimizer(master, optim, 10_000)
        masters, params = list(master.parameters()), list(own.parameters())

        def step(input_ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> None:
            loss, _ = mlm_loss(encoder, head, input_ids, mask, special, vocab, p.mask_prob, gen, rt)
            loss.backward()
            step_masters(optimizer, masters, params, optim.max_grad_norm)

        step.model = own  # type: ignore[attr-defined]
        return step

    configs["fp32"] = autocast_step(Runtime(CPU, bf16=False))
    if bf16_native(CPU):
        configs["bf16 autocast, shapes unrounded"] = autocast_step(
            Runtime(CPU, True).without("shape_buckets")
        )
        configs["bf16 autocast (tlpipe)"] = autocast_step(Runtime(CPU, bf16=True))
        configs["bf16 weights, fp32 masters"] = bf16_weights_step()
    return configs


def bench_steps(steps: int, rounds: int, batch_size: int | None, prepare: Path = PREPARE) -> dict[str, Any]:
    p = load_params().pretrain
    batch_size = batch_size or p.optim.batch_size
    corpus = [t for t in texts(read_split(prepare, "source")) if t.strip()]
    tok = train_wordpiece(corpus, p.tokenizer)
    special = SpecialIds.of(tok)
    ids = encode(tok, corpus, p.max_length)
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    torch.manual_seed(p.seed)
    model = new_mlm(bert_config(p.model, tok.get_vocab_size(), special.pad, p.max_length))
    configs = step_configs(model, special, batch_size)
    batches = length_batches(lengths, batch_size, np.random.default_rng(p.seed))
    rates: dict[str, list[float]] = {name: [] for name in configs}
    host = Runtime(CPU, bf16=False)
    for r, name in in_turns(list(configs), rounds + 1):  # round 0 warms every one up, untimed
        turn = [batches[(r * steps + i) % len(batches)] for i in range(steps)]
        padded = [pad_batch([ids[i] for i in idx], special.pad) for idx in turn]
        gen = torch.Generator().manual_seed(r)
        step = configs[name]
        with host.fast_paths(step.model, p.seed + r):
            start = time.perf_counter()
            for input_ids, mask in padded:
                step(input_ids, mask, gen)
            seconds = time.perf_counter() - start
        if r:
            rates[name].append(sum(int(m.sum()) for _, m in padded) / seconds)
            print(f"round {r}, {name}: {rates[name][-1]:.0f} tokens/s", flush=True)
    out = {name: stat(r, "tokens/s") for name, r in rates.items()}
    base = "bf16 autocast (tlpipe)" if "bf16 autocast (tlpipe)" in out else "fp32"
    return {
        "model": f"BERT {p.model.num_layers}x{p.model.hidden_size}, vocab {tok.get_vocab_size()}",
        "batch_size": batch_size,
        "steps_per_turn": steps,
        "rounds": rounds,
        "configs": out,
        "vs": base,
        "ratio": {name: ratio(r, out[base]) for name, r in out.items()},
    }


def bench_fused_qkv(tokens: int, hidden: int) -> dict[str, Any]:
    """Seconds of the query, key and value projections' forward and backward over `tokens`
    rows: three (d, d) products against one (d, 3d), under bf16 autocast where native."""
    bf16 = bf16_native(CPU)
    x = torch.randn(tokens, hidden, requires_grad=True)
    three = [torch.nn.Linear(hidden, hidden) for _ in range(3)]
    fused = torch.nn.Linear(hidden, 3 * hidden)

    def run(layers: list[torch.nn.Linear]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = torch.cat([layer(x) for layer in layers], dim=-1)
        out.float().sum().backward()

    found = {
        "three": stat(timed(lambda: run(three), reps=20, warmup=3), "s"),
        "fused": stat(timed(lambda: run([fused]), reps=20, warmup=3), "s"),
    }
    return {
        "tokens": tokens,
        "hidden": hidden,
        "bf16": bf16,
        **found,
        "speedup": ratio(found["three"], found["fused"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--results", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    threads = threads_from_env()
    pin_threads(threads)
    p = load_params().pretrain
    out = {
        "threads": threads,
        "steps": bench_steps(args.steps, args.rounds, args.batch_size),
        "fused_qkv": bench_fused_qkv((args.batch_size or p.optim.batch_size) * 40, p.model.hidden_size),
    }
    for name, r in out["steps"]["ratio"].items():
        print(f"{name}: {r:.2f}x {out['steps']['vs']}")
    print(f"fused QKV: {out['fused_qkv']['speedup']:.2f}x three projections")
    record("levers-cpu", out, args.results)


if __name__ == "__main__":
    main()
