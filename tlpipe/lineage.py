"""A release's lineage: the input data sets' hashes, the source model and what it started
from, the fine-tuned weights and the ONNX files exported from them, each by SHA-256.

Each stage passes its part on: pretrain records its starting checkpoint and input in its
checkpoint's tlpipe.json, finetune carries that forward beside its own inputs, export writes
`lineage.json` (this chain and the ONNX files), and publish adds prepare's input hashes and
puts it all in the release manifest, where `tlpipe lineage VERSION` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# export's record of where its bundle came from (outputs/export/lineage.json).
LINEAGE = "lineage.json"


def release_lineage(prepare_dir: Path, export_dir: Path) -> dict[str, Any]:
    """The lineage a release manifest records: every input data set (path, selection, rows,
    each file's SHA-256, from prepare's summary.json) and export's chain from the source
    model to the ONNX files."""
    inputs = json.loads((prepare_dir / "summary.json").read_text())["inputs"]
    return {"inputs": inputs, **json.loads((export_dir / LINEAGE).read_text())}


def describe(record: dict[str, Any]) -> list[str]:
    """`registry.lineage`'s record as lines for people: inputs -> source model ->
    fine-tuned model -> ONNX -> aliases and their moves."""
    git = record.get("git") or {}
    commit = git.get("commit") or "unknown"
    lines = [
        f"version {record['version']} ({record.get('setting')}), published {record.get('created')}, "
        f"git {commit}{' (uncommitted changes)' if git.get('dirty') else ''}"
    ]
    chain = record.get("lineage")
    if not chain:
        lines.append("lineage: not recorded (published before releases recorded their lineage)")
    else:
        lines.append("inputs:")
        for role, entry in sorted(chain.get("inputs", {}).items()):
            if not entry:
                lines.append(f"  {role}: none")
                continue
            select = entry.get("select")
            rows = f"{entry.get('rows')} rows"
            if select:
                rows += f" {'not ' if select.get('invert') else ''}matching {select['pattern']!r}"
            lines.append(f"  {role}: {entry.get('path')}, {rows}")
            lines += _digests(entry.get("files"), "    ")
        source = chain.get("source_model") or {}
        init = source.get("init")
        lines.append("source model:")
        if init:
            lines.append(f"  started from {init['from']}")
            lines += _digests(init["files"], "    ")
        else:
            lines.append("  started from a new, randomly initialised model")
        if source.get("objective"):
            trained = f"  trained by {source.get('stage')} ({source.get('objective')}) on:"
        else:
            trained = "  taken as it is (no pretraining steps), its inputs:"
        lines += [trained, *_digests(source.get("inputs"), "    ")]
        lines.append(f"  weights  sha256 {source.get('weights')}")
        tuned = chain.get("finetuned") or {}
        lines.append(f"fine-tuned ({tuned.get('strategy')}):")
        lines += _digests(tuned.get("inputs"), "  ")
        lines.append(f"  weights  sha256 {tuned.get('weights')}")
        lines += ["ONNX:", *_digests(chain.get("onnx"), "  ")]
    lines.append(f"aliases now: {', '.join(record['aliases']) or 'none'}")
    for move in record["moves"]:
        lines.append(
            f"  {move['at']}  {move['alias']}: {move['from']} -> {move['to']} by {move['by']} ({move['why']})"
        )
    return lines


def _digests(files: dict[str, str] | None, indent: str) -> list[str]:
    return [f"{indent}{name}  sha256 {digest}" for name, digest in sorted((files or {}).items())]
