"""docs/benchmarks.md is exactly what bench/report.py renders from bench/results.json; the
benchmarks take turns in alternating order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import render
from tests.conftest import REPO


def test_benchmarks_page_matches_results() -> None:
    results = json.loads((REPO / "bench/results.json").read_text())
    assert (REPO / "docs/benchmarks.md").read_text() == render(results)


def test_in_turns_reverses_the_order_each_round() -> None:
    from bench.common import in_turns

    assert list(in_turns(["a", "b", "c"], 3)) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c"),
    ]  # fmt: skip


def test_a_section_from_another_machine_is_kept_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun on another kind of machine keeps the old figures under "earlier"; a rerun on
    the same kind replaces them, and a kind coming back replaces its own earlier figures."""
    from bench import common

    path = tmp_path / "results.json"
    here = common.machine()
    old = here | {"cpu": "Older CPU", "cpu_flags": ["avx2"]}
    monkeypatch.setattr(common, "machine", lambda: old)
    common.record("predict", {"fig": 1}, path)
    monkeypatch.setattr(common, "machine", lambda: here)
    common.record("predict", {"fig": 2}, path)
    common.record("predict", {"fig": 3}, path)
    data = json.loads(path.read_text())
    assert data["predict"]["fig"] == 3
    assert list(data["earlier"]) == ["predict on Older CPU (avx2)"]
    assert data["earlier"]["predict on Older CPU (avx2)"]["fig"] == 1
    # Back on the older kind: its figures come back to the top, this kind's go down, and
    # nothing is kept twice.
    monkeypatch.setattr(common, "machine", lambda: old)
    common.record("predict", {"fig": 4}, path)
    data = json.loads(path.read_text())
    assert data["predict"]["fig"] == 4
    assert list(data["earlier"]) == [f"predict on {common.machine_kind(here)}"]
    assert data["earlier"][f"predict on {common.machine_kind(here)}"]["fig"] == 3


def test_a_child_s_peak_memory_is_its_own_not_its_parent_s() -> None:
    """A process's memory high-water mark survives fork and exec: a child started straight
    from a benchmark holding a model would report the benchmark's size as its own."""
    import sys

    import numpy as np

    from bench.common import run_measured

    held = np.ones(800 * 2**20 // 8)  # 800 MiB resident in this process
    script = "import numpy as np; x = np.ones(200 * 2**20 // 8); print(x.sum())"
    _, peak_mib, out = run_measured([sys.executable, "-c", script])
    assert float(out) == 200 * 2**20 // 8
    assert 200 < peak_mib < 400  # its 200 MiB and the interpreter, not this process's 800
    del held


@pytest.mark.slow
def test_the_image_benchmark_times_every_side_and_engine(tmp_path: Path) -> None:
    """bench.image end to end on a few steps: both loops at both precisions, the FLOP
    accounting against measured rates, and every inference engine on held-out digits."""
    from bench.image import EXAMPLE, bench_inference, bench_training, digits

    data = digits(REPO / EXAMPLE, tmp_path)
    assert len(data["train_pixels"]) == 4500 and data["held_pixels"].shape == (500, 1, 32, 32)
    assert len(set(data["held_y"])) == 10  # shuffled: every digit is held out
    training, model = bench_training(steps=6, window=2, repeats=1, workers=0, data=data)
    assert {"plain", "tlpipe_fp32"} <= training["sides"].keys()
    for name, side in training["sides"].items():
        assert side["images_per_s"]["median"] > 0 and side["images_per_s"]["reps"] == 2, name
        # The accounting, not the machine: a rate measured on the CI machine bounds nothing.
        hw = training["hardware"][name]
        conv = training["conv_rate"]["bf16" if name in ("tlpipe", "plain_bf16") else "fp32"]
        assert hw["useful_flops"] == pytest.approx(
            training["training_flops_per_image"] * side["images_per_s"]["median"]
        ), name
        share = hw["useful_flops"] / conv["flops"]["median"]
        assert hw["fraction_of_conv_rate"] == pytest.approx(share) and share > 0, name
    assert training["speedup_vs_plain"]["plain"] == 1.0
    assert training["training_flops_per_image"] > 1e6

    inference = bench_inference("cnn", model, data["prep"], data, threads=1, rounds=1)
    engines = inference["engines"]
    assert set(engines) == {"pytorch_fp32", "ort_fp32", "ort_int8_static (shipped)", "ort_int8_dynamic"}
    assert engines["ort_fp32"]["accuracy"] == engines["pytorch_fp32"]["accuracy"]
    for name, engine in engines.items():
        assert engine["batch1_p50_ms"]["median"] > 0 and engine["batch64_images_per_s"]["median"] > 0, name
    assert engines["ort_int8_static (shipped)"]["onnx_bytes"] < engines["ort_fp32"]["onnx_bytes"] / 2


@pytest.mark.slow
def test_the_generation_benchmark_times_every_side_and_engine(sample_csv: Path) -> None:
    """bench.generation on a few steps of the sample's tweets: every loop at every precision
    for both architectures, each repeat seeded apart and scored, and every generation engine
    producing the same greedy tokens."""
    import pandas as pd

    from bench.generation import generation, training
    from tlpipe.params import TokenizerParams
    from tlpipe.settings.text_generation.tokenizer import eos_id, token_stream, train_bpe

    texts = pd.read_csv(sample_csv, dtype=str)["text"].tolist()
    tok = train_bpe(texts, TokenizerParams(vocab_size=500, lowercase=False))
    corpus = {
        "train": token_stream(tok, texts[100:]),
        "held_out": token_stream(tok, texts[:100]),
        "vocab": tok.get_vocab_size(),
        "eos": eos_id(tok),
    }
    for arch, baseline in (("lstm", "plain"), ("gpt", "trainer")):
        model, result = training(arch, corpus, steps=6, window=2, repeats=2, gpt_layers=1)
        assert result["baseline"] == baseline and result["speedup"][baseline] == 1.0
        assert {baseline, "tlpipe_fp32"} <= result["sides"].keys()
        for name, side in result["sides"].items():
            loss = side["held_out_loss"]
            assert side["tokens/s"]["median"] > 0 and len(loss["values"]) == 2, name
            # Another seed draws other blocks: the repeats are two samples, not one twice.
            assert loss["values"][0] != loss["values"][1] and loss["std"] > 0, name
        found = generation(model, tok, ["@united my", "thanks"], new_tokens=4, threads=1)
        assert found["same_greedy_tokens"] and set(found["engines"]) == {
            "onnxruntime",
            "onnxruntime_no_cache",
            "pytorch",
        }


@pytest.mark.slow
def test_the_gpt_levers_benchmark_times_and_profiles_every_configuration(sample_csv: Path) -> None:
    """bench.gpt_levers on a few steps: every configuration timed in every round (compiling
    in the warm-up), and the profile's matrix products a share of the step with FLOPs."""
    import pandas as pd
    import torch

    from bench.gpt_levers import TLPIPE, bench
    from tlpipe.params import TokenizerParams
    from tlpipe.settings.text_generation.tokenizer import eos_id, token_stream, train_bpe
    from tlpipe.train import bf16_native

    texts = pd.read_csv(sample_csv, dtype=str)["text"].tolist()
    tok = train_bpe(texts, TokenizerParams(vocab_size=300, lowercase=False))
    corpus = {"train": token_stream(tok, texts), "vocab": tok.get_vocab_size(), "eos": eos_id(tok)}
    found = bench(corpus, steps=2, rounds=2, gpt_layers=1)
    assert found["vs"] == (TLPIPE if bf16_native(torch.device("cpu")) else "fp32")
    assert found["ratio"][found["vs"]] == 1.0 and set(found["warmup_seconds"]) == set(found["configs"])
    for name, rate in found["configs"].items():
        assert rate["median"] > 0 and rate["reps"] == 2, name
    prof = found["profile"]
    assert 0 < prof["matmul_share"] < 1 and prof["matmul_flop_per_step"] > 0
    assert prof["ceiling_ratio"] == pytest.approx(1 / prof["matmul_share"])


@pytest.mark.slow
def test_the_levers_benchmark_times_every_configuration(prepared: Path) -> None:
    """bench.levers on a few steps: every configuration timed in every round, bf16 weights
    stepping its fp32 masters, the fused projection against three."""
    from bench.levers import bench_fused_qkv, bench_steps

    found = bench_steps(steps=2, rounds=2, batch_size=8, prepare=prepared)
    assert "fp32" in found["configs"] and found["ratio"][found["vs"]] == 1.0
    for name, rate in found["configs"].items():
        assert rate["median"] > 0 and rate["reps"] == 2, name
    qkv = bench_fused_qkv(tokens=64, hidden=32)
    assert qkv["three"]["median"] > 0 and qkv["fused"]["median"] > 0
