"""Training throughput: tlpipe's loop against the Hugging Face Trainer, side by side.

Masked-LM pretraining (a BERT of the pretrain stage's from-scratch config on the source
tweets) and fine-tuning (the shipped MiniLM on the labelled target tweets). Both sides get
the same model config and initial weights, the same token ids (truncated at max_length),
batch size, learning rate, warmup and decay, weight decay, clipping, optimizer (fused
AdamW) and thread count. Each side trains `--repeats` times, the sides in turn (see
`interleaved`); throughput is timed over windows of steps after a warm-up window, and each
figure is the median over the windows of all repeats, with min and max. Quality: each
side's final model, scored by the same function (held-out masked-LM loss; test accuracy).

Fine-tuning also measures what each of tlpipe's fast paths gives, interleaved (see
`ablate_fast_paths`).

    python -m bench.train [--device cpu|cuda] [--steps 150] [--window 25] [--repeats 3]
                          [--only mlm|finetune] [--batch-size N] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    in_turns,
    machine,
    pin_threads,
    ratio,
    record,
    same_machine_section,
    stat,
    threads_from_env,
    timed,
)
from tlpipe.batching import length_batches
from tlpipe.checkpoint import resolve_init
from tlpipe.data import label_ids, read_split, texts
from tlpipe.metrics import classification_metrics
from tlpipe.params import FinetuneParams, OptimParams, load_params
from tlpipe.settings.text_classification.classifier import ClassifierTask, predict_logits
from tlpipe.settings.text_classification.fastpath import classifier_fast_paths
from tlpipe.settings.text_classification.layers import layer_groups
from tlpipe.settings.text_classification.mlm import mlm_eval_loss, pad_batch, train_mlm
from tlpipe.settings.text_classification.model import bert_config, load_transfer_classifier, mlm_head, new_mlm
from tlpipe.settings.text_classification.text import SpecialIds, encode, load_tokenizer, train_wordpiece
from tlpipe.train import FAST_PATHS, Runtime, adamw, bf16_native, clip_and_step, train_model

PREPARE = Path("outputs/prepare")
EVAL_ROWS = 512


@dataclass
class Side:
    """One side's windows (work units, seconds) and the final quality of each scored repeat."""

    windows: list[tuple[float, float]]
    qualities: list[float]

    @property
    def quality(self) -> float:
        return float(np.mean(self.qualities))

    def quality_spread(self) -> dict[str, Any]:
        """Mean, sample standard deviation and every value of the scored repeats."""
        q = self.qualities
        return {"mean": self.quality, "std": float(np.std(q, ddof=1)) if len(q) > 1 else 0.0, "values": q}

    def throughput(self, unit: str) -> dict[str, Any]:
        return stat([work / seconds for work, seconds in self.windows], unit)


def windows_of(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(work, seconds) between consecutive (cumulative work, elapsed) marks, the first
    window (warm-up: allocator, kernel selection) dropped."""
    deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)]
    return deltas[1:]


def interleaved(
    configs: dict[str, tuple[str, bool]],
    train: Callable[..., tuple[list[tuple[float, float]], torch.nn.Module]],
    quality: Callable[[torch.nn.Module], float],
    repeats: int,
    unit: str,
    seeded: bool = False,
) -> dict[str, Side]:
    """Train every configuration `repeats` times from the same initial weights, the
    configurations taking turns (`in_turns`). A side's windows pool its repeats. Its
    quality is its first repeat's final model; with `seeded`, `train` also takes the
    repeat's index (`repeat=`, to seed its data order and dropout) and every repeat is
    scored, so quality has a spread to compare sides within."""
    windows: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    scores: dict[str, list[float]] = {name: [] for name in configs}
    for r, name in in_turns(list(configs), repeats):
        marks, model = train(name, *configs[name], repeat=r) if seeded else train(name, *configs[name])
        timed_windows = windows_of(marks)
        windows[name] += timed_windows
        if seeded or not scores[name]:
            scores[name].append(quality(model))
        print(f"{name}: {Side(timed_windows, []).throughput(unit)['median']:.1f} {unit}", flush=True)
    return {name: Side(windows[name], scores[name]) for name in configs}


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int) -> dict[str, Any]:
    """FLOP/s of an n x n x n matrix product (the machine's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    inner = 20 if device.type == "cuda" else 1
    seconds = timed(lambda: [a @ b for _ in range(inner)], reps=5, warmup=2, sync=sync)
    return stat([2 * n**3 * inner / s for s in seconds], "FLOP/s")


# ---- masked-LM pretraining -------------------------------------------------------------


def trainer_run(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    collator: Any,
    optim: OptimParams,
    steps: int,
    window: int,
    device: torch.device,
    bf16: bool,
    count_key: str,
) -> list[tuple[float, float]]:
    """Train with transformers.Trainer; (cumulative work, elapsed) every `window` steps,
    work being the non-padding tokens (count_key attention_mask) or the examples."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Counting:
        def __init__(self) -> None:
            self.work = 0

        def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
            out = collator(batch)
            self.work += int(out["attention_mask"].sum()) if count_key == "tokens" else len(batch)
            return out

    counting = Counting()
    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()
            marks.append((0, 0.0))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step % window == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                marks.append((counting.work, time.perf_counter() - self.start))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=optim.batch_size,
            max_steps=steps,
            learning_rate=optim.lr,
            weight_decay=optim.weight_decay,
            warmup_steps=int(optim.warmup_ratio * steps),
            lr_scheduler_type="linear",
            max_grad_norm=optim.max_grad_norm,
            optim="adamw_torch_fused",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=bf16,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=13,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=features, data_collator=counting, callbacks=[Clock()]
        )
        trainer.train()
    model.eval()
    return marks


def per_token_flops(config: Any, ids: list[np.ndarray], mask_prob: float) -> dict[str, float]:
    """Training FLOPs per non-padding token, as tlpipe computes them: 6 x non-embedding
    parameters, attention scores and mixing (12 L d T over a sequence of T tokens), and the
    LM head (transform and decoder) on the masked positions only."""
    d, layers, inter, vocab = (
        config.hidden_size,
        config.num_hidden_layers,
        config.intermediate_size,
        config.vocab_size,
    )
    per_layer = 4 * d * d + 2 * d * inter  # Q, K, V, O and the two FFN matrices
    lengths = np.array([len(s) for s in ids], dtype=np.float64)
    mean_t = float((lengths**2).sum() / lengths.sum())  # token-weighted sequence length
    maskable = float(((lengths - 2).clip(min=0)).sum() / lengths.sum())
    terms = {
        "dense": 6.0 * layers * per_layer,
        "attention": 12.0 * layers * d * mean_t,
        "head": 6.0 * (d * d + d * vocab) * mask_prob * maskable,
    }
    terms["total"] = sum(terms.values())
    return terms


def sides_for(
    runtime: Runtime, masked_lm: bool = False, compiled: bool = False
) -> dict[str, tuple[str, bool]]:
    """The configurations timed: name -> (trainer or tlpipe, bf16). On a CPU both loops run
    in fp32 and in bf16 (the Trainer's default is fp32; tlpipe's is what `precision: auto`
    picks); for the `masked_lm` loss tlpipe's bf16 also with its shapes unrounded, and with
    `compiled` its encoder under torch.compile. On a GPU, bf16 alone."""
    if runtime.device.type == "cuda":
        return {"trainer_bf16": ("trainer", True), "tlpipe": ("tlpipe", True)}
    sides = {"trainer": ("trainer", False), "tlpipe_fp32": ("tlpipe", False)}
    if bf16_native(runtime.device):
        sides |= {
            "trainer_bf16": ("trainer", True),
            "tlpipe": ("tlpipe", True),
        }
        if masked_lm:
            sides["tlpipe_unbucketed"] = ("tlpipe", True)
        if masked_lm and compiled:
            sides["tlpipe_compiled"] = ("tlpipe", True)
    return sides


def side_runtime(device: torch.device, name: str, bf16: bool) -> Runtime:
    """The runtime a tlpipe side trains with: `tlpipe_unbucketed` is bf16 with its batch
    shapes left unrounded (what the shape buckets give); `tlpipe_compiled` draws dropout
    with torch (host masks would break the compiled graph at every dropout)."""
    rt = Runtime(device, bf16)
    if name == "tlpipe_unbucketed":
        return rt.without("shape_buckets")
    return rt.without("host_dropout") if name == "tlpipe_compiled" else rt


def summary(sides: dict[str, Side], unit: str, quality: str) -> dict[str, Any]:
    """Each side's throughput and quality, every side's speed-up over the Trainer's default
    (fp32 on a CPU, bf16 on a GPU), and tlpipe's default over the Trainer at its precision."""
    out = {name: {unit: side.throughput(unit), quality: side.quality} for name, side in sides.items()}
    base = out["trainer"][unit] if "trainer" in out else out["trainer_bf16"][unit]
    speedups = {name: ratio(r[unit], base) for name, r in out.items()}
    best = "tlpipe" if Runtime.pick(precision="auto").bf16 and "tlpipe" in out else "tlpipe_fp32"
    same = "trainer_bf16" if best == "tlpipe" else "trainer"
    return {
        "sides": out,
        "speedup_vs_trainer": speedups,
        "speedup": speedups[best],
        "speedup_same_precision": ratio(out[best][unit], out[same][unit]),
        "tlpipe_default": best,
    }


def bench_mlm(
    runtime: Runtime, steps: int, window: int, repeats: int, batch_size: int | None, compiled: bool = False
) -> dict[str, Any]:
    params = load_params()
    p = params.pretrain
    optim = p.optim if batch_size is None else p.optim.model_copy(update={"batch_size": batch_size})
    corpus = [t for t in texts(read_split(PREPARE, "source")) if t.strip()]
    eval_texts, train_texts = corpus[:EVAL_ROWS], corpus[EVAL_ROWS:]
    tok = train_wordpiece(train_texts, p.tokenizer)
    special = SpecialIds.of(tok)
    train_ids, eval_ids = encode(tok, train_texts, p.max_length), encode(tok, eval_texts, p.max_length)
    torch.manual_seed(p.seed)
    initial = new_mlm(bert_config(p.model, tok.get_vocab_size(), special.pad, p.max_length))
    eval_kw = {"mask_prob": p.mask_prob, "seed": p.seed}

    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=p.mask_prob)
    features = [{"input_ids": s.tolist()} for s in train_ids]

    def train(name: str, loop: str, bf16: bool) -> tuple[list[tuple[float, float]], torch.nn.Module]:
        model = copy.deepcopy(initial)
        if loop == "trainer":
            return trainer_run(
                model, features, collator, optim, steps, window, runtime.device, bf16, "tokens"
            ), model
        if name == "tlpipe_compiled":
            # In place, so the loop and the scoring see the same module; shapes dynamic, so
            # length buckets do not each compile a graph.
            mlm_head(model)[0].compile(dynamic=True)
        run = train_mlm(
            model, train_ids, special, steps=steps, optim=optim, mask_prob=p.mask_prob, seed=p.seed,
            log_every=window, runtime=side_runtime(runtime.device, name, bf16), desc=f"mlm {name}",
        )  # fmt: skip
        return [(0, 0.0)] + [(h["tokens"], h["seconds"]) for h in run.history], model

    sides = interleaved(
        sides_for(runtime, masked_lm=True, compiled=compiled),
        train,
        lambda m: mlm_eval_loss(m, eval_ids, special, **eval_kw),
        repeats,
        "tokens/s",
    )

    out = summary(sides, "tokens_per_s", "eval_mlm_loss")
    flops = per_token_flops(initial.config, train_ids, p.mask_prob)
    if runtime.device.type == "cuda":
        peaks = {"bf16": ("bf16 matmul 8192^3", matmul_flops(runtime.device, torch.bfloat16, 8192))}
    else:
        peaks = {"fp32": ("fp32 matmul 2048^3", matmul_flops(runtime.device, torch.float32, 2048))}
        if bf16_native(runtime.device):
            peaks["bf16"] = ("bf16 matmul 2048^3", matmul_flops(runtime.device, torch.bfloat16, 2048))
    hardware = {}
    for name, r in out["sides"].items():
        useful = flops["total"] * r["tokens_per_s"]["median"]
        hardware[name] = {"useful_flops": useful} | {
            f"fraction_of_{k}_peak": useful / peak["median"] for k, (_, peak) in peaks.items()
        }
    return {
        "model": f"BERT {p.model.num_layers}x{p.model.hidden_size}, vocab {tok.get_vocab_size()}",
        "batch_size": optim.batch_size,
        "max_length": p.max_length,
        "steps": steps,
        "window_steps": window,
        "repeats": repeats,
        **out,
        "flops_per_token": flops,
        "peaks": {k: {"name": n, "flops": v} for k, (n, v) in peaks.items()},
        "hardware": hardware,
    }


# ---- fine-tuning -----------------------------------------------------------------------


def bench_finetune(
    runtime: Runtime, steps: int, window: int, repeats: int, ablate_rounds: int
) -> dict[str, Any]:
    from tasks.evaluate import labelled_target

    params = load_params()
    labels = params.data.labels
    ft: FinetuneParams = params.finetune.model_copy(
        update={"epochs": 1, "min_steps": steps, "max_steps": steps, "evaluations": steps // window,
                "patience": steps}
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        source_dir = resolve_init(params.pretrain.init_from or "", Path(tmp))
        tok = load_tokenizer(source_dir)
        pad = SpecialIds.of(tok).pad
        rows = labelled_target(PREPARE)
        train_ids, train_y = encode(tok, texts(rows), ft.max_length), label_ids(rows, labels)
        val, test = read_split(PREPARE, "val"), read_split(PREPARE, "test")
        val_ids, val_y = encode(tok, texts(val), ft.max_length), label_ids(val, labels)
        test_ids, test_y = encode(tok, texts(test), ft.max_length), label_ids(test, labels)
        torch.manual_seed(ft.seed)
        initial, _ = load_transfer_classifier(source_dir, labels)
        from transformers import AutoTokenizer, DataCollatorWithPadding

        hf_tok = AutoTokenizer.from_pretrained(source_dir)

    def accuracy(model: torch.nn.Module) -> float:
        pred = predict_logits(model, test_ids, pad, ft.eval_batch_size).argmax(1)
        return classification_metrics(test_y, pred, len(labels))["accuracy"]

    features = [{"input_ids": s.tolist(), "labels": int(y)} for s, y in zip(train_ids, train_y, strict=True)]
    collator = DataCollatorWithPadding(hf_tok)

    def train(name: str, loop: str, bf16: bool) -> tuple[list[tuple[float, float]], torch.nn.Module]:
        model = copy.deepcopy(initial)
        if loop == "trainer":
            marks = trainer_run(
                model, features, collator, ft.optim, steps, window, runtime.device, bf16, "examples"
            )
            return marks, model
        rt = side_runtime(runtime.device, name, bf16)
        task = ClassifierTask(
            train_ids, train_y, val_ids, val_y, pad=pad, n_labels=len(labels),
            batch_size=ft.optim.batch_size, eval_batch_size=ft.eval_batch_size, runtime=rt, seed=ft.seed,
        )  # fmt: skip
        run = train_model(model, task, ft, layer_groups(model), runtime=rt, desc=f"finetune {name}")
        return [(0, 0.0)] + [(h["examples"], h["seconds"]) for h in run.history], model

    sides = interleaved(sides_for(runtime), train, accuracy, repeats, "examples/s")
    ablation = ablate_fast_paths(
        runtime, initial, train_ids, train_y, ft, pad, rounds=ablate_rounds, block=window // 2
    )
    print(f"finetune fast paths: {ablation['gain']}", flush=True)
    return {
        "model": f"{params.pretrain.init_from} "
        f"({initial.config.num_hidden_layers}x{initial.config.hidden_size})",
        "train_rows": len(train_ids),
        "batch_size": ft.optim.batch_size,
        "max_length": ft.max_length,
        "steps": steps,
        "window_steps": window,
        "repeats": repeats,
        **summary(sides, "examples_per_s", "test_accuracy"),
        "fast_paths": ablation,
    }


def ablate_fast_paths(
    runtime: Runtime,
    initial: torch.nn.Module,
    train_ids: list[np.ndarray],
    train_y: np.ndarray,
    ft: FinetuneParams,
    pad: int,
    rounds: int,
    block: int,
) -> dict[str, Any]:
    """What each fast path gives to a fine-tuning step, with the others on. One model and
    one optimizer train on, a block of `block` steps per configuration (all on, each one off,
    all off), the configuration's fast paths entered around its block, for `rounds` rounds
    of turns (`in_turns`)."""
    # Shape buckets round masked-LM batches only (see tlpipe.train); a BERT's GELU is the
    # erf one, already a single kernel, so the tanh GELU has nothing to replace.
    paths = tuple(f for f in FAST_PATHS if runtime.uses(f) and f not in ("shape_buckets", "tanh_gelu"))
    configs = {"all on": (), **{f"{f} off": (f,) for f in paths}, "all off": paths}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    model = copy.deepcopy(initial)
    runtime.place(model)
    model.train()
    optimizer = adamw(model.parameters(), ft.optim.lr)
    lengths = np.array([len(s) for s in train_ids])
    batches = length_batches(lengths, ft.optim.batch_size, np.random.default_rng(ft.seed))
    labels = torch.as_tensor(train_y, device=runtime.device)

    def step(rt: Runtime, idx: np.ndarray) -> None:
        input_ids, mask = (t.to(rt.device) for t in pad_batch([train_ids[i] for i in idx], pad))
        with rt.autocast():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[idx])
        loss.backward()
        clip_and_step(optimizer, model.parameters(), ft.optim.max_grad_norm, rt.uses("clip_in_step"))
        optimizer.zero_grad(set_to_none=True)

    for r, name in in_turns(list(configs), rounds + 1):  # round 0 warms every one up, untimed
        steps = [batches[(r * block + i) % len(batches)] for i in range(block)]
        rt = runtime.without(*configs[name])
        with classifier_fast_paths(rt, model, ft.seed + r):
            start = time.perf_counter()
            for idx in steps:
                step(rt, idx)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        if r:
            rates[name].append(sum(len(b) for b in steps) / seconds)
    out = {name: stat(r, "examples/s") for name, r in rates.items()}
    return {
        "rounds": rounds,
        "block_steps": block,
        "configs": out,
        "gain": {name: ratio(out["all on"], r) for name, r in out.items() if name != "all on"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved")
    parser.add_argument("--batch-size", type=int, default=None, help="masked-LM batch (default: params)")
    parser.add_argument("--only", choices=["mlm", "finetune"], default=None)
    parser.add_argument(
        "--compile", action="store_true", help="also time masked-LM with the encoder under torch.compile"
    )
    parser.add_argument("--ablate-rounds", type=int, default=8, help="fast-path ablation rounds")
    parser.add_argument("--results", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    if args.steps // args.window < 6:
        parser.error("--steps must be at least 6 windows: one warm-up and five timed")
    runtime = Runtime.pick(args.device)
    threads = threads_from_env()
    pin_threads(threads)
    section = (
        f"train-{runtime.device.type}"
        + (f"-b{args.batch_size}" if args.batch_size else "")
        + ("-compile" if args.compile else "")
    )
    out: dict[str, Any] = {"threads": threads, "device": runtime.device.type}
    if args.only:  # the other half stays as this machine kind last measured it
        kept = same_machine_section(section, args.results)
        out |= {k: kept[k] for k in ("mlm", "finetune") if k != args.only and k in kept}
    if args.only in (None, "mlm"):
        out["mlm"] = bench_mlm(runtime, args.steps, args.window, args.repeats, args.batch_size, args.compile)
        print(f"mlm: {out['mlm']['speedup_same_precision']:.2f}x the Trainer", flush=True)
    if args.only in (None, "finetune"):
        out["finetune"] = bench_finetune(runtime, args.steps, args.window, args.repeats, args.ablate_rounds)
        print(f"finetune: {out['finetune']['speedup_same_precision']:.2f}x the Trainer", flush=True)
    record(section, out, args.results)
    print(machine())


if __name__ == "__main__":
    main()
