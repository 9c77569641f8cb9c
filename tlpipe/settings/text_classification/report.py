"""The text classifier's parts of the run's report and of a release's model card: class
counts, the shipped model's confusion and per-class scores, how inputs were cut, the
source model, forgetting. Reads outputs only (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlpipe.params import Params
from tlpipe.report import Block, Section, Table, describe_input, pct, read_json


class ClassifierReport:
    # The classical reference arm of the curve (tlpipe.settings.text_classification.reference).
    reference_name = "TF-IDF + LR"
    reference_note = (
        "The reference is a classical model on the same rows (TF-IDF word and character n-grams, "
        "logistic regression); the gate compares transfer with scratch only."
    )

    def inputs(self, params: Params) -> list[Block]:
        data = params.data
        blocks: list[Block] = [f"Target: {describe_input(data.target)}; labels {', '.join(data.labels)}."]
        if data.source is None:
            blocks.append("Source: none (the checkpoint is fine-tuned as it is; no source-side checks).")
        else:
            own = data.source_labels
            labels = f"labels {', '.join(own)}" if own else "no labels"
            blocks.append(f"Source ({data.source_kind}, {labels}): {describe_input(data.source)}.")
        return blocks

    def counts(self, params: Params, summary: dict[str, Any]) -> list[Block]:
        """Rows per split and class, then the source corpus's size."""
        data, counts = params.data, summary.get("counts", {})
        rows = [
            [split, str(sum(counts[split].values())), *(str(counts[split].get(c, 0)) for c in data.labels)]
            for split in ("train", "val", "test", "pool")
            if split in counts
        ]
        blocks: list[Block] = [Table(["target split", "rows", *data.labels], rows)]
        source = counts.get("source")
        if data.source is not None and source is not None:
            line = f"Source corpus: {sum(source.values())} rows"
            if data.source_labels:
                line += " (" + ", ".join(f"{k}: {v}" for k, v in source.items()) + ")"
            blocks.append(line + ".")
        return blocks

    def shipped(self, params: Params, metrics: dict[str, Any], out: Path) -> Section:
        labels, sm = params.data.labels, metrics["shipped"]
        section = Section("Shipped model")
        section.blocks.append(f"Test accuracy {sm['accuracy']:.4f}, macro-F1 {sm['macro_f1']:.4f}.")
        cut = read_json(out / "finetune" / "metrics.json").get("truncated")
        if cut and "truncated_share" in sm:
            how = {
                "head": f"their first {cut['max_length']} tokens",
                "head_tail": f"{cut['max_length']} tokens, the first quarter and the last three quarters",
            }[cut.get("truncation", "head")]
            section.blocks.append(
                f"Inputs are cut to {how}: {pct(cut['train_share'])} of train, "
                f"{pct(cut['val_share'])} of val and {pct(sm['truncated_share'])} of test rows were longer."
            )
        section.blocks.append(
            Table(
                ["actual \\ predicted", *labels],
                [[labels[i], *(str(v) for v in row)] for i, row in enumerate(sm["confusion"])],
            )
        )
        section.blocks.append(
            Table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    [c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"])]
                    for c, v in sm["per_class"].items()
                ],
            )
        )
        return section

    def source_model(self, params: Params, out: Path) -> str:
        pre, m = params.pretrain, read_json(out / "pretrain" / "metrics.json")
        start = f"`{pre.init_from}`" if pre.init_from else "a new encoder"
        if not m:
            return "Source model: pretrain has not run."
        if m.get("source") == "none":
            return f"Source model: {start}, as it is (no source)."
        if not m.get("steps"):
            return f"Source model: {start}, as it is (no pretraining steps)."
        steps = f"{m['steps']} steps of {m['objective']} pretraining"
        text = f"Source model: {start}, then {steps} on the source rows"
        if m.get("source_accuracy") is not None:
            return text + f"; held-out source accuracy {m['source_accuracy']:.4f}."
        before = m.get("mlm_eval_loss_before")
        loss = f"{before:.4f} → " if before is not None else ""
        return text + f"; held-out masked-LM loss {loss}{m['mlm_eval_loss_after']:.4f}."

    def forgetting(self, f: dict[str, Any]) -> Section:
        section = Section("Forgetting (source task)")
        rows = []
        if f.get("probe_accuracy_before") is not None:
            rows.append(
                [
                    "linear-probe accuracy on source labels",
                    f"{f['probe_accuracy_before']:.4f}",
                    f"{f['probe_accuracy_after']:.4f}",
                ]
            )
        if f.get("mlm_loss_before") is not None:
            rows.append(
                ["held-out masked-LM loss", f"{f['mlm_loss_before']:.4f}", f"{f['mlm_loss_after']:.4f}"]
            )
        if rows:
            section.blocks.append(Table(["measure", "source model", "after fine-tuning"], rows))
        elif f.get("source") == "none":
            section.blocks.append("No source: there is no source task to forget.")
        else:
            section.blocks.append(
                "The source has no labels and the source model no trained LM head: nothing to measure."
            )
        return section

    def card(self, params: Params, metrics: dict[str, Any]) -> tuple[str, str]:
        """The model card's opening line and its line on the shipped model."""
        shipped = metrics["shipped"]
        what = (
            f"Text classifier over [{', '.join(params.data.labels)}], "
            f"fine-tuned from `{params.pretrain.init_from or 'a new encoder'}` "
            f"on {metrics['train_rows']} labelled target rows."
        )
        return (
            what,
            f"This model: test accuracy {shipped['accuracy']:.4f}, macro-F1 {shipped['macro_f1']:.4f}.",
        )


REPORT = ClassifierReport()
