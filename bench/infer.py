"""Inference: onnxruntime against PyTorch eager on the fine-tuned model, side by side.

Engines: PyTorch eager fp32 (its default SDPA attention); onnxruntime fp32 on the plain
export; onnxruntime fp32 on the fused graph (what the export stage ships); onnxruntime int8
(dynamic quantisation of the fused graph, also shipped); and both shipped graphs again with
onnxruntime's default SkipLayerNormalization fusion, which tlpipe's sessions turn off.
Requests are real test tweets at their own lengths: batch 1 (latency per request, p50 and
p95 over the first 300 test rows) and batch 32 (throughput over the whole test split in
arrival order, each batch padded to its longest row). Every engine gets the same threads,
and the engines take turns, repetition by repetition. Accuracy is each engine's on the test split.

    python -m bench.infer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModelForSequenceClassification

from bench.common import REPS, in_turns, pin_threads, ratio, record, stat, threads_from_env
from tlpipe.batching import pad_arrays
from tlpipe.data import label_ids, read_split, texts
from tlpipe.params import load_params
from tlpipe.quantize import quantize_dynamic_int8
from tlpipe.serve import inference_session, session_options
from tlpipe.settings.text_classification.export import export_onnx, fuse
from tlpipe.settings.text_classification.text import SpecialIds, encode, load_tokenizer

MODEL = Path("outputs/finetune/model")
PREPARE = Path("outputs/prepare")
LATENCY_ROWS = 300

Engine = Callable[[np.ndarray, np.ndarray], np.ndarray]


def torch_engine(model: torch.nn.Module) -> Engine:
    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        return out.logits.numpy()

    return run


def ort_engine(path: Path, threads: int, skip_layer_norm: bool = False) -> Engine:
    """onnxruntime as tlpipe serves it, or with `skip_layer_norm` as onnxruntime's defaults
    do: residual adds and layer norms fused back into SkipLayerNormalization."""
    options = session_options(threads)
    if skip_layer_norm:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    else:
        session = inference_session(path, options)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    return run


def batches(ids: Sequence[np.ndarray], size: int, pad: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [pad_arrays(ids[i : i + size], pad) for i in range(0, len(ids), size)]


def latency(engine: Engine, requests: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """One pass over `requests`: p50 and p95 request latency (ms)."""
    times = []
    for ids, mask in requests:
        start = time.perf_counter()
        engine(ids, mask)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def throughput(engine: Engine, work: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
    """One pass over `work`: rows/s, and the logits."""
    start = time.perf_counter()
    logits = [engine(ids, mask) for ids, mask in work]
    return sum(len(ids) for ids, _ in work) / (time.perf_counter() - start), np.concatenate(logits)


def measure(
    engines: dict[str, Engine],
    requests: list[tuple[np.ndarray, np.ndarray]],
    work: list[tuple[np.ndarray, np.ndarray]],
) -> dict[str, tuple[dict, dict, dict, np.ndarray]]:
    """Per engine: p50 and p95 latency and batch throughput, each a stat over REPS passes,
    and its logits. The engines take turns (`in_turns`)."""
    for engine in engines.values():  # warm-up
        for ids, mask in requests[:20]:
            engine(ids, mask)
        engine(*work[0])
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
    logits: dict[str, np.ndarray] = {}
    for _, name in in_turns(list(engines), REPS):
        p50, p95 = latency(engines[name], requests)
        rows_per_s, logits[name] = throughput(engines[name], work)
        samples[name].append((p50, p95, rows_per_s))
    return {
        name: (stat([s[0] for s in runs], "ms"), stat([s[1] for s in runs], "ms"),
               stat([s[2] for s in runs], "rows/s"), logits[name])
        for name, runs in samples.items()
    }  # fmt: skip


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    threads = threads_from_env()
    pin_threads(threads)
    params = load_params()
    labels = params.data.labels
    model = AutoModelForSequenceClassification.from_pretrained(MODEL).eval()
    tok = load_tokenizer(MODEL)
    special = SpecialIds.of(tok)
    test = read_split(PREPARE, "test")
    ids = encode(tok, texts(test), params.finetune.max_length)
    y = label_ids(test, labels)
    requests = batches(ids[:LATENCY_ROWS], 1, special.pad)
    work = batches(ids, 32, special.pad)

    with tempfile.TemporaryDirectory() as tmp:
        plain, fused, int8 = Path(tmp, "plain.onnx"), Path(tmp, "fused.onnx"), Path(tmp, "int8.onnx")
        eager = AutoModelForSequenceClassification.from_pretrained(MODEL, attn_implementation="eager").eval()
        export_onnx(eager, plain, special, tok.get_vocab_size(), params.export.opset)
        fused_ops = fuse(plain, fused, model.config.num_attention_heads, model.config.hidden_size)
        quantize_dynamic_int8(fused, int8)
        engines = {
            "pytorch_fp32": (torch_engine(model), (MODEL / "model.safetensors").stat().st_size),
            "ort_fp32_plain": (ort_engine(plain, threads), plain.stat().st_size),
            "ort_fp32_fused": (ort_engine(fused, threads), fused.stat().st_size),
            "ort_int8": (ort_engine(int8, threads), int8.stat().st_size),
            "ort_fp32_fused_skipln": (ort_engine(fused, threads, skip_layer_norm=True), fused.stat().st_size),
            "ort_int8_skipln": (ort_engine(int8, threads, skip_layer_norm=True), int8.stat().st_size),
        }
        out: dict[str, Any] = {}
        measured = measure({name: engine for name, (engine, _) in engines.items()}, requests, work)
        for name, (p50, p95, rows_per_s, logits) in measured.items():
            out[name] = {
                "batch1_p50_ms": p50,
                "batch1_p95_ms": p95,
                "batch32_rows_per_s": rows_per_s,
                "test_accuracy": float((logits.argmax(1) == y).mean()),
                "bytes": engines[name][1],
            }
            print(f"{name}: p50 {p50['median']:.2f} ms, {rows_per_s['median']:.0f} rows/s", flush=True)

    base = out["pytorch_fp32"]
    speedups = {
        name: {
            "batch1_p50": ratio(base["batch1_p50_ms"], r["batch1_p50_ms"]),
            "batch1_p95": ratio(base["batch1_p95_ms"], r["batch1_p95_ms"]),
            "batch32_throughput": ratio(r["batch32_rows_per_s"], base["batch32_rows_per_s"]),
            "accuracy_change": r["test_accuracy"] - base["test_accuracy"],
            "size_fraction": r["bytes"] / out["ort_fp32_fused"]["bytes"],
        }
        for name, r in out.items()
        if name != "pytorch_fp32"
    }
    mean_len = float(np.mean([len(s) for s in ids]))
    record(
        "inference",
        {
            "threads": threads,
            "model": f"{params.pretrain.init_from} fine-tuned ({model.config.num_hidden_layers}x"
            f"{model.config.hidden_size}, vocab {model.config.vocab_size})",
            "rows": {"latency": len(requests), "throughput": len(ids), "mean_tokens": mean_len},
            "fused_operators": fused_ops,
            "engines": out,
            "vs_pytorch": speedups,
        },
    )


if __name__ == "__main__":
    main()
