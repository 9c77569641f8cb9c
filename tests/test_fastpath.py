"""The training fast paths compute what the plain loop computes: the [CLS]-only last layer
gives the same logits and gradients, host dropout the same distribution, the row-sparse
AdamW the same update on the rows a batch uses; and training leaves the model as it was."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from tests.conftest import train_tiny
from tlpipe import train
from tlpipe.fastpath import (
    ATTENTION,
    HostDropout,
    RowSparseAdamW,
    clip_gradients,
    first_token_only,
    host_dropout,
    sparse_embedding,
)
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


def _sparse_grad(rows: list[int], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


def test_row_sparse_adamw_matches_adamw_on_the_rows_it_uses() -> None:
    torch.manual_seed(0)
    dense_w = nn.Parameter(torch.randn(10, 4))
    sparse_w = nn.Parameter(dense_w.detach().clone())
    dense = torch.optim.AdamW([dense_w], lr=0.1, weight_decay=0.05)
    lazy = RowSparseAdamW([sparse_w], lr=0.1, weight_decay=0.05, fused=True)
    rows = [1, 3, 3, 7]  # row 3 twice: the gradient sums them
    for step in range(3):
        values = torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
        sparse_w.grad = _sparse_grad(rows, values, (10, 4))
        dense_w.grad = sparse_w.grad.to_dense()
        dense.step()
        lazy.step()
    used = [1, 3, 7]
    torch.testing.assert_close(sparse_w[used], dense_w[used])
    unused = [i for i in range(10) if i not in used]
    torch.manual_seed(0)
    assert torch.equal(sparse_w[unused], torch.randn(10, 4)[unused])  # never moved


def test_row_sparse_adamw_state_round_trips() -> None:
    def run(steps: range, opt: RowSparseAdamW, w: nn.Parameter) -> None:
        for step in steps:
            values = torch.randn(2, 3, generator=torch.Generator().manual_seed(step))
            w.grad = _sparse_grad([0, 4], values, (5, 3))
            opt.step()

    w = nn.Parameter(torch.ones(5, 3))
    opt = RowSparseAdamW([w], lr=0.1)
    run(range(4), opt, w)
    resumed_w = nn.Parameter(torch.ones(5, 3))
    resumed = RowSparseAdamW([resumed_w], lr=0.1)
    run(range(2), resumed, resumed_w)
    again_w = nn.Parameter(resumed_w.detach().clone())
    again = RowSparseAdamW([again_w], lr=0.1)
    again.load_state_dict(copy.deepcopy(resumed.state_dict()))
    run(range(2, 4), again, again_w)
    torch.testing.assert_close(again_w, w)


def test_clip_gradients_counts_sparse_rows_once_summed() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = _sparse_grad([2, 2], torch.tensor([[2.0, 0.0], [2.0, 0.0]]), (4, 2))  # row 2: (4, 0)
    total = clip_gradients([a, b], max_norm=1.0)
    assert float(total) == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(b.grad.to_dense()[2], torch.tensor([0.8, 0.0]), atol=1e-6)


def test_sparse_embedding_only_for_embeddings_and_restored() -> None:
    emb = nn.Embedding(10, 4)
    with sparse_embedding(emb) as applied:
        assert applied and emb.sparse
    assert not emb.sparse
    with sparse_embedding(nn.Linear(2, 2)) as applied:
        assert not applied


def test_runtime_fast_paths_by_device() -> None:
    cpu, cuda = Runtime(CPU, bf16=False), Runtime(torch.device("cuda"), bf16=True)
    assert all(cpu.uses(f) for f in FAST_PATHS)
    assert (
        cuda.uses("first_token_only") and not cuda.uses("host_dropout") and not cuda.uses("sparse_embeddings")
    )
    assert not cpu.without("host_dropout").uses("host_dropout")
    with pytest.raises(ValueError, match="unknown fast path 'fused'"):
        cpu.uses("fused")


@pytest.mark.parametrize(
    ("overrides", "sparse"),
    [({}, True), ({"l2sp": 0.01}, False), ({"joint_alpha": 0.3}, False)],
)
def test_finetune_uses_sparse_embeddings_unless_read_densely(
    overrides: dict[str, float],
    sparse: bool,
    pretrained: Path,
    prepared: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """L2-SP pulls every embedding row and the joint loss ties them to the MLM decoder: both
    keep dense gradients. Training leaves no fast path behind on the model."""
    entered: list[bool] = []
    real = train.sparse_embedding

    def spy(embedding: nn.Module) -> contextlib.AbstractContextManager[bool]:
        entered.append(True)
        return real(embedding)

    monkeypatch.setattr(train, "sparse_embedding", spy)
    setup, run, _, _ = train_tiny(pretrained, prepared, Runtime(CPU, bf16=False), **overrides)
    assert all(np.isfinite(h["train_loss"]) for h in run.history)
    assert bool(entered) is sparse
    model = setup.model
    assert not model.get_input_embeddings().sparse
    assert not any(isinstance(m, HostDropout) for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
