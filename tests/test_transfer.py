"""Transfer strategies do what they say: frozen weights stay bit-identical, trained ones
move, learning rates follow the layer-wise decay, and the objectives act on the model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tasks.finetune import finetune
from tests.conftest import tiny_params
from tlpipe.data import read_split
from tlpipe.params import FinetuneParams, OptimParams, ParamsError, parse_params
from tlpipe.settings.text_classification.layers import layer_groups
from tlpipe.settings.text_classification.setting import SETTING
from tlpipe.train import CPU_FP32, fit, plan_steps
from tlpipe.transfer import L2SP, LayerGroups, apply_freezing, param_groups, schedule_factor, trainable_from


def _train(pretrained: Path, prepared: Path, **overrides: object):
    # No early stop: every planned step runs.
    overrides = {"patience": 100, **overrides}
    params = parse_params(tiny_params(**{f"finetune.{k}": v for k, v in overrides.items()}))
    p = params.finetune
    torch.manual_seed(0)
    arm = SETTING.transfer_arm(p, params.data, pretrained, prepared)
    before = {n: q.detach().clone() for n, q in arm.model.named_parameters()}
    train, val = read_split(prepared, "train"), read_split(prepared, "val")
    run, _ = fit(SETTING, arm, train, val, p, params.data, pretrained, runtime=CPU_FP32)
    after = dict(arm.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    return arm, before, moved, run, layer_groups(arm.model)


def _depths(names: set[str], groups: LayerGroups) -> set[int]:
    return {groups.depth(n) for n in names}


def test_depths_of_a_bert_classifier() -> None:
    model, _, _ = _family("bert")
    groups = layer_groups(model)
    assert groups.blocks == 3 and groups.head == 4
    assert groups.depth("bert.embeddings.word_embeddings.weight") == 0
    assert groups.depth("bert.encoder.layer.0.attention.self.query.weight") == 1
    assert groups.depth("bert.encoder.layer.2.output.dense.bias") == 3
    assert groups.depth("bert.pooler.dense.weight") == 4
    assert groups.depth("classifier.weight") == 4


def test_a_bare_encoder_and_an_mlm_have_the_same_groups() -> None:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
    )
    bare, mlm = layer_groups(BertModel(cfg)), layer_groups(BertForMaskedLM(cfg))
    assert bare.depth("encoder.layer.1.output.dense.weight") == 2
    assert mlm.depth("bert.encoder.layer.1.output.dense.weight") == 2
    assert mlm.depth("cls.predictions.transform.dense.weight") == 3


def test_an_encoder_family_without_declared_groups_is_named() -> None:
    from transformers import AlbertConfig, AlbertForSequenceClassification

    model = AlbertForSequenceClassification(AlbertConfig(vocab_size=50, hidden_size=8, num_attention_heads=2))
    with pytest.raises(ValueError, match="not 'albert'"):
        layer_groups(model)


def test_groups_must_cover_every_declared_block() -> None:
    names = ["embeddings.w", "encoder.layer.0.w", "encoder.layer.2.w"]
    with pytest.raises(ValueError, match=r"declares 3 blocks.*\[0, 2\]"):
        LayerGroups.match(names, r"^embeddings\.", r"^encoder\.layer\.(\d+)\.", 3)


@pytest.mark.parametrize(
    ("overrides", "frozen_depths"),
    [
        ({"strategy": "full"}, set()),
        ({"strategy": "freeze_embeddings"}, {0}),
        ({"strategy": "freeze_bottom", "freeze_bottom": 1}, {0, 1}),
        ({"strategy": "head_only"}, {0, 1, 2}),
    ],
)
def test_frozen_weights_are_bit_identical_and_the_rest_move(
    pretrained: Path, prepared: Path, overrides: dict, frozen_depths: set[int]
) -> None:
    arm, before, moved, _, groups = _train(pretrained, prepared, **overrides)
    names = set(before)
    frozen = {n for n in names if groups.depth(n) in frozen_depths}
    # token_type and position rows never looked up get no gradient; every other weight moves.
    unused = {n for n in names - frozen if "token_type" in n}
    assert not (moved & frozen), f"frozen weights changed: {sorted(moved & frozen)[:3]}"
    assert (names - frozen - unused) <= moved, sorted(names - frozen - unused - moved)[:3]
    assert all(q.requires_grad for q in arm.model.parameters())  # released after training


def test_gradual_unfreeze_opens_one_group_per_epoch(pretrained: Path, prepared: Path) -> None:
    p = FinetuneParams(strategy="gradual_unfreeze")
    assert [trainable_from(p, 2, e) for e in (1, 2, 3, 4, 5)] == [3, 2, 1, 0, 0]
    # Two epochs (validated once, at the end, so the last weights are kept): the head,
    # then the top layer; layer 1 and the embeddings never train.
    _, _, moved, _, groups = _train(
        pretrained, prepared, strategy="gradual_unfreeze", epochs=2, evaluations=1
    )
    assert _depths(moved, groups) == {2, 3}


def test_layer_wise_learning_rates(pretrained: Path, prepared: Path) -> None:
    params = parse_params(tiny_params(**{"finetune.layer_decay": 0.5}))
    p = params.finetune
    setup = SETTING.transfer_arm(p, params.data, pretrained, prepared)
    groups = param_groups(setup.model, layer_groups(setup.model), p)
    lr = p.optim.lr
    by_depth = {g["depth"]: g["lr"] for g in groups}
    assert by_depth == {0: lr * 0.25, 1: lr * 0.5, 2: lr, 3: lr}
    covered = [id(q) for g in groups for q in g["params"]]
    assert sorted(covered) == sorted(id(q) for q in setup.model.parameters())  # each once
    for g in groups:
        biases = [n for n, q in setup.model.named_parameters() if any(q is x for x in g["params"])]
        if any(n.endswith("bias") for n in biases):
            assert g["weight_decay"] == 0.0


def test_layer_decay_reaches_the_optimizer(pretrained: Path, prepared: Path) -> None:
    """The effective per-group lr during training follows lr * decay**(L - l) * schedule."""
    seen: list[dict[int, float]] = []
    original = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append({g["depth"]: g["lr"] for g in self.param_groups})
        return original(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        _train(pretrained, prepared, layer_decay=0.5, epochs=1)
    finally:
        torch.optim.AdamW.step = original
    for lrs in seen:
        assert lrs[1] == pytest.approx(lrs[2] * 0.5)
        assert lrs[0] == pytest.approx(lrs[2] * 0.25)
        assert lrs[3] == pytest.approx(lrs[2])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_then_schedule(schedule: str) -> None:
    f = schedule_factor(OptimParams(warmup_ratio=0.1, schedule=schedule), 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    mid = {"linear": 1 - 45 / 90, "cosine": 0.5 * (1 + math.cos(math.pi * 45 / 90)), "constant": 1.0}
    assert f(55) == pytest.approx(mid[schedule])
    assert f(100) == pytest.approx(1.0 if schedule == "constant" else 0.0)


def test_step_budget() -> None:
    p = FinetuneParams(epochs=3, min_steps=50, max_steps=200, evaluations=5, optim=OptimParams(batch_size=10))
    assert plan_steps(40, p).total_steps == 50  # 3 epochs of 4 steps, raised to the floor
    assert plan_steps(400, p).total_steps == 120
    assert plan_steps(4000, p).total_steps == 200  # capped
    assert plan_steps(400, p).eval_every == 24


def test_strategy_params_are_checked() -> None:
    for bad in ({"strategy": "freeze_bottom"}, {"freeze_bottom": 2}, {"strategy": "unfreeze_all"}):
        with pytest.raises(ParamsError, match="finetune"):
            parse_params(tiny_params(**{f"finetune.{k}": v for k, v in bad.items()}))


def test_l2sp_gradient_is_the_penalty_gradient() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    reg = L2SP.anchor(layer, {"weight", "bias"}, strength=0.7)
    with torch.no_grad():
        for q in layer.parameters():
            q.add_(torch.randn_like(q))
    expected = torch.autograd.grad(
        0.7 * sum((q - s).pow(2).sum() for q, s in zip(reg.params, reg.source, strict=True)), reg.params
    )
    for q in layer.parameters():
        q.grad = torch.zeros_like(q)
    reg.add_to_grads()
    for q, g in zip(reg.params, expected, strict=True):
        assert torch.allclose(q.grad, g)


def test_l2sp_keeps_transferred_weights_near_the_source(pretrained: Path, prepared: Path) -> None:
    def drift(l2sp: float) -> float:
        setup, before, _, _, _ = _train(pretrained, prepared, l2sp=l2sp, epochs=3)
        return sum(
            float((q.detach() - before[n]).pow(2).sum())
            for n, q in setup.model.named_parameters()
            if n in setup.transferred
        )

    free, anchored = drift(0.0), drift(50.0)
    assert anchored < 0.5 * free, (anchored, free)


def test_joint_loss_trains_the_tied_source_head(pretrained: Path, prepared: Path) -> None:
    setup, _, moved, _, _ = _train(pretrained, prepared, joint_alpha=0.5)
    head = setup.extras.head
    assert head.predictions.decoder.weight is setup.model.get_input_embeddings().weight
    source = load_file(pretrained / "model.safetensors")
    dense = head.predictions.transform.dense.weight
    assert not torch.equal(dense, source["cls.predictions.transform.dense.weight"])
    assert "bert.embeddings.word_embeddings.weight" in moved


def test_tapt_adapts_the_encoder_on_unlabelled_target_text(
    pretrained: Path, prepared: Path, tmp_path: Path
) -> None:
    params = parse_params(tiny_params(**{"finetune.tapt_steps": 5, "finetune.epochs": 1}))
    p = params.finetune
    plain = SETTING.transfer_arm(p.model_copy(update={"tapt_steps": 0}), params.data, pretrained, prepared)
    adapted = SETTING.transfer_arm(p, params.data, pretrained, prepared)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(
        dict(plain.model.named_parameters())[key], dict(adapted.model.named_parameters())[key]
    )
    assert adapted.facts["tapt"]["steps"] == 5
    result = finetune(SETTING, p, params.data, pretrained, prepared, tmp_path / "f")
    assert result.best_step >= 1
    assert (tmp_path / "f/metrics.json").read_text().count('"tapt"') == 1
    assert np.isfinite(adapted.facts["tapt"]["last_loss"])


def _family(name: str) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Module]]:
    """A tiny random classifier of an encoder family, its embedding module and its layers,
    found by the family's own module structure (not by parameter names)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    small = {"vocab_size": 100, "num_labels": 3}
    if name == "bert":
        cfg = BertConfig(
            hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **small
        )
        model = BertForSequenceClassification(cfg)
        return model, model.bert.embeddings, list(model.bert.encoder.layer)
    if name == "distilbert":
        cfg = DistilBertConfig(dim=16, n_layers=3, n_heads=2, hidden_dim=32, **small)
        model = DistilBertForSequenceClassification(cfg)
        return model, model.distilbert.embeddings, list(model.distilbert.transformer.layer)
    cfg = RobertaConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **small
    )
    model = RobertaForSequenceClassification(cfg)
    return model, model.roberta.embeddings, list(model.roberta.encoder.layer)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize(
    ("overrides", "frozen"),
    [
        ({"strategy": "full"}, set()),
        ({"strategy": "freeze_embeddings"}, {0}),
        ({"strategy": "freeze_bottom", "freeze_bottom": 2}, {0, 1, 2}),
        ({"strategy": "head_only"}, {0, 1, 2, 3}),
    ],
)
def test_strategies_act_on_the_intended_modules_of_each_encoder_family(
    family: str, overrides: dict, frozen: set[int]
) -> None:
    model, embeddings, layers = _family(family)
    # Depth by module: 0 the embeddings, l the l-th layer, 4 everything else (the head).
    depth = {id(q): 0 for q in embeddings.parameters()}
    depth |= {id(q): i + 1 for i, layer in enumerate(layers) for q in layer.parameters()}
    p = FinetuneParams(**overrides)
    groups = layer_groups(model)
    assert groups.blocks == 3
    apply_freezing(model, groups, trainable_from(p, 3))
    got = {depth.get(id(q), 4) for q in model.parameters() if not q.requires_grad}
    assert got == frozen
    assert any(depth.get(id(q), 4) == 4 for q in model.parameters())  # the head exists and trains


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_gradual_unfreeze_and_layer_decay_follow_each_family_s_layers(family: str) -> None:
    model, embeddings, layers = _family(family)
    groups = layer_groups(model)
    depth = {id(q): 0 for q in embeddings.parameters()}
    depth |= {id(q): i + 1 for i, layer in enumerate(layers) for q in layer.parameters()}
    p = FinetuneParams(strategy="gradual_unfreeze", layer_decay=0.5, optim=OptimParams(lr=1.0))
    for epoch, lowest in ((1, 4), (2, 3), (3, 2), (5, 0)):
        apply_freezing(model, groups, trainable_from(p, 3, epoch))
        trains = {depth.get(id(q), 4) for q in model.parameters() if q.requires_grad}
        assert trains == set(range(lowest, 5)), (epoch, trains)
    for group in param_groups(model, groups, p):
        for q in group["params"]:
            d = depth.get(id(q), 4)
            assert group["lr"] == pytest.approx(0.5 ** max(0, 3 - d)), (family, d)
