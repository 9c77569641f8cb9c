"""evaluate: score the fine-tuned model on the target test split against a scratch control."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoModelForSequenceClassification

from tasks.finetune import HISTORY_FIELDS, encode_split, write_history
from tlpipe.errors import GateFailed
from tlpipe.model import fresh_dir, scratch_classifier, seed_everything, write_json
from tlpipe.params import EvaluateParams, FinetuneParams
from tlpipe.text import SpecialIds, load_tokenizer
from tlpipe.train import classification_metrics, predict_logits, train_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    transfer: dict[str, Any]
    scratch: dict[str, Any]
    gain_accuracy: float
    gain_macro_f1: float


def _named(metrics: dict[str, Any], labels: tuple[str, ...]) -> dict[str, Any]:
    return metrics | {"per_class": dict(zip(labels, metrics["per_class"], strict=True))}


def evaluate(
    p: EvaluateParams,
    ft: FinetuneParams,
    labels: tuple[str, ...],
    finetune_dir: Path,
    prepare_dir: Path,
    out_dir: Path,
) -> EvaluateResult:
    """Test-split metrics of `finetune_dir/model` and of the same architecture trained from
    random initialisation with the same data and budget (the scratch control).

    Writes `metrics.json` (accuracy, macro-F1, per-class precision/recall, confusion matrix
    for both, and the gain), `confusion.csv` and `curves.csv` (DVC plots) and `report.md`.
    Raises GateFailed when the accuracy gain is below `p.min_gain`.
    """
    seed_everything(ft.seed)
    fresh_dir(out_dir)
    model_dir = finetune_dir / "model"
    pad = SpecialIds.of(load_tokenizer(model_dir)).pad
    test_ids, test_y = encode_split(prepare_dir, "test", model_dir, labels, ft.max_length)

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    transfer_pred = predict_logits(model, test_ids, pad, ft.eval_batch_size).argmax(1)
    transfer = _named(classification_metrics(test_y, transfer_pred, len(labels)), labels)

    train_ids, train_y = encode_split(prepare_dir, "train", model_dir, labels, ft.max_length)
    val_ids, val_y = encode_split(prepare_dir, "val", model_dir, labels, ft.max_length)
    control = scratch_classifier(model_dir, labels)
    run = train_classifier(
        control,
        train_ids,
        train_y,
        val_ids,
        val_y,
        ft,
        pad,
        optim=ft.optim.model_copy(update={"lr": p.scratch_lr}),
        desc="scratch control",
    )
    scratch_pred = predict_logits(control, test_ids, pad, ft.eval_batch_size).argmax(1)
    scratch = _named(classification_metrics(test_y, scratch_pred, len(labels)), labels)

    gain_acc = transfer["accuracy"] - scratch["accuracy"]
    gain_f1 = transfer["macro_f1"] - scratch["macro_f1"]
    majority = float(np.bincount(test_y, minlength=len(labels)).max() / len(test_y))
    write_json(
        out_dir / "metrics.json",
        {
            "test_rows": len(test_y),
            "majority_class_accuracy": majority,
            "transfer": transfer,
            "scratch": scratch,
            "gain": {"accuracy": gain_acc, "macro_f1": gain_f1},
        },
    )
    with (out_dir / "confusion.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((labels[t], labels[q]) for t, q in zip(test_y, transfer_pred, strict=True))
    write_history(out_dir / "scratch_history.csv", run)
    _write_curves(out_dir / "curves.csv", finetune_dir / "history.csv", run.history)
    _write_report(out_dir / "report.md", transfer, scratch, majority, labels)
    log.info(
        "evaluate: transfer acc %.4f f1 %.4f | scratch acc %.4f f1 %.4f | gain %+.4f",
        transfer["accuracy"],
        transfer["macro_f1"],
        scratch["accuracy"],
        scratch["macro_f1"],
        gain_acc,
    )
    if gain_acc < p.min_gain:
        raise GateFailed(
            f"transfer accuracy {transfer['accuracy']:.4f} vs scratch {scratch['accuracy']:.4f}: "
            f"gain {gain_acc:+.4f} is {p.min_gain - gain_acc:.4f} short of evaluate.min_gain "
            f"{p.min_gain:+.4f}"
        )
    return EvaluateResult(transfer, scratch, gain_acc, gain_f1)


def _write_curves(path: Path, transfer_history: Path, scratch_history: list[dict[str, float]]) -> None:
    rows: list[dict[str, Any]] = []
    if transfer_history.is_file():
        with transfer_history.open() as f:
            rows += [{"model": "transfer", **r} for r in csv.DictReader(f)]
    rows += [{"model": "scratch", **r} for r in scratch_history]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", *HISTORY_FIELDS])
        writer.writeheader()
        writer.writerows(rows)


def _write_report(
    path: Path,
    transfer: dict[str, Any],
    scratch: dict[str, Any],
    majority: float,
    labels: tuple[str, ...],
) -> None:
    lines = [
        "| model | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| transfer | {transfer['accuracy']:.4f} | {transfer['macro_f1']:.4f} |",
        f"| scratch control | {scratch['accuracy']:.4f} | {scratch['macro_f1']:.4f} |",
        f"| majority class | {majority:.4f} | |",
        "",
        "| class | precision | recall | support |",
        "|---|---|---|---|",
    ]
    for label in labels:
        c = transfer["per_class"][label]
        lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['support']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from tlpipe.entry import main
    from tlpipe.params import stage_dir

    main(
        "evaluate",
        lambda params, out: evaluate(
            params.evaluate,
            params.finetune,
            params.prepare.labels,
            stage_dir("finetune"),
            stage_dir("prepare"),
            out,
        ),
    )
