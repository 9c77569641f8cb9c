"""A language model's parts of the run's report and of a release's model card: the corpora,
texts per split, the shipped model's perplexity with the continuations the transfer and
scratch models wrote for the same prompts side by side, the source model and its held-out
perplexity, and forgetting as perplexity on held-out source text. Reads outputs only (no
torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlpipe.params import Params
from tlpipe.report import Block, Section, Table, describe_input, read_json
from tlpipe.settings.text_generation import SPEC


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(nothing: EOS first)"


class LanguageModelReport:
    # The classical reference arm of the curve (tlpipe.settings.text_generation.ngram).
    reference_name = SPEC.reference_name
    reference_note = (
        "The reference is a classical model of the same training tokens (interpolated Kneser-Ney, "
        "its order chosen on the validation text); the gate compares transfer with scratch only."
    )

    def inputs(self, params: Params) -> list[Block]:
        data = params.data
        blocks: list[Block] = [f"Target text: {describe_input(data.target)}."]
        if data.source is None:
            blocks.append("Source: none (the checkpoint is fine-tuned as it is; no source-side checks).")
        else:
            blocks.append(f"Source text: {describe_input(data.source)}.")
        return blocks

    def counts(self, params: Params, summary: dict[str, Any]) -> list[Block]:
        counts = summary.get("counts", {})
        rows = [
            [split, str(sum(counts[split].values()))]
            for split in ("train", "val", "test", "pool")
            if split in counts
        ]
        blocks: list[Block] = [Table(["target split", "texts"], rows)]
        if params.data.source is not None and "source" in counts:
            blocks.append(f"Source corpus: {sum(counts['source'].values())} texts.")
        return blocks

    def shipped(self, params: Params, metrics: dict[str, Any], out: Path) -> Section:
        sm = metrics["shipped"]
        section = Section("Shipped model")
        section.blocks.append(
            f"Test perplexity {sm['perplexity']:.2f} (loss {sm['loss']:.4f} nats per token) over "
            f"{sm['test_tokens']} test tokens."
        )
        e = params.evaluate
        runs = out / "evaluate" / "runs"
        arms = {
            arm: read_json(runs / f"{arm}-{e.gate_size}-seed{e.seeds[0]}.json")
            for arm in ("transfer", "scratch")
        }
        if all(r.get("examples") for r in arms.values()):
            section.blocks.append(
                f"Continuations of the first words of test texts (top-k 40, top-p 0.9, seed 0) by the "
                f"transfer and scratch models of the curve at {arms['transfer']['units']} target tokens:"
            )
            pairs = zip(arms["transfer"]["examples"], arms["scratch"]["examples"], strict=True)
            section.blocks.append(
                Table(
                    ["prompt", "transfer", "scratch"],
                    [
                        [t["prompt"], _one_line(t["continuation"]), _one_line(s["continuation"])]
                        for t, s in pairs
                    ],
                )
            )
        if sm.get("samples"):
            section.blocks.append("The shipped model's continuations of the same prompts:")
            section.blocks.append(
                Table(
                    ["prompt", "continuation"],
                    [[x["prompt"], _one_line(x["continuation"])] for x in sm["samples"]],
                )
            )
        return section

    def source_model(self, params: Params, out: Path) -> str:
        pre, m = params.pretrain, read_json(out / "pretrain" / "metrics.json")
        start = (
            f"`{pre.init_from}`" if pre.init_from else f"a new {pre.lm.architecture.upper()} language model"
        )
        if not m:
            return "Source model: pretrain has not run."
        if m.get("source") == "none" or not m.get("steps"):
            why = "no source" if m.get("source") == "none" else "no pretraining steps"
            return f"Source model: {start}, as it is ({why})."
        return (
            f"Source model: {start} over a {m['vocab_size']}-token byte-level BPE vocabulary, "
            f"{m['steps']} steps of next-token prediction on {m['source_tokens']} source tokens; "
            f"held-out source perplexity {m['source_perplexity']:.2f}."
        )

    def forgetting(self, f: dict[str, Any]) -> Section:
        section = Section("Forgetting (source text)")
        if f.get("perplexity_before") is None:
            section.blocks.append("No source: there is no source text to forget.")
            return section
        section.blocks.append(
            f"Perplexity on {f['source_tokens']} tokens of source text pretrain held out "
            f"({f['source_rows']} texts):"
        )
        section.blocks.append(
            Table(
                ["measure", "source model", "after fine-tuning"],
                [
                    ["perplexity", f"{f['perplexity_before']:.2f}", f"{f['perplexity_after']:.2f}"],
                    ["loss per token", f"{f['loss_before']:.4f}", f"{f['loss_after']:.4f}"],
                ],
            )
        )
        return section

    def card(self, params: Params, metrics: dict[str, Any]) -> tuple[str, str]:
        shipped = metrics["shipped"]
        start = params.pretrain.init_from or f"a new {params.pretrain.lm.architecture.upper()}"
        return (
            f"Language model fine-tuned from `{start}` on {metrics['train_rows']} target texts.",
            f"This model: test perplexity {shipped['perplexity']:.2f}, "
            f"loss {shipped['loss']:.4f} nats per token.",
        )


REPORT = LanguageModelReport()
