"""The training fast paths compute what the plain loop computes: the [CLS]-only last layer
gives the same logits and gradients, host dropout the same distribution, the row-sparse
embedding gradient the same gradient, the one-kernel tanh GELU the same function; and
training leaves the model as it was."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from tests.conftest import train_tiny
from tlpipe import train
from tlpipe.fastpath import ATTENTION, HostDropout, embedding_row_grads, host_dropout, tanh_gelu
from tlpipe.settings.text_classification import fastpath as text_fastpath
from tlpipe.settings.text_classification.fastpath import first_token_only
from tlpipe.train import FAST_PATHS, Runtime

CPU = torch.device("cpu")


def _classifier(dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 120, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("attention", ["eager", "sdpa", ATTENTION])
def test_first_token_only_gives_the_same_logits(attention: str) -> None:
    model = _classifier().eval()
    ids, mask = _batch()
    full = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(attention)
    with first_token_only(model) as applied:
        fast = model(input_ids=ids, attention_mask=mask).logits
    assert applied
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    assert "forward" not in vars(model.bert.encoder.layer[-1])  # restored on exit


def test_first_token_only_gives_the_same_gradients() -> None:
    model = _classifier(dropout=0.0).train()
    ids, mask = _batch()
    y = torch.tensor([0, 1, 2, 1])

    def grads(fast: bool) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model)
        with first_token_only(m) if fast else torch.enable_grad():
            F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y).backward()
        return {n: q.grad for n, q in m.named_parameters() if q.grad is not None}

    plain, fast = grads(False), grads(True)
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_first_token_only_leaves_other_models_alone() -> None:
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    with first_token_only(BertForMaskedLM(config)) as applied:
        assert not applied


def test_embedding_row_grads_give_the_same_gradients_step_after_step() -> None:
    """Three steps with the optimizer between them: each step's embedding gradient is the
    dense one, so the rows the last step wrote are cleared; the weights stay equal."""
    plain, fast = _classifier(dropout=0.0).train(), _classifier(dropout=0.0).train()
    gen = torch.Generator().manual_seed(2)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, fast)]
    with embedding_row_grads(fast) as applied:
        assert applied
        for _ in range(3):
            ids = torch.randint(5, 120, (4, 9), generator=gen)  # different rows each step
            ids[0, 6:] = 0  # padding: no gradient for the pad row
            y = torch.randint(0, 3, (4,), generator=gen)
            for model in (plain, fast):
                F.cross_entropy(model(input_ids=ids, attention_mask=(ids != 0).long()).logits, y).backward()
            grads = [m.bert.embeddings.word_embeddings.weight.grad for m in (plain, fast)]
            assert not grads[1].is_sparse
            torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-5)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    assert not fast.bert.embeddings.word_embeddings.sparse  # restored on exit
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_embedding_row_grads_leave_tied_embeddings_alone() -> None:
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    model = BertForMaskedLM(config)  # the decoder shares the embedding: its gradient is dense
    with embedding_row_grads(model) as applied:
        assert not applied
        assert not model.get_input_embeddings().sparse


def test_attention_matches_transformers_eager_with_padding() -> None:
    model = _classifier().eval()
    ids, mask = _batch()
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(ATTENTION)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, eager)


def test_host_dropout_keeps_one_minus_p_and_the_mean() -> None:
    drop = HostDropout(0.1, np.random.default_rng(0)).train()
    x = torch.ones(2000, 1000)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.1) < 0.002  # 2M draws: sd 0.0002
    assert abs(float(y.mean()) - 1.0) < 0.003
    assert torch.equal(drop.eval()(x), x)
    same = HostDropout(0.1, np.random.default_rng(0)).train()
    assert torch.equal(same(x), y)  # seeded: the same masks


def test_host_dropout_swaps_and_restores_every_dropout() -> None:
    model = _classifier()
    before = [type(m) for m in model.modules()]
    with host_dropout(model, seed=0):
        drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert drops and all(isinstance(m, HostDropout) for m in drops)
    assert [type(m) for m in model.modules()] == before


def test_runtime_fast_paths_by_device() -> None:
    cpu, cuda = Runtime(CPU, bf16=False), Runtime(torch.device("cuda"), bf16=True)
    cpu_bf16 = Runtime(CPU, bf16=True)
    assert all(cpu_bf16.uses(f) for f in FAST_PATHS)
    assert all(cpu.uses(f) for f in FAST_PATHS if f != "shape_buckets")
    assert cuda.uses("first_token_only") and cuda.uses("embedding_row_grads")
    assert not cuda.uses("host_dropout")
    # Only bf16 kernels on a CPU are built per shape: fp32 and the GPU pad nothing extra.
    assert (cpu.length_multiple, cuda.length_multiple, cpu.rows_multiple) == (1, 1, 1)
    assert (cpu_bf16.length_multiple, cpu_bf16.rows_multiple) == (8, 32)
    assert cpu_bf16.without("shape_buckets").length_multiple == 1
    assert not cpu.without("host_dropout").uses("host_dropout")
    with pytest.raises(ValueError, match="unknown fast path 'fused'"):
        cpu.uses("fused")


@pytest.mark.parametrize(
    ("overrides", "first_token", "row_grads"),
    [({}, True, True), ({"joint_alpha": 0.3}, False, False), ({"l2sp": 0.01}, True, False)],
)
def test_finetune_runs_the_fast_paths_its_objective_allows(
    overrides: dict[str, float],
    first_token: bool,
    row_grads: bool,
    pretrained: Path,
    prepared: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The joint source loss reads the last layer at every position and shares the
    embedding with its decoder, so the [CLS]-only path and the row-sparse embedding
    gradient stay off there; L2-SP adds to every row of the embedding's gradient, so the
    row-sparse one stays off there too. Training leaves no fast path behind on the model."""
    while_training: list[bool] = []  # validation runs it too, in eval mode
    rows: list[bool] = []
    real_first, real_rows = text_fastpath.first_token_only, train.embedding_row_grads

    @contextlib.contextmanager
    def spy_first(model: nn.Module) -> Iterator[bool]:
        with real_first(model) as on:
            if model.training:
                while_training.append(on)
            yield on

    @contextlib.contextmanager
    def spy_rows(model: nn.Module) -> Iterator[bool]:
        with real_rows(model) as on:
            rows.append(on)
            yield on

    monkeypatch.setattr(text_fastpath, "first_token_only", spy_first)
    monkeypatch.setattr(train, "embedding_row_grads", spy_rows)
    setup, run, _, _ = train_tiny(pretrained, prepared, Runtime(CPU, bf16=False), **overrides)
    assert all(np.isfinite(h["train_loss"]) for h in run.history)
    assert while_training == ([True] if first_token else [])
    assert rows == ([True] if row_grads else [])
    model = setup.model
    assert not any(isinstance(m, HostDropout) for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    assert not model.get_input_embeddings().sparse


def test_host_dropout_reaches_gpt2_attention_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 names its probability dropout `attn_dropout`: under host dropout no draw is
    left to torch's Bernoulli kernel, and the same seed draws the same masks."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, attn_pdrop=0.5)
    model = GPT2LMHeadModel(config).train()
    model.set_attn_implementation(ATTENTION)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))

    def no_torch_dropout(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("torch's dropout ran under host dropout")

    outs = []
    for _ in range(2):
        with host_dropout(model, seed=3), monkeypatch.context() as m:
            m.setattr(F, "dropout", no_torch_dropout)
            outs.append(model(input_ids=ids, use_cache=False).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(outs[0], model.eval()(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast"])
def test_tanh_gelu_gives_gpt2_the_same_logits_and_gradients(activation: str) -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, activation_function=activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    before = [type(m) for m in model.modules()]

    def logits_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    written_out = logits_and_grads()
    with tanh_gelu(model):
        assert [type(b.mlp.act).__name__ for b in model.transformer.h] == ["GELUTanh"] * 2
        fused = logits_and_grads()
    assert [type(m) for m in model.modules()] == before
    torch.testing.assert_close(fused[0], written_out[0], rtol=1e-5, atol=1e-6)
    for name, grad in written_out[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tanh_gelu_leaves_other_activations_alone() -> None:
    model = _classifier()  # BERT's erf GELU: already one kernel
    before = [type(m) for m in model.modules()]
    with tanh_gelu(model):
        assert [type(m) for m in model.modules()] == before
