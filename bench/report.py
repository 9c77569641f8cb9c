"""docs/benchmarks.md from bench/results.json: every figure with its median, min and max,
the repetitions, the threads and the machine it was measured on.

    python -m bench.report [--results bench/results.json] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = """# Benchmarks

Written by `make bench` (`python -m bench.report` renders this page from
`bench/results.json`). Each figure is the median of its repetitions, with [min – max].
A ratio is always between two figures measured in the same run on the same machine, with
the same thread count. Absolute times are machine-specific: compare ratios across
machines, not times.
"""


def fmt(s: dict[str, Any] | None, digits: int = 0) -> str:
    if s is None:
        return "–"
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f} – {s['max']:,.{digits}f}]"


def machine_line(section: dict[str, Any]) -> str:
    m = section["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    threads = section.get("threads")
    pinned = f"; {threads} threads pinned" if threads else ""
    flags = f", flags {' '.join(m['cpu_flags'])}" if m.get("cpu_flags") else ""
    return (
        f"*Measured {section['measured']} on {m['cpu']}{flags} ({m['cores_available']} cores available, "
        f"{m['memory_gib']} GiB){gpu}{pinned}; torch {m['torch']}, transformers {m['transformers']}, "
        f"onnxruntime {m['onnxruntime']}.*"
    )


SIDE_NAMES = {
    "trainer": "HF Trainer, fp32 (its default)",
    "trainer_bf16": "HF Trainer, bf16=True",
    "tlpipe_fp32": "tlpipe, fp32",
    "tlpipe": "tlpipe, bf16 autocast",
    "tlpipe_unbucketed": "tlpipe, bf16 autocast, batch shapes not rounded",
    "tlpipe_compiled": "tlpipe, bf16 autocast, encoder under torch.compile (dynamic shapes)",
}


def side_label(names: dict[str, str], name: str, r: dict[str, Any]) -> str:
    """A side's name, marked where it is what `precision: auto` chose on that machine."""
    label = names.get(name, name)
    return f"{label} (`precision: auto` here)" if name == r.get("tlpipe_default") else label


FAST_PATH_NAMES = {
    "first_token_only": "the [CLS]-only last layer",
    "host_dropout": "host dropout masks",
    "embedding_row_grads": "the row-sparse embedding gradient",
    "clip_in_step": "clipping inside the optimizer's pass",
    "shape_buckets": "bf16 batch shapes rounded (lengths to 8)",
}


def fast_path_lines(r: dict[str, Any]) -> list[str]:
    """The same-precision ratio and the fast-path ablation (absent from older runs)."""
    lines = []
    if "speedup_same_precision" in r:
        default = side_label(SIDE_NAMES, r["tlpipe_default"], r)
        lines += [f"{default}: {r['speedup_same_precision']:.2f}x the Trainer at the same precision.", ""]
    a = r.get("fast_paths")
    if a:
        lines += [
            f"What each fast path gives: one model trains on, {a['block_steps']} steps per "
            f"configuration in turn, {a['rounds']} rounds (each in the reverse order of the last).",
            "",
            "| configuration | examples/s | all on is |",
            "|---|---:|---:|",
        ]
        for name, rate in a["configs"].items():
            path = name.removesuffix(" off")
            label = f"{FAST_PATH_NAMES[path]} off" if path in FAST_PATH_NAMES else name
            lines.append(f"| {label} | {fmt(rate)} | {a['gain'].get(name, 1.0):.2f}x |")
        lines.append("")
    return lines


def training(key: str, section: dict[str, Any]) -> list[str]:
    where = "GPU" if section["device"] == "cuda" else "CPU"
    lines = [f"## Training on the {where} (`{key}`)", "", machine_line(section), ""]
    for kind, unit, quality, label in (
        ("mlm", "tokens_per_s", "eval_mlm_loss", "held-out MLM loss"),
        ("finetune", "examples_per_s", "test_accuracy", "test accuracy"),
    ):
        r = section.get(kind)
        if not r:
            continue
        title = "Masked-LM pretraining" if kind == "mlm" else "Fine-tuning"
        lines += [
            f"### {title}: {r['model']}, batch {r['batch_size']}, max length {r['max_length']}, "
            f"{r['steps']} steps (windows of {r['window_steps']}, the first dropped)"
            + (f", {r['repeats']} runs per side, interleaved" if "repeats" in r else ""),
            "",
            f"| configuration | {unit.replace('_per_s', '/s')} | {label} | vs the Trainer's default |",
            "|---|---:|---:|---:|",
        ]
        for name, side in r["sides"].items():
            lines.append(
                f"| {side_label(SIDE_NAMES, name, r)} | {fmt(side[unit])} | {side[quality]:.4f} | "
                f"{r['speedup_vs_trainer'][name]:.2f}x |"
            )
        lines += ["", *fast_path_lines(r)]
        if kind == "mlm":
            f = r["flops_per_token"]
            lines += [
                f"Useful training FLOPs per token: {f['total'] / 1e6:.2f} M "
                f"(dense 6N {f['dense'] / 1e6:.2f} M, attention {f['attention'] / 1e6:.2f} M, "
                f"LM head on masked positions {f['head'] / 1e6:.2f} M).",
                "",
                "| configuration | useful FLOP/s | "
                + " | ".join(
                    f"share of {p['name']} ({p['flops']['median'] / 1e9:,.0f} GFLOP/s)"
                    for p in r["peaks"].values()
                )
                + " |",
                "|---|---:|" + "---:|" * len(r["peaks"]),
            ]
            for name, h in r["hardware"].items():
                shares = " | ".join(f"{h[f'fraction_of_{k}_peak']:.1%}" for k in r["peaks"])
                lines.append(
                    f"| {side_label(SIDE_NAMES, name, r)} | {h['useful_flops'] / 1e9:,.1f} G | {shares} |"
                )
            lines.append("")
    return lines


ENGINES = {
    "pytorch_fp32": "PyTorch eager, fp32",
    "ort_fp32_plain": "onnxruntime fp32, plain export",
    "ort_fp32_fused": "onnxruntime fp32, fused graph (shipped)",
    "ort_int8": "onnxruntime int8, dynamic quantisation (shipped)",
    "ort_fp32_fused_skipln": "onnxruntime fp32, fused graph, SkipLayerNormalization fused back",
    "ort_int8_skipln": "onnxruntime int8, SkipLayerNormalization fused back",
}


def inference(section: dict[str, Any]) -> list[str]:
    rows = section["rows"]
    lines = [
        "## Inference",
        "",
        machine_line(section),
        "",
        f"{section['model']}. Batch 1: the first {rows['latency']} test tweets one at a time; batch 32: "
        f"all {rows['throughput']} test tweets in arrival order (mean {rows['mean_tokens']:.1f} tokens). "
        f"Fused operators: {', '.join(f'{k} {v}' for k, v in section['fused_operators'].items())}.",
        "",
        "| engine | batch 1 p50 ms | batch 1 p95 ms | batch 32 rows/s | test accuracy | size MB |"
        " p50 speed-up | batch 32 speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in section["engines"].items():
        vs = section["vs_pytorch"].get(name, {"batch1_p50": 1.0, "batch32_throughput": 1.0})
        lines.append(
            f"| {ENGINES.get(name, name)} | {fmt(e['batch1_p50_ms'], 2)} | {fmt(e['batch1_p95_ms'], 2)} | "
            f"{fmt(e['batch32_rows_per_s'])} | {e['test_accuracy']:.4f} | {e['bytes'] / 1e6:.1f} | "
            f"{vs['batch1_p50']:.2f}x | {vs['batch32_throughput']:.2f}x |"
        )
    int8 = section["vs_pytorch"].get("ort_int8")
    if int8:
        lines += [
            "",
            f"int8: {int8['batch32_throughput']:.2f}x PyTorch fp32's batch-32 throughput, accuracy "
            f"{int8['accuracy_change'] * 100:+.2f} points, "
            f"{int8['size_fraction']:.0%} of the fp32 ONNX file.",
        ]
    skipln = section["vs_pytorch"].get("ort_int8_skipln")
    if int8 and skipln:
        lines += [
            "",
            "Keeping residual adds apart from their layer norms (onnxruntime's default fuses them into "
            "SkipLayerNormalization): int8 batch 32 "
            f"{int8['batch32_throughput'] / skipln['batch32_throughput']:.2f}x, "
            f"batch 1 p50 {int8['batch1_p50'] / skipln['batch1_p50']:.2f}x.",
        ]
    return [*lines, ""]


IMAGE_SIDES = {
    "plain": "plain PyTorch loop (torchvision reference style), fp32",
    "plain_bf16": "plain PyTorch loop, bf16 autocast",
    "tlpipe_fp32": "tlpipe, fp32",
    "tlpipe": "tlpipe, bf16 autocast",
}

IMAGE_ENGINES = {
    "pytorch_fp32": "PyTorch eager, fp32",
    "ort_fp32": "onnxruntime fp32",
    "ort_int8_static (shipped)": "onnxruntime int8, static QDQ (shipped)",
    "ort_int8_dynamic": "onnxruntime int8, dynamic quantisation",
}


def image(section: dict[str, Any]) -> list[str]:
    """`python -m bench.image`: training against a plain loop, and inference engines."""
    t = section["training"]
    lines = [
        "## Image classification (`image-cpu`)",
        "",
        machine_line(section),
        "",
        f"### Training: {t['model']}, batch {t['batch_size']}, {t['train_rows']} MNIST digits, "
        f"{t['steps']} steps (windows of {t['window_steps']}, the first dropped), {t['repeats']} runs per "
        f"side, interleaved; the plain loop's DataLoader with {t['plain_loader_workers']} workers",
        "",
        "| configuration | images/s | held-out accuracy | vs the plain loop in fp32 | useful FLOP/s "
        "| share of the conv rate | share of the matmul peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, side in t["sides"].items():
        h = t["hardware"][name]
        lines.append(
            f"| {side_label(IMAGE_SIDES, name, t)} | {fmt(side['images_per_s'])} "
            f"| {side['held_out_accuracy']:.4f} | {t['speedup_vs_plain'][name]:.2f}x "
            f"| {h['useful_flops'] / 1e9:,.1f} G "
            f"| {h['fraction_of_conv_rate']:.1%} | {h['fraction_of_matmul_peak']:.1%} |"
        )
    rates = "; ".join(
        f"{k}: {c['flops']['median'] / 1e9:,.0f} GFLOP/s on its costliest convolution ({c['conv']}), "
        f"{t['matmul_peak'][k]['flops']['median'] / 1e9:,.0f} GFLOP/s on a {t['matmul_peak'][k]['name']}"
        for k, c in t["conv_rate"].items()
    )
    lines += [
        "",
        f"tlpipe's default is {t['speedup_same_precision']:.2f}x the plain loop at the same precision. "
        f"Training FLOPs per image: {t['training_flops_per_image'] / 1e6:,.0f} M (3x the forward pass's "
        f"convolutions and linear layers). Measured rates, {rates}.",
        "",
    ]
    for key, r in section["inference"].items():
        batch = next(k for k in next(iter(r["engines"].values())) if k.endswith("_images_per_s"))
        n = batch.removeprefix("batch").removesuffix("_images_per_s")
        lines += [
            f"### Inference: {r['model']} ({key}), {r['rows']} held-out digits, {r['rounds']} rounds per "
            "engine, interleaved",
            "",
            f"| engine | batch 1 p50 ms | batch 1 p95 ms | batch {n} images/s | quality | ONNX MB "
            f"| batch 1 speed-up | batch {n} speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, e in sorted(r["engines"].items(), key=lambda kv: list(IMAGE_ENGINES).index(kv[0])):
            quality = (
                f"accuracy {e['accuracy']:.4f}"
                if "accuracy" in e
                else f"agreement {e['argmax_agreement_with_pytorch_fp32']:.4f}"
            )
            size = f"{e['onnx_bytes'] / 1e6:.2f}" if e["onnx_bytes"] else "–"
            vs = r["speedup_vs_pytorch"][name]
            lines.append(
                f"| {IMAGE_ENGINES.get(name, name)} | {fmt(e['batch1_p50_ms'], 2)} "
                f"| {fmt(e['batch1_p95_ms'], 2)} | {fmt(e[batch])} | {quality} | {size} "
                f"| {vs['batch1']:.2f}x | {vs[f'batch{n}']:.2f}x |"
            )
        lines.append("")
    return lines


def predict(section: dict[str, Any]) -> list[str]:
    lines = [
        "## `tlpipe predict`",
        "",
        machine_line(section),
        "",
        f"{section['rows']:,} rows of CSV in, JSON lines out; each run a fresh process (start-up included).",
        "",
        f"| precision | rows/s | peak RSS MiB at {section['rows']:,} rows "
        f"| at {section['small_rows']:,} rows | growth |",
        "|---|---:|---:|---:|---:|",
    ]
    for precision in ("fp32", "int8"):
        r = section.get(precision)
        if r:
            lines.append(
                f"| {precision} | {fmt(r['rows_per_s'])} | {fmt(r['peak_rss'])} | "
                f"{fmt(r['peak_rss_small'])} | {r['memory_growth']:.2f}x |"
            )
    return [*lines, ""]


def validate(section: dict[str, Any]) -> list[str]:
    lines = [
        "## Data validation",
        "",
        machine_line(section),
        "",
        "The prepare stage (read, de-duplicate, split) then the validate stage (Great Expectations on "
        "every split), each repetition a fresh process.",
        "",
        "| raw file | MiB | rows validated | validate rows/s | prepare rows/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("quarter", "full"):
        r = section[key]
        lines.append(
            f"| {r['file_rows']:,} rows | {r['file_mib']:.0f} | {r['validated_rows']:,} | "
            f"{fmt(r['validate_rows_per_s'])} | {fmt(r['prepare_rows_per_s'])} | {fmt(r['peak_rss'])} |"
        )
    lines += ["", f"Peak memory grows {section['memory_growth']:.2f}x for a 4x larger file.", ""]
    return lines


def pipeline(section: dict[str, Any]) -> list[str]:
    lines = [
        "## Pipeline",
        "",
        machine_line(section),
        "",
        f"No-op `tlpipe run` (nothing stale, so no flow starts; process start included): "
        f"{fmt(section['noop_run_seconds'], 1)} s. The flow started anyway (`tlpipe run --always`: "
        f"Prefect's ephemeral API server, then every stage checked with DVC and skipped): "
        f"{fmt(section['noop_flow_command_seconds'], 1)} s for the command, "
        f"{fmt(section['noop_flow_seconds'], 1)} s from the flow's call to its return.",
        "",
    ]
    full = section.get("full_run")
    if full:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in full["stage_seconds"].items())
        lines += [
            f"Full run {full['run_id']}: {full['wall_seconds']:.0f} s wall, "
            f"{full['computed_seconds']:.0f} s in the stages ({stages}); "
            f"orchestration overhead {full['overhead_seconds']:.0f} s "
            f"({full['overhead_fraction']:.1%}). The curve counts by its span on the worker pool.",
            "",
        ]
    return lines


def runners(section: dict[str, Any]) -> list[str]:
    """`python -m bench.runners`: evaluate's curve on the process pool and on Dask."""
    r, vs = section["runners"], section["dask_vs_process"]
    lines = [
        "## The curve on each task runner (`runners`)",
        "",
        machine_line(section),
        "",
        f"evaluate's curve of {section['curve_runs']} runs ({'; '.join(section['overrides'])}) on "
        f"{section['workers']} one-thread workers, the runners taking turns; every turn's run "
        "records identical. The curve counts by its span (first run's start to last run's end); "
        "the command includes starting the Dask cluster.",
        "",
        "| runner | curve s | command s |",
        "|---|---:|---:|",
    ]
    for name, label in (("process", "process pool (the default)"), ("dask", "local Dask cluster")):
        side = r[name]
        lines.append(f"| {label} | {fmt(side['curve_seconds'], 1)} | {fmt(side['command_seconds'], 1)} |")
    lines += [
        "",
        f"Dask against the process pool: {vs['curve_seconds']:.2f}x the curve's time, "
        f"{vs['command_seconds']:.2f}x the command's.",
        "",
    ]
    return lines


GENERATION_SIDES = {
    "plain": "plain PyTorch loop, fp32",
    "plain_bf16": "plain PyTorch loop, bf16 autocast",
    "trainer": "HF Trainer, fp32 (its default)",
    "trainer_bf16": "HF Trainer, `bf16=True`",
    "tlpipe_fp32": "tlpipe, fp32",
    "tlpipe": "tlpipe, bf16 autocast",
}
GENERATION_ENGINES = {
    "onnxruntime": "onnxruntime, state carried (`tlpipe generate`)",
    "onnxruntime_no_cache": "onnxruntime, the whole text re-read every token",
    "pytorch": "PyTorch (`generate` with its KV cache; the LSTM stepping with its state)",
}


def loss_cell(loss: float | dict[str, Any]) -> str:
    """A held-out loss: one value (a first repeat), or mean ± std over seeded repeats."""
    if isinstance(loss, dict):
        return f"{loss['mean']:.3f} ± {loss['std']:.3f} (n={len(loss['values'])})"
    return f"{loss:.4f}"


def generation(section: dict[str, Any]) -> list[str]:
    """`python -m bench.generation`: training against the Trainer / a plain loop, and
    incremental generation against PyTorch."""
    lines = ["## Text generation (`generation-cpu`)", "", machine_line(section), ""]
    for arch in ("lstm", "gpt"):
        t, g = section[f"{arch}_training"], section[f"{arch}_generation"]
        m = t["model"]
        lines += [
            f"### {arch.upper()}: {m['parameters'] / 1e6:.2f}M parameters, {m['layers']} layers of "
            f"{m['hidden']}, blocks of {m['block']} tokens, batch {m['batch']}, {m['steps']} steps per run",
            "",
            "| configuration | tokens/s | held-out loss | speed-up |",
            "|---|---:|---:|---:|",
        ]
        for name, side in t["sides"].items():
            lines.append(
                f"| {side_label(GENERATION_SIDES, name, t)} | {fmt(side['tokens/s'])} "
                f"| {loss_cell(side['held_out_loss'])} | {t['speedup'][name]:.2f}x |"
            )
        lines += [
            "",
            f"Greedy generation at batch 1, {g['new_tokens']} new tokens after each of "
            f"{g['prompts']} prompts (the same tokens on every engine: {g['same_greedy_tokens']}):",
            "",
            "| engine | tokens/s | vs PyTorch |",
            "|---|---:|---:|",
        ]
        for name, e in g["engines"].items():
            vs = e["median"] / g["engines"]["pytorch"]["median"]
            lines.append(f"| {GENERATION_ENGINES.get(name, name)} | {fmt(e)} | {vs:.2f}x |")
        lines.append("")
    return lines


def levers(section: dict[str, Any]) -> list[str]:
    """`python -m bench.levers`: step-time probes of levers not in the loop."""
    r, q = section["steps"], section["fused_qkv"]
    lines = [
        "## Training levers not in the loop (`levers-cpu`)",
        "",
        machine_line(section),
        "",
        f"### Masked-LM steps: {r['model']}, batch {r['batch_size']}, {r['steps_per_turn']} steps a turn, "
        f"{r['rounds']} rounds after a warm-up round, the configurations taking turns; no quality figure",
        "",
        f"| configuration | tokens/s | vs {r['vs']} |",
        "|---|---:|---:|",
    ]
    for name, rate in r["configs"].items():
        lines.append(f"| {name} | {fmt(rate)} | {r['ratio'][name]:.2f}x |")
    lines += [
        "",
        f"Fused QKV: the projections' forward and backward over {q['tokens']} rows of {q['hidden']} "
        f"({'bf16 autocast' if q['bf16'] else 'fp32'}): three products {q['three']['median'] * 1e3:.2f} ms, "
        f"one {q['fused']['median'] * 1e3:.2f} ms ({q['speedup']:.2f}x).",
        "",
    ]
    return lines


def gpt_levers(section: dict[str, Any]) -> list[str]:
    """`python -m bench.gpt_levers`: a GPT step's profile and levers not in the loop."""
    prof, peak = section["profile"], section["profile"]["peak_flop_per_s"]["median"]
    lines = [
        "## A GPT training step: where the time goes, levers not in the loop (`gpt-levers-cpu`)",
        "",
        machine_line(section),
        "",
        f"### {section['model']}, blocks of {section['block']} tokens, batch {section['batch_size']}, "
        f"{section['steps_per_turn']} steps a turn, {section['rounds']} rounds after a warm-up round, "
        "the configurations taking turns; no quality figure (the warm-up round includes "
        "compiling, less where inductor's cache already held the kernels)",
        "",
        f"| configuration | tokens/s | vs {section['vs']} | warm-up round (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in section["configs"].items():
        ratio, warmup = section["ratio"][name], section["warmup_seconds"][name]
        lines.append(f"| {name} | {fmt(rate)} | {ratio:.2f}x | {warmup:.1f} |")
    biggest = sorted(prof["others"].items(), key=lambda kv: -kv[1])
    others = ", ".join(f"{k.removeprefix('aten::')} {v:.0%}" for k, v in biggest)
    lines += [
        "",
        f"Profile of {section['vs']} over {prof['steps']} steps: matrix products take "
        f"{prof['matmul_share']:.0%} of the step, {prof['matmul_flop_per_step'] / 1e9:.1f} GFLOP a step at "
        f"{prof['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s, {prof['matmul_flop_per_s'] / peak:.0%} of the "
        f"{prof['peak_dtype']} 2048³ rate measured in the same run ({peak / 1e9:.0f} GFLOP/s). With "
        f"nothing else left the step would run {prof['ceiling_ratio']:.2f}x faster: the bound on any "
        f"fusion. The largest of the rest: {others}.",
        "",
    ]
    gelu = section.get("gelu")
    if gelu:
        ms = gelu["ms"]
        shape = " x ".join(str(d) for d in gelu["shape"])
        lines += [
            f"GPT-2's GELU alone, forward and backward over a bf16 ({shape}) activation: "
            + "; ".join(f"{name} {v['median']:.2f} ms" for name, v in ms.items())
            + ".",
            "",
        ]
    memory = section.get("loss_memory")
    if memory:
        mib = memory["mib_above_inputs"]
        lines += [
            f"Memory of one bf16 loss and backward at a {memory['vocab']:,}-token vocabulary, "
            f"{memory['rows']:,} rows of width {memory['width']} (peak resident, each side in a fresh "
            f"process, above one that only builds the inputs): "
            + "; ".join(f"{side} {v:,.0f} MiB" for side, v in mib.items())
            + ".",
            "",
        ]
    return lines


def serving(section: dict[str, Any]) -> list[str]:
    """`python -m bench.serving`: tlpipe serve against a plain FastAPI + PyTorch server."""
    lines = [
        "## Serving over HTTP",
        "",
        machine_line(section),
        "",
        f"`tlpipe serve` (onnxruntime, the shipped fp32 graph) against a plain FastAPI + PyTorch eager "
        f"server on the same fine-tuned model, {section['server_threads']} thread(s) each, one uvicorn "
        f"worker; one test tweet per `POST /predict`, {section['requests_per_level']} requests per level "
        f"from clients sending without pause, {section['rounds']} rounds with the sides taking turns. "
        f"The two servers' labels agree on {section['label_agreement']:.1%} of "
        f"{section['agreement_rows']} test tweets.",
        "",
        "| clients | server | requests/s | p50 ms | p99 ms | errors |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    levels = sorted(section["levels"].items(), key=lambda item: int(item[0]))
    for concurrency, level in levels:
        for side, label in (("tlpipe", "tlpipe serve"), ("fastapi_pytorch", "FastAPI + PyTorch")):
            r = level[side]
            lines.append(
                f"| {concurrency} | {label} | {fmt(r['requests_per_s'])} | {fmt(r['p50_ms'], 1)} | "
                f"{fmt(r['p99_ms'], 1)} | {r['errors']} |"
            )
    lines += ["", "| clients | throughput ratio | p50 ratio |", "|---:|---:|---:|"]
    for concurrency, level in levels:
        lines.append(f"| {concurrency} | {level['throughput_ratio']:.2f}x | {level['p50_ratio']:.2f}x |")
    return [*lines, ""]


SECTIONS = {
    "inference": inference,
    "image-cpu": image,
    "generation-cpu": generation,
    "levers-cpu": levers,
    "gpt-levers-cpu": gpt_levers,
    "predict": predict,
    "serving": serving,
    "validate": validate,
    "pipeline": pipeline,
    "runners": runners,
}


def section_lines(key: str, section: dict[str, Any]) -> list[str]:
    return training(key, section) if key.startswith("train-") else SECTIONS[key](section)


def render(results: dict[str, Any]) -> str:
    lines = [HEADER]
    train = [k for k in results if k.startswith("train-")]
    # CPU first, then the GPU sections by batch size.
    for key in sorted(train, key=lambda k: (k.startswith("train-cuda"), len(k), k)):
        lines += training(key, results[key])
    for key in SECTIONS:
        if key in results:
            lines += section_lines(key, results[key])
    earlier = results.get("earlier", {})
    if earlier:
        lines += [
            "## Earlier machines",
            "",
            "Sections last measured on another kind of machine, kept as they were; a newer run "
            "of the same benchmark on that kind replaces them above.",
            "",
        ]
    for name, section in sorted(earlier.items()):
        key, _, kind = name.partition(" on ")
        for i, line in enumerate(section_lines(key, section)):
            if line.startswith("#"):
                line = "#" + line + (f" — on {kind}" if i == 0 else "")
            lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=Path("bench/results.json"))
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="results.json files to merge in first"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for extra in args.merge:
        results |= json.loads(extra.read_text())
    if args.merge:
        args.results.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results))
    print(f"bench.report: wrote {args.out}")


if __name__ == "__main__":
    main()
