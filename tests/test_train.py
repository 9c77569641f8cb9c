"""The training runtime: device and precision choice, bf16 autocast with fp32 weights, and
the throughput marks the loops log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import tiny_params, train_tiny
from tlpipe import train
from tlpipe.batching import round_up
from tlpipe.fastpath import ATTENTION
from tlpipe.params import EncoderConfig, OptimParams, parse_params
from tlpipe.precision import bf16_pays
from tlpipe.settings.text_classification.classifier import predict_logits
from tlpipe.settings.text_classification.mlm import mlm_loss, pad_batch, train_mlm
from tlpipe.settings.text_classification.model import bert_config, mlm_head, new_mlm
from tlpipe.settings.text_classification.text import SpecialIds
from tlpipe.train import Runtime, bf16_native

LABELS = ("negative", "neutral", "positive")
CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not bf16_native(CPU), reason="this CPU has no native bf16")


def test_pick_follows_params(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Runtime.pick("cpu", "fp32") == Runtime(CPU, bf16=False)
    assert Runtime.pick("cpu", "auto").bf16 is (bf16_native(CPU) and bf16_pays())
    monkeypatch.setattr(train, "bf16_native", lambda device: False)
    assert Runtime.pick("cpu", "auto").bf16 is False
    with pytest.raises(RuntimeError, match="precision: bf16 was asked for"):
        Runtime.pick("cpu", "bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_named() -> None:
    assert Runtime.pick("auto", "fp32").device == CPU
    with pytest.raises(RuntimeError, match="device: cuda was asked for"):
        Runtime.pick("cuda")


def _mlm(seed: int = 0) -> tuple[torch.nn.Module, list[np.ndarray], SpecialIds]:
    special = SpecialIds(pad=0, cls=2, sep=3, mask=4, unk=1)
    torch.manual_seed(seed)
    encoder = EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = new_mlm(bert_config(encoder, 200, special.pad, 64))
    rng = np.random.default_rng(seed)
    ids = [np.array([2, *rng.integers(5, 200, rng.integers(4, 30)), 3]) for _ in range(200)]
    return model, ids, special


@needs_bf16
def test_bf16_autocast_trains_fp32_weights() -> None:
    model, ids, special = _mlm()
    optim = OptimParams(lr=3e-3, batch_size=16, warmup_ratio=0.0)
    run = train_mlm(model, ids, special, steps=40, optim=optim, mask_prob=0.15, seed=0, log_every=10,
                    runtime=Runtime(CPU, bf16=True))  # fmt: skip
    assert all(q.dtype == torch.float32 for q in model.parameters())
    losses = [h["loss"] for h in run.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@needs_bf16
def test_shape_buckets_leave_the_mlm_loss_and_gradients_as_they_were() -> None:
    """Rounding the length to 8 and the masked rows to 32 changes shapes, not the loss: the
    same corruption is drawn, padding keys get no attention and padding rows no loss."""
    model, ids, special = _mlm()
    encoder, head = mlm_head(model)
    input_ids, mask = pad_batch(ids[:16], special.pad)
    assert input_ids.shape[1] % 8  # the length has rounding to do
    model.eval()  # no dropout: the two passes see the same network
    found = []
    for rt in (Runtime(CPU, bf16=True), Runtime(CPU, bf16=True).without("shape_buckets")):
        model.zero_grad()
        gen = torch.Generator().manual_seed(0)
        with rt.autocast():
            loss, n = mlm_loss(encoder, head, input_ids, mask, special, 200, 0.15, gen, rt)
        loss.backward()
        found.append((loss.detach(), n, [q.grad.clone() for q in model.parameters() if q.grad is not None]))
    (bucketed, n_b, grads_b), (plain, n_p, grads_p) = found
    assert n_b == n_p
    torch.testing.assert_close(bucketed, plain, atol=1e-3, rtol=1e-3)
    for a, b in zip(grads_b, grads_p, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_rounding_up_stays_within_the_limit() -> None:
    assert [round_up(13, 8), round_up(16, 8), round_up(13, 8, 14), round_up(13, 8, 10)] == [16, 16, 14, 13]


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and left alone
def test_clip_and_step_is_clip_grad_norm_then_step(max_norm: float) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 7)]
    grads = [torch.randn(q.shape) * 3 for q in params]
    twins = [torch.nn.Parameter(q.detach().clone()) for q in params]
    optimizers = []
    for group, fused in ((params, False), (twins, True)):
        optimizers.append(optimizer := torch.optim.AdamW(group, lr=0.1, fused=fused))
        for _ in range(2):
            for q, g in zip(group, grads, strict=True):
                q.grad = g.clone()
            if fused:
                train.clip_and_step(optimizer, group, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(group, max_norm)
                optimizer.step()
    for q, twin in zip(params, twins, strict=True):  # Adam's step barely sees a scale: check m too
        torch.testing.assert_close(twin, q, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(twin.grad, q.grad)
        moments = [o.state[t]["exp_avg"] for o, t in zip(optimizers, (q, twin), strict=True)]
        torch.testing.assert_close(moments[1], moments[0])


def test_cpu_runs_plain_matrix_attention() -> None:
    model = _mlm()[0]
    Runtime(CPU, bf16=False).place(model)
    assert model.config._attn_implementation == ATTENTION


def test_mlm_history_marks_tokens_and_seconds() -> None:
    model, ids, special = _mlm()
    optim = OptimParams(lr=1e-3, batch_size=16)
    run = train_mlm(model, ids, special, steps=30, optim=optim, mask_prob=0.15, seed=0, log_every=10)
    assert [h["step"] for h in run.history] == [10, 20, 30]
    tokens = [h["tokens"] for h in run.history]
    seconds = [h["seconds"] for h in run.history]
    assert tokens == sorted(tokens) and tokens[-1] == run.tokens
    assert seconds == sorted(seconds) and seconds[-1] <= run.seconds
    # Every token of every sequence, padding excluded: 30 steps of 16 over 200 sequences.
    per_epoch = sum(len(s) for s in ids)
    assert per_epoch * 2 <= run.tokens <= per_epoch * 3


def test_classifier_history_counts_examples(pretrained: Path, prepared: Path) -> None:
    overrides = {"patience": 100, "evaluations": 3}
    _, run, _, _ = train_tiny(pretrained, prepared, Runtime.pick("cpu"), **overrides)
    p = parse_params(tiny_params(**{f"finetune.{k}": v for k, v in overrides.items()})).finetune
    train_rows = len(pd.read_parquet(prepared / "train.parquet"))
    assert len(run.history) == 3
    assert run.history[-1]["examples"] == run.examples == train_rows * p.epochs
    seconds = [h["seconds"] for h in run.history]
    assert seconds == sorted(seconds) and seconds[-1] < run.seconds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_objective_trains_on_the_gpu(pretrained: Path, prepared: Path) -> None:
    """L2-SP anchors, the joint source loss and task-adaptive pretraining, all on the GPU
    under bf16 autocast; validation and the returned weights stay usable on the GPU."""
    overrides = {"l2sp": 0.01, "joint_alpha": 0.3, "tapt_steps": 4, "layer_decay": 0.8, "patience": 100}
    setup, run, val, pad = train_tiny(pretrained, prepared, Runtime.pick("cuda"), **overrides)
    assert all(q.device.type == "cuda" and q.dtype == torch.float32 for q in setup.model.parameters())
    assert all(np.isfinite(h["train_loss"]) for h in run.history)
    logits = predict_logits(setup.model, val[0], pad, 32)
    assert logits.shape == (len(val[0]), 3) and np.isfinite(logits).all()
