"""The text classifier's parts of the run's report and of a release's model card: the
shared classifier sections (`tlpipe.report.ClassifierSections`) with how inputs were cut
and the source model's masked-LM loss. Reads outputs only (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlpipe.params import Params
from tlpipe.report import Block, ClassifierSections, pct, read_json
from tlpipe.settings.text_classification import SPEC


class TextClassifierReport(ClassifierSections):
    # The classical reference arm of the curve (tlpipe.settings.text_classification.reference).
    reference_name = SPEC.reference_name
    reference_note = (
        "The reference is a classical model on the same rows (TF-IDF word and character n-grams, "
        "logistic regression); the gate compares transfer with scratch only."
    )
    kind = "Text classifier"
    new_model = "a new encoder"
    source_name = "Source corpus"
    nothing_forgotten = (
        "The source has no labels and the source model no trained LM head: nothing to measure."
    )

    def shipped_notes(self, params: Params, metrics: dict[str, Any], out: Path) -> list[Block]:
        """The share of rows cut to max_length, and how they were cut."""
        sm = metrics["shipped"]
        cut = read_json(out / "finetune" / "metrics.json").get("truncated")
        if not (cut and "truncated_share" in sm):
            return []
        how = {
            "head": f"their first {cut['max_length']} tokens",
            "head_tail": f"{cut['max_length']} tokens, the first quarter and the last three quarters",
        }[cut.get("truncation", "head")]
        return [
            f"Inputs are cut to {how}: {pct(cut['train_share'])} of train, "
            f"{pct(cut['val_share'])} of val and {pct(sm['truncated_share'])} of test rows were longer."
        ]

    def source_note(self, m: dict[str, Any]) -> str:
        before = m.get("mlm_eval_loss_before")
        loss = f"{before:.4f} → " if before is not None else ""
        return f"; held-out masked-LM loss {loss}{m['mlm_eval_loss_after']:.4f}."

    def forgetting_rows(self, f: dict[str, Any]) -> list[list[str]]:
        rows = super().forgetting_rows(f)
        if f.get("mlm_loss_before") is not None:
            before, after = f["mlm_loss_before"], f["mlm_loss_after"]
            rows.append(["held-out masked-LM loss", f"{before:.4f}", f"{after:.4f}"])
        return rows


REPORT = TextClassifierReport()
