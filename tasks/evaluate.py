"""evaluate: what transfer buys, measured honestly.

The shipped (fine-tuned) model is scored on the target test split. A data-efficiency curve
then trains transfer and a from-scratch control at several training-set sizes, several
seeds each, on the same rows; the paired gain gets a confidence interval, and the
negative-transfer gate fails the stage when, at the configured size, transfer is not
better than scratch beyond that noise. Forgetting is the source task's score before and
after fine-tuning.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from tlpipe.batching import length_batches
from tlpipe.classifier import encode_split, scratch_params, transfer_setup
from tlpipe.curve import ARMS, CurvePoint, choose_scratch, curve_plan, curve_workers, one_thread, tuning_plan
from tlpipe.data import label_ids, read_split, source_split, texts
from tlpipe.errors import DataError, GateFailed
from tlpipe.model import fresh_dir, has_mlm_head, load_mlm, scratch_classifier, seed_everything, write_json
from tlpipe.params import DataParams, EncoderConfig, EvaluateParams, FinetuneParams, Size
from tlpipe.text import SpecialIds, encode, load_tokenizer, truncated_share
from tlpipe.train import (
    MLM_EVAL_ROWS,
    Runtime,
    classification_metrics,
    iterate_batches,
    mlm_eval_loss,
    predict_logits,
    train_classifier,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    shipped: dict[str, Any]
    gate: dict[str, Any]
    forgetting: dict[str, Any]


def labelled_target(prepare_dir: Path) -> pd.DataFrame:
    """The labelled target rows a curve may train on: train, then pool (never val or test)."""
    return pd.concat([read_split(prepare_dir, "train"), read_split(prepare_dir, "pool")], ignore_index=True)


def subsample(frame: pd.DataFrame, size: Size, seed: int) -> pd.DataFrame:
    """The first `size` rows of a seeded permutation: sizes are nested for a given seed."""
    if size != "all" and size > len(frame):
        raise DataError(
            f"evaluate.sizes asks for {size} training rows; the target has {len(frame)} "
            f"labelled rows outside val and test (train + pool)"
        )
    order = np.random.default_rng(seed).permutation(len(frame))
    return frame.iloc[order if size == "all" else order[:size]]


def run_point(
    point: CurvePoint,
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    finetune_dir: Path,
    prepare_dir: Path,
    runs_dir: Path,
) -> dict[str, Any]:
    """Train one arm on `point.size` rows drawn with `point.seed`; score it on test, or, for
    a tuning run, keep its best validation scores alone. It takes the evaluate stage's
    inputs (the shipped model in `finetune_dir` is not read).

    Writes and returns `runs_dir/<key>.json`: rows, test (or validation) accuracy and
    macro-F1, steps, time.
    """
    seed_everything(point.seed)
    labels = data.labels
    rows = subsample(labelled_target(prepare_dir), point.size, point.seed)
    if point.arm == "reference":
        scores, training = reference_run(rows, labels, prepare_dir)
        metrics = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
        return _write_run(runs_dir, point, len(rows), metrics, training)
    tok = load_tokenizer(source_dir)
    pad = SpecialIds.of(tok).pad
    train_ids = encode(tok, texts(rows), ft.max_length)
    train_y = label_ids(rows, labels)
    val_ids, val_y = encode_split(prepare_dir, "val", source_dir, labels, ft.max_length)
    run_ft = ft.model_copy(update={"seed": point.seed})
    if point.arm == "transfer":
        setup = transfer_setup(run_ft, labels, source_dir, prepare_dir)
        model, transferred, source_mlm = setup.model, setup.transferred, setup.source_mlm
    else:
        assert point.lr is not None and point.model is not None, (
            f"{point.key}: scratch runs name their grid cell"
        )
        run_ft = scratch_params(run_ft, point.lr)
        encoder = p.scratch_models[point.model]
        model, transferred, source_mlm = scratch_classifier(source_dir, labels, encoder), None, None
    run = train_classifier(
        model,
        train_ids,
        train_y,
        val_ids,
        val_y,
        run_ft,
        pad,
        transferred=transferred,
        source_mlm=source_mlm,
        runtime=Runtime.pick(ft.device, ft.precision),
        desc=point.key,
    )
    training = {"best_step": run.best_step, "steps": run.steps, "train_seconds": run.seconds}
    if point.tune:
        best = next(row for row in run.history if row["step"] == run.best_step)
        metrics = {"val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"]}
        return _write_run(runs_dir, point, len(rows), metrics, training)
    test_ids, test_y = encode_split(prepare_dir, "test", source_dir, labels, ft.max_length)
    pred = predict_logits(model, test_ids, pad, ft.eval_batch_size).argmax(1)
    scores = classification_metrics(test_y, pred, len(labels))
    metrics = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    return _write_run(runs_dir, point, len(rows), metrics, training)


def _write_run(
    runs_dir: Path, point: CurvePoint, rows: int, metrics: dict[str, float], training: dict[str, Any]
) -> dict[str, Any]:
    result = {**asdict(point), "rows": rows, **metrics, **training}
    runs_dir.mkdir(parents=True, exist_ok=True)
    write_json(runs_dir / f"{point.key}.json", result)
    log.info("%s: %d rows, %s", point.key, rows, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return result


# The reference's inverse regularisation strengths, the best on val macro-F1 kept.
REFERENCE_C = (0.3, 1.0, 3.0, 10.0, 30.0)


def reference_run(
    rows: pd.DataFrame, labels: tuple[str, ...], prepare_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The classical reference on `rows`: TF-IDF word (1-2) and character (2-5, in-word)
    n-grams, multinomial logistic regression at the C with the best val macro-F1.
    Returns (test metrics, training facts)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion

    start = time.perf_counter()
    features = FeatureUnion(
        [
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        ]
    )
    x = features.fit_transform(texts(rows))
    y = label_ids(rows, labels)
    val, test = read_split(prepare_dir, "val"), read_split(prepare_dir, "test")
    x_val, y_val = features.transform(texts(val)), label_ids(val, labels)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in REFERENCE_C:
        fit = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        f1 = classification_metrics(y_val, fit.predict(x_val), len(labels))["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, fit)
    assert best is not None
    pred = best[2].predict(features.transform(texts(test)))
    metrics = classification_metrics(label_ids(test, labels), pred, len(labels))
    return metrics, {"c": best[1], "train_seconds": time.perf_counter() - start}


def interval(values: list[float], confidence: float) -> dict[str, float]:
    """Mean, sample std and a two-sided Student-t confidence interval of the mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    half = (
        float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x)) if len(x) > 1 else 0.0
    )
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": len(x)}


def summarise(results: list[dict[str, Any]], p: EvaluateParams) -> list[dict[str, Any]]:
    """Per size: each arm's (and the reference's) accuracy and macro-F1 (mean, std, interval)
    and the paired gain of transfer over scratch (tuning runs are not part of the curve)."""
    by = {(r["arm"], r["size"], r["seed"]): r for r in results if not r.get("tune")}
    arms = (*ARMS, "reference") if any(r["arm"] == "reference" for r in results) else ARMS
    curve = []
    for size in p.sizes:
        entry: dict[str, Any] = {"size": size, "rows": by[("transfer", size, p.seeds[0])]["rows"]}
        for arm in arms:
            entry[arm] = {
                metric: interval([by[(arm, size, s)][metric] for s in p.seeds], p.confidence)
                for metric in ("accuracy", "macro_f1")
            }
        entry["gain"] = {
            metric: interval(
                [by[("transfer", size, s)][metric] - by[("scratch", size, s)][metric] for s in p.seeds],
                p.confidence,
            )
            for metric in ("accuracy", "macro_f1")
        }
        curve.append(entry)
    return curve


def gate(curve: list[dict[str, Any]], p: EvaluateParams) -> dict[str, Any]:
    """The negative-transfer gate: the gain's interval on the primary metric at `gate_size`
    must clear min_gain."""
    entry = next(e for e in curve if e["size"] == p.gate_size)
    gain = entry["gain"][p.metric]
    return {
        "size": p.gate_size,
        "rows": entry["rows"],
        "seeds": len(p.seeds),
        "confidence": p.confidence,
        "min_gain": p.min_gain,
        "metric": p.metric,
        "transfer": entry["transfer"][p.metric]["mean"],
        "scratch": entry["scratch"][p.metric]["mean"],
        "gain": gain["mean"],
        "ci_low": gain["ci_low"],
        "ci_high": gain["ci_high"],
        "passed": gain["ci_low"] > p.min_gain,
    }


def gate_message(g: dict[str, Any]) -> str:
    return (
        f"negative-transfer gate at {g['rows']} training rows ({g['seeds']} seeds): transfer {g['metric']} "
        f"{g['transfer']:.4f} vs scratch {g['scratch']:.4f}, gain {g['gain']:+.4f} "
        f"with {g['confidence']:.0%} interval [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]; its lower end "
        f"must exceed evaluate.min_gain {g['min_gain']:+.4f} and is {g['min_gain'] - g['ci_low']:.4f} short"
    )


@torch.no_grad()
def _mean_pooled(encoder: PreTrainedModel, ids: list[np.ndarray], pad: int, batch_size: int) -> torch.Tensor:
    """Sentence features (N, H): the encoder's last hidden states averaged over real tokens."""
    encoder.eval()
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    out = torch.zeros(len(ids), encoder.config.hidden_size)
    for idx, input_ids, mask in iterate_batches(ids, length_batches(lengths, batch_size, None), pad):
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out[torch.from_numpy(idx)] = (hidden * m).sum(1) / m.sum(1)
    return out


def probe_accuracy(features: torch.Tensor, y: np.ndarray, n_labels: int, seed: int) -> float:
    """A linear probe: multinomial logistic regression fit on half the rows, scored on the rest."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    fit, score = order[: len(y) // 2], order[len(y) // 2 :]
    mean, std = features[fit].mean(0), features[fit].std(0) + 1e-6
    x = (features - mean) / std
    target = torch.tensor(y, dtype=torch.long)
    linear = torch.nn.Linear(x.shape[1], n_labels)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x[fit]), target[fit])
        loss = loss + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(x[score]).argmax(1) == target[score]).float().mean())


def forgetting(
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    model: PreTrainedModel,
    prepare_dir: Path,
) -> dict[str, Any]:
    """The source task before and after fine-tuning, on the source rows pretrain held out:
    a linear probe's accuracy on a labelled source's labels over each encoder's features,
    and held-out masked-LM loss when the source model carries a trained LM head. Without a
    source there is nothing to forget: the report says so."""
    report: dict[str, Any] = {
        "source": data.source_kind,
        "source_rows": 0,
        "probe_accuracy_before": None,
        "probe_accuracy_after": None,
        "mlm_loss_before": None,
        "mlm_loss_after": None,
    }
    if data.source_kind == "none":
        return report
    tok = load_tokenizer(source_dir)
    pad = SpecialIds.of(tok).pad
    held_out, _ = source_split(read_split(prepare_dir, "source"))
    picked = held_out.iloc[: p.forgetting_rows]
    report["source_rows"] = len(picked)
    labels = data.source_labels
    if labels is not None and len(picked):
        ids = encode(tok, texts(picked), ft.max_length)
        y = label_ids(picked, labels)
        before = _mean_pooled(AutoModel.from_pretrained(source_dir), ids, pad, ft.eval_batch_size)
        after = _mean_pooled(model.base_model, ids, pad, ft.eval_batch_size)
        report["probe_accuracy_before"] = probe_accuracy(before, y, len(labels), ft.seed)
        report["probe_accuracy_after"] = probe_accuracy(after, y, len(labels), ft.seed)
    if has_mlm_head(source_dir) and len(held_out):
        held_out_ids = encode(tok, [t for t in texts(held_out) if t.strip()][:MLM_EVAL_ROWS], ft.max_length)
        special = SpecialIds.of(tok)
        mlm = load_mlm(source_dir)
        kw = {"mask_prob": ft.mask_prob, "seed": ft.seed}
        report["mlm_loss_before"] = mlm_eval_loss(mlm, held_out_ids, special, **kw)
        mlm.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
        report["mlm_loss_after"] = mlm_eval_loss(mlm, held_out_ids, special, **kw)
    return report


def evaluate_shipped(
    ft: FinetuneParams, labels: tuple[str, ...], finetune_dir: Path, prepare_dir: Path
) -> tuple[PreTrainedModel, dict[str, Any], np.ndarray, np.ndarray]:
    """The shipped model on test: (model, metrics with per-class names and the share of test
    rows cut to max_length, labels, predictions)."""
    model_dir = finetune_dir / "model"
    tok = load_tokenizer(model_dir)
    pad = SpecialIds.of(tok).pad
    test_ids, test_y = encode_split(prepare_dir, "test", model_dir, labels, ft.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    pred = predict_logits(model, test_ids, pad, ft.eval_batch_size).argmax(1)
    metrics = classification_metrics(test_y, pred, len(labels))
    metrics["per_class"] = dict(zip(labels, metrics["per_class"], strict=True))
    metrics["truncated_share"] = truncated_share(tok, texts(read_split(prepare_dir, "test")), ft.max_length)
    return model, metrics, test_y, pred


def finish(
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    finetune_dir: Path,
    prepare_dir: Path,
    out_dir: Path,
    results: list[dict[str, Any]],
) -> EvaluateResult:
    """Summarise the curve runs, score the shipped model, measure forgetting, apply the gate.

    Writes `metrics.json`, `curve.csv` (DVC plot), `curve.png`, `confusion.csv` (DVC plot)
    and `report.md`. Raises GateFailed, after writing them, when the gate fails.
    """
    seed_everything(ft.seed)
    labels = data.labels
    model, shipped, test_y, pred = evaluate_shipped(ft, labels, finetune_dir, prepare_dir)
    tuning = [r for r in results if r.get("tune")]
    lr, encoder = next((r["lr"], r["model"]) for r in results if r["arm"] == "scratch" and not r.get("tune"))
    curve = summarise(results, p)
    g = gate(curve, p)
    forgot = forgetting(p, ft, data, source_dir, model, prepare_dir)
    majority = majority_score(test_y, len(labels), "accuracy")
    write_json(
        out_dir / "metrics.json",
        {
            "test_rows": len(test_y),
            "train_rows": len(read_split(prepare_dir, "train")),
            "majority_class_accuracy": majority,
            "shipped": shipped,
            "strategy": _strategy(ft),
            "metric": p.metric,
            "scratch": {
                "lr": lr,
                "model": _encoder(p.scratch_models[encoder]),
                "tuned": {
                    "rows": tuning[0]["rows"] if tuning else None,
                    "seed": p.seeds[0],
                    "on": f"val_{p.metric}",
                    "grid": [
                        {
                            "lr": r["lr"],
                            "model": _encoder(p.scratch_models[r["model"]]),
                            "val_accuracy": r["val_accuracy"],
                            "val_macro_f1": r["val_macro_f1"],
                        }
                        for r in tuning
                    ],
                },
            },
            "curve": curve,
            "gate": g,
            "gain": {"metric": p.metric, "mean": g["gain"], "ci_low": g["ci_low"], "ci_high": g["ci_high"]},
            "forgetting": forgot,
        },
    )
    _write_curve_csv(out_dir / "curve.csv", curve)
    baseline = majority_score(test_y, len(labels), p.metric)
    plot_curve(out_dir / "curve.png", curve, p.metric, baseline, p.confidence)
    with (out_dir / "confusion.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((labels[t], labels[q]) for t, q in zip(test_y, pred, strict=True))
    (out_dir / "report.md").write_text(curve_markdown(curve, g, baseline))
    log.info("evaluate: %s", gate_message(g) if not g["passed"] else f"gate passed: {g}")
    if not g["passed"]:
        raise GateFailed(gate_message(g))
    return EvaluateResult(shipped, g, forgot)


def evaluate(
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    finetune_dir: Path,
    prepare_dir: Path,
    out_dir: Path,
) -> EvaluateResult:
    """Every curve run over a pool of worker processes (`out_dir/runs/*.json`), then `finish`.
    The Prefect flow runs the same points as separate task runs on the same kind of pool."""
    fresh_dir(out_dir)
    args = (p, ft, data, source_dir, finetune_dir, prepare_dir, out_dir / "runs")
    with ProcessPoolExecutor(curve_workers(), initializer=one_thread) as pool:

        def run_all(plan: list[CurvePoint]) -> list[dict[str, Any]]:
            return list(pool.map(run_point, plan, *([a] * len(plan) for a in args)))

        tuning = run_all(tuning_plan(p))
        results = tuning + run_all(curve_plan(p, choose_scratch(tuning, p)))
    return finish(p, ft, data, source_dir, finetune_dir, prepare_dir, out_dir, results)


def _encoder(config: EncoderConfig | None) -> dict[str, Any] | None:
    """An encoder size as recorded (None: the transfer model's own architecture)."""
    return config.model_dump() if config is not None else None


def _strategy(ft: FinetuneParams) -> dict[str, Any]:
    keys = ("strategy", "freeze_bottom", "layer_decay", "l2sp", "joint_alpha", "tapt_steps")
    return {k: getattr(ft, k) for k in keys} | {"lr": ft.optim.lr, "schedule": ft.optim.schedule}


METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


def majority_score(test_y: np.ndarray, n_labels: int, metric: str) -> float:
    """What always predicting the most frequent test class scores: its share (accuracy),
    or its F1 2p / (1 + p) averaged with zeros for every other class (macro-F1)."""
    share = float(np.bincount(test_y, minlength=n_labels).max() / len(test_y))
    return share if metric == "accuracy" else 2 * share / (1 + share) / n_labels


CURVE_FIELDS = [
    "rows",
    "transfer_accuracy",
    "scratch_accuracy",
    "gain",
    "gain_ci_low",
    "gain_ci_high",
    "transfer_macro_f1",
    "scratch_macro_f1",
    "reference_accuracy",
    "gain_macro_f1",
    "reference_macro_f1",
]


def _write_curve_csv(path: Path, curve: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        for e in curve:
            writer.writerow(
                {
                    "rows": e["rows"],
                    "transfer_accuracy": e["transfer"]["accuracy"]["mean"],
                    "scratch_accuracy": e["scratch"]["accuracy"]["mean"],
                    "gain": e["gain"]["accuracy"]["mean"],
                    "gain_ci_low": e["gain"]["accuracy"]["ci_low"],
                    "gain_ci_high": e["gain"]["accuracy"]["ci_high"],
                    "transfer_macro_f1": e["transfer"]["macro_f1"]["mean"],
                    "scratch_macro_f1": e["scratch"]["macro_f1"]["mean"],
                    "reference_accuracy": e["reference"]["accuracy"]["mean"] if "reference" in e else "",
                    "gain_macro_f1": e["gain"]["macro_f1"]["mean"],
                    "reference_macro_f1": e["reference"]["macro_f1"]["mean"] if "reference" in e else "",
                }
            )


def plot_curve(
    path: Path, curve: list[dict[str, Any]], metric: str, majority: float, confidence: float
) -> None:
    """The primary test metric against training rows (log scale), mean and interval of each
    arm, beside what always predicting the majority class scores."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [e["rows"] for e in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    styles = {"transfer": ("tab:blue", "-"), "scratch": ("tab:orange", "-"), "reference": ("tab:green", ":")}
    for arm, (colour, line) in styles.items():
        if arm not in curve[0]:
            continue
        acc = [e[arm][metric] for e in curve]
        label = "reference (TF-IDF + logistic regression)" if arm == "reference" else arm
        ax.plot(rows, [a["mean"] for a in acc], marker="o", linestyle=line, color=colour, label=label)
        ax.fill_between(
            rows, [a["ci_low"] for a in acc], [a["ci_high"] for a in acc], color=colour, alpha=0.2
        )
    ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("target training rows")
    ax.set_ylabel(f"test {METRIC_NAMES[metric]}")
    ax.set_title(f"Data efficiency (mean and {confidence:.0%} interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def curve_markdown(curve: list[dict[str, Any]], g: dict[str, Any], majority: float) -> str:
    reference = "reference" in curve[0]
    m = g["metric"]
    name = METRIC_NAMES[m]
    lines = [
        f"| rows | transfer {name} | scratch {name} | gain (interval) |"
        + (f" reference {name} |" if reference else ""),
        "|---:|---|---|---|" + ("---|" if reference else ""),
    ]
    for e in curve:
        t, s, d = e["transfer"][m], e["scratch"][m], e["gain"][m]
        line = (
            f"| {e['rows']} | {t['mean']:.4f} ± {t['std']:.4f} | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |"
        )
        if reference:
            r = e["reference"][m]
            line += f" {r['mean']:.4f} ± {r['std']:.4f} |"
        lines.append(line)
    verdict = "passed" if g["passed"] else "FAILED"
    lines += [
        "",
        f"Majority class: {name} {majority:.4f}. Mean ± std over {g['seeds']} seeds; gain intervals at "
        f"{g['confidence']:.0%}.",
        f"Negative-transfer gate at {g['rows']} rows: {verdict} (lower end {g['ci_low']:+.4f}, "
        f"needs > {g['min_gain']:+.4f}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from tasks.wiring import main

    main("evaluate")
