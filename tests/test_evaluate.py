import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.evaluate import evaluate, gate, interval, subsample, summarise
from tests.conftest import tiny_params
from tlpipe.curve import CurvePoint, check_runs, choose_scratch, curve_plan, tuning_plan
from tlpipe.errors import CurveError, DataError, GateFailed
from tlpipe.metrics import classification_metrics, majority_scores, probe_accuracy
from tlpipe.params import EncoderConfig, EvaluateParams, ParamsError, parse_params
from tlpipe.setting import Metric
from tlpipe.settings.text_classification import METRICS
from tlpipe.settings.text_classification.setting import SETTING

LABELS = ("negative", "neutral", "positive")


def test_metrics_by_hand() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 0, 2]), 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"][1]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"][2]["recall"] == pytest.approx(1 / 2)
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))


def test_interval_by_hand() -> None:
    ci = interval([1.0, 2.0, 3.0], 0.95)
    # mean 2, sample std 1, t(0.975, df=2) = 4.302653
    assert ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0)
    assert ci["ci_high"] - 2.0 == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert ci["ci_low"] == pytest.approx(4.0 - ci["ci_high"])


def test_plan_covers_every_size_seed_and_arm() -> None:
    p = EvaluateParams(sizes=(50, "all"), seeds=(0, 1, 2), gate_size=50)
    plan = curve_plan(p, (3e-4, 0))
    # The reference at "all" is one fit: every seed would draw the same rows.
    assert len(plan) == 16 and len({pt.key for pt in plan}) == 16
    assert [pt.seed for pt in plan if pt.arm == "reference" and pt.size == "all"] == [0]
    assert {(pt.arm, pt.size) for pt in plan} == {
        (a, s) for a in ("transfer", "scratch", "reference") for s in (50, "all")
    }
    assert {(pt.lr, pt.model) for pt in plan if pt.arm == "scratch"} == {(3e-4, 0)}
    assert {(pt.lr, pt.model) for pt in plan if pt.arm != "scratch"} == {(None, None)}
    without = curve_plan(p.model_copy(update={"reference": False}), (3e-4, 0))
    assert len(without) == 12 and {pt.arm for pt in without} == {"transfer", "scratch"}


def test_the_scratch_control_is_tuned_once_on_validation() -> None:
    small = EncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    p = EvaluateParams(
        sizes=(50, 500), seeds=(4, 5), gate_size=500, scratch_models=(None, small), scratch_lrs=(1e-4, 1e-3)
    )
    grid = tuning_plan(p)
    # Every cell once, at the gate's size with the first seed, judged on val (not test).
    assert [(pt.lr, pt.model) for pt in grid] == [(1e-4, 0), (1e-3, 0), (1e-4, 1), (1e-3, 1)]
    assert {(pt.arm, pt.size, pt.seed, pt.tune) for pt in grid} == {("scratch", 500, 4, True)}
    assert len({pt.key for pt in grid}) == 4
    results = [
        {"lr": pt.lr, "model": pt.model, "val_accuracy": acc, "val_macro_f1": f1}
        for pt, acc, f1 in zip(grid, (0.60, 0.70, 0.65, 0.62), (0.50, 0.40, 0.55, 0.45), strict=True)
    ]
    assert choose_scratch(results, p, METRICS["accuracy"]) == (1e-3, 0)
    assert choose_scratch(results, p, METRICS["macro_f1"]) == (1e-4, 1)
    # A metric where lower is better (perplexity) picks the lowest.
    lower = Metric("accuracy", "error", higher_is_better=False)
    assert choose_scratch(results, p, lower) == (1e-4, 0)
    one = p.model_copy(update={"scratch_models": (None,), "scratch_lrs": (2e-4,)})
    assert tuning_plan(one) == [] and choose_scratch([], one, METRICS["accuracy"]) == (2e-4, 0)


def test_a_lost_repeated_or_foreign_curve_run_fails_evaluate() -> None:
    from dataclasses import asdict

    p = EvaluateParams(sizes=(50, "all"), seeds=(0, 1), gate_size=50, scratch_lrs=(1e-4, 1e-3))
    grid = tuning_plan(p)
    tuning = [{**asdict(pt), "val_accuracy": acc} for pt, acc in zip(grid, (0.6, 0.7), strict=True)]
    curve = [asdict(pt) for pt in curve_plan(p, choose_scratch(tuning, p, METRICS["accuracy"]))]
    check_runs([*tuning, *curve], p, METRICS["accuracy"])
    with pytest.raises(
        CurveError,
        match=r"missing: transfer-50-seed1; recorded twice: scratch-all-seed0 \(lr 0.001, encoder 0\)$",
    ):
        lost = [r for r in curve if CurvePoint.of(r).key != "transfer-50-seed1"]
        check_runs([*tuning, *lost, next(r for r in curve if r["arm"] == "scratch")], p, METRICS["accuracy"])
    # A run of another plan: the scratch control at the cell its tuning did not choose.
    other = {**curve[1], "lr": 1e-4} if curve[1]["arm"] == "scratch" else None
    assert other is not None
    with pytest.raises(
        CurveError,
        match=r"missing: scratch-all-seed0 \(lr 0.001, .*not in the plan: scratch-all-seed0 \(lr 0.0001",
    ):
        check_runs([*tuning, *curve[:1], *curve[2:], other], p, METRICS["accuracy"])


def test_majority_class_scores() -> None:
    scores = majority_scores(np.array([0] * 9 + [1]), 2)
    assert scores["accuracy"] == pytest.approx(0.9)
    # Predicting class 0 always: its F1 is 2 * 0.9 / 1.9, the other's 0.
    assert scores["macro_f1"] == pytest.approx(0.9 / 1.9)


def test_reference_is_fit_and_scored_on_the_given_rows() -> None:
    from tlpipe.settings.text_classification.reference import REFERENCE_C, reference_run

    words = {"negative": "awful rude", "neutral": "gate schedule", "positive": "great thanks"}

    def frame(n: int, seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        labels = [LABELS[i % 3] for i in range(n)]
        return pd.DataFrame(
            {"text": [f"flight {rng.integers(1000)} {words[y]}" for y in labels], "label": labels}
        )

    val, test = frame(30, 1), frame(90, 2)
    metrics, facts = reference_run(frame(30, 0), val, test, LABELS)
    assert metrics["accuracy"] == 1.0 and facts["c"] in REFERENCE_C
    # Labels shuffled away from the words: nothing left to learn.
    noise = frame(60, 0).assign(label=lambda f: f["label"].sample(frac=1, random_state=0).to_numpy())
    assert reference_run(noise, val, test, LABELS)[0]["accuracy"] < 0.7


def test_sizes_nest_per_seed_and_differ_across_seeds() -> None:
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": ["negative"] * 100})
    small, big = subsample(frame, 10, 0), subsample(frame, 40, 0)
    assert list(small.index) == list(big.index[:10])
    assert list(subsample(frame, 10, 1).index) != list(small.index)
    assert len(subsample(frame, "all", 0)) == 100
    with pytest.raises(DataError, match="asks for 101 training rows; the target has 100"):
        subsample(frame, 101, 0)


def test_a_stratified_draw_keeps_each_label_s_share_in_every_nested_size() -> None:
    """70 / 20 / 10 rows of three labels: every stratified size holds each label in
    proportion, to a row, the sizes nest, seeds differ; a plain draw of 10 may miss one."""
    labels = ["negative"] * 70 + ["neutral"] * 20 + ["positive"] * 10
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": labels})
    for seed in range(5):
        for size in (10, 20, 50, 99):
            counts = subsample(frame, size, seed, stratify=True)["label"].value_counts()
            for label, share in (("negative", 0.7), ("neutral", 0.2), ("positive", 0.1)):
                assert abs(counts.get(label, 0) - share * size) <= 1, (seed, size, counts.to_dict())
        small, big = (subsample(frame, n, seed, stratify=True) for n in (10, 50))
        assert list(small.index) == list(big.index[:10])
    first, second = (list(subsample(frame, 10, seed, stratify=True).index) for seed in (0, 1))
    assert first != second
    assert sorted(subsample(frame, "all", 0, stratify=True).index) == list(range(100))
    missed = [s for s in range(20) if subsample(frame, 10, s)["label"].nunique() < 3]
    assert missed, "some plain draws of 10 rows miss a label (so stratifying changes something)"


def test_curve_params_are_checked() -> None:
    for bad, match in (
        ({"evaluate.seeds": [0]}, "two distinct seeds"),
        ({"evaluate.gate_size": 77}, "gate_size 77 is not one of sizes"),
        ({"evaluate.sizes": [20, 20]}, "no repeats"),
    ):
        with pytest.raises(ParamsError, match=match):
            parse_params(tiny_params(**bad))


def _runs(gains: list[float]) -> list[dict]:
    return [
        r
        for seed, g in enumerate(gains)
        for r in (
            {"arm": "transfer", "size": 100, "seed": seed, "rows": 100, "accuracy": 0.7 + g, "macro_f1": 0.5},
            {"arm": "scratch", "size": 100, "seed": seed, "rows": 100, "accuracy": 0.7, "macro_f1": 0.4},
        )
    ]


def test_gate_needs_the_whole_interval_above_min_gain() -> None:
    p = EvaluateParams(sizes=(100,), seeds=(0, 1, 2), gate_size=100)
    clear = gate(summarise(_runs([0.05, 0.06, 0.07]), p, METRICS), p)
    assert clear["passed"] and clear["gain"] == pytest.approx(0.06)
    noisy = gate(summarise(_runs([0.10, -0.04, 0.03]), p, METRICS), p)  # mean +0.03, interval spans 0
    assert not noisy["passed"] and noisy["ci_low"] < 0 < noisy["gain"]


def test_the_gain_is_positive_when_transfer_is_better_on_a_lower_is_better_metric() -> None:
    p = EvaluateParams(sizes=(100,), seeds=(0, 1, 2), gate_size=100)
    # Read as an error rate, transfer's higher score is worse on every seed.
    error = {"accuracy": Metric("accuracy", "error", higher_is_better=False)}
    g = gate(summarise(_runs([0.05, 0.06, 0.07]), p, error), p)
    assert g["gain"] == pytest.approx(-0.06) and not g["passed"]


def test_gate_reads_the_primary_metric() -> None:
    p = EvaluateParams(sizes=(100,), seeds=(0, 1, 2), gate_size=100, metric="macro_f1")
    # Transfer gains accuracy on every seed but loses macro-F1 (it gave up a rare class).
    runs = [
        {**r, "macro_f1": 0.3 + 0.01 * r["seed"]} if r["arm"] == "transfer" else r
        for r in _runs([0.05, 0.06, 0.07])
    ]
    g = gate(summarise(runs, p, METRICS), p)
    assert g["metric"] == "macro_f1" and not g["passed"]
    assert g["transfer"] == pytest.approx(0.31) and g["scratch"] == pytest.approx(0.4)
    assert gate(summarise(runs, p, METRICS), p.model_copy(update={"metric": "accuracy"}))["passed"]


def test_linear_probe_reads_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    y = np.arange(300) % 3
    features = torch.randn(300, 8, generator=gen) + 4 * torch.nn.functional.one_hot(torch.tensor(y), 8)
    assert probe_accuracy(features, y, 3, seed=0) > 0.95
    assert probe_accuracy(torch.randn(300, 8, generator=gen), y, 3, seed=0) < 0.6


def test_curve_runs_every_point_and_pairs_the_gain(evaluated: Path) -> None:
    out = evaluated
    runs = {f.stem: json.loads(f.read_text()) for f in (out / "runs").glob("*.json")}
    tuning = {k: r for k, r in runs.items() if r["tune"]}
    curve = {k: r for k, r in runs.items() if not r["tune"]}
    # sizes x seeds x (transfer, scratch, reference), the reference at "all" once
    assert len(curve) == 3 * 2 * 3 - 1
    assert {r["rows"] for r in curve.values()} == {20, 40, 100}  # "all": train 60 + pool 40
    metrics = json.loads((out / "metrics.json").read_text())
    # The control's grid (two learning rates) ran once at the gate's size, scored on val; the
    # curve's scratch runs use the cell with the best validation accuracy.
    assert sorted(tuning) == ["tune-scratch-40-lr0.0003-model0", "tune-scratch-40-lr0.001-model0"]
    # The first best in grid order (the learning rates as params list them) wins a tie.
    best = max(sorted(tuning.values(), key=lambda r: r["lr"]), key=lambda r: r["val_accuracy"])
    assert (
        {r["lr"] for r in curve.values() if r["arm"] == "scratch"}
        == {best["lr"]}
        == {metrics["scratch"]["lr"]}
    )
    assert "accuracy" not in best and len(metrics["scratch"]["tuned"]["grid"]) == 2
    entry = next(e for e in metrics["curve"] if e["size"] == 40)
    gains = [
        runs[f"transfer-40-seed{s}"]["accuracy"] - runs[f"scratch-40-seed{s}"]["accuracy"] for s in (0, 1)
    ]
    assert entry["gain"]["accuracy"]["mean"] == pytest.approx(np.mean(gains))
    assert metrics["gate"]["size"] == 40 and metrics["gate"]["gain"] == pytest.approx(np.mean(gains))
    csv_rows = (out / "curve.csv").read_text().splitlines()
    header = "rows,units,transfer_accuracy,scratch_accuracy,reference_accuracy,gain_accuracy,"
    assert csv_rows[0].startswith(header)
    assert csv_rows[0].endswith(
        ",reference_macro_f1,gain_macro_f1,gain_macro_f1_ci_low,gain_macro_f1_ci_high"
    )
    assert len(csv_rows) == 4
    assert all(e["reference"] for e in metrics["curve"])
    references = [runs[f"reference-40-seed{s}"]["accuracy"] for s in (0, 1)]
    assert entry["reference"]["accuracy"]["mean"] == pytest.approx(np.mean(references))
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_model_confusion_and_forgetting(evaluated: Path) -> None:
    out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_rows"] == 60 and np.sum(metrics["shipped"]["confusion"]) == 60
    assert set(metrics["shipped"]["per_class"]) == set(LABELS)
    confusion = (out / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 61
    forgot = metrics["forgetting"]
    assert 0 <= forgot["probe_accuracy_before"] <= 1 and 0 <= forgot["probe_accuracy_after"] <= 1
    # The tiny source model was pretrained with masked-LM, so it has a trained head to score.
    assert forgot["mlm_loss_before"] > 0 and forgot["mlm_loss_after"] > 0


def test_gate_failure_names_the_shortfall_and_keeps_the_evidence(
    pretrained: Path, finetuned: Path, prepared: Path, tmp_path: Path
) -> None:
    p = parse_params(
        tiny_params(**{"evaluate.min_gain": 0.99, "evaluate.sizes": [20], "evaluate.gate_size": 20})
    )
    with pytest.raises(GateFailed, match=r"negative-transfer gate at 20 training rows \(2 seeds\).*short"):
        evaluate(SETTING, p.evaluate, p.finetune, p.data, pretrained, finetuned, prepared, tmp_path / "e")
    assert not json.loads((tmp_path / "e/metrics.json").read_text())["gate"]["passed"]


def test_scratch_control_takes_its_own_size(pretrained: Path, prepared: Path, tmp_path: Path) -> None:
    from tasks.evaluate import CurvePoint, run_point

    p = parse_params(
        tiny_params(
            **{
                "evaluate.scratch_models": [
                    None,
                    {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
                ]
            }
        )
    )
    point = CurvePoint("scratch", 20, 0, 1e-3, 1)
    result = run_point(point, SETTING, p.evaluate, p.finetune, p.data, pretrained, prepared)
    assert result["rows"] == 20 and CurvePoint.of(result) == point
    from tlpipe.settings.text_classification.model import scratch_classifier

    model = scratch_classifier(pretrained, LABELS, p.evaluate.scratch_models[1])
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1


def test_one_reference_fit_stands_for_every_seed_at_all() -> None:
    p = EvaluateParams(sizes=("all",), seeds=(0, 1), gate_size="all")
    runs = [
        {"arm": arm, "size": "all", "seed": seed, "rows": 90, "accuracy": 0.7 + 0.01 * seed, "macro_f1": 0.6}
        for arm in ("transfer", "scratch")
        for seed in (0, 1)
    ] + [{"arm": "reference", "size": "all", "seed": 0, "rows": 90, "accuracy": 0.8, "macro_f1": 0.7}]
    reference = summarise(runs, p, METRICS)[0]["reference"]["accuracy"]
    assert reference["mean"] == pytest.approx(0.8) and reference["std"] == 0.0
