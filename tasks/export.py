"""export: the fine-tuned model as an ONNX bundle, gated on parity with PyTorch.

What the model's graph, its preprocessor and its int8 quantisation are is the setting's
(its `Exporter`); the parity gate, the choice of the fused or the plain graph and the int8
accuracy gate are the same for every setting.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.checkpoint import WEIGHTS, read_meta
from tlpipe.data import sha256_file
from tlpipe.errors import GateFailed
from tlpipe.faults import failpoint
from tlpipe.files import fresh_dir, write_json
from tlpipe.lineage import LINEAGE
from tlpipe.params import ExportParams
from tlpipe.serve import BUNDLE_JSON, SERVING, load_bundle, to_wire
from tlpipe.setting import Exporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    bundle_dir: Path
    rows: int
    max_abs_diff: float
    argmax_agreement: float
    fused: bool
    # How far int8 falls below fp32 on the setting's export quality metric (None: no int8).
    int8_drop: float | None

    def summary(self) -> str:
        int8 = "no int8 model" if self.int8_drop is None else f"int8 drop {self.int8_drop:+.4f}"
        return (
            f"parity on {self.rows:,} rows: max |diff| {self.max_abs_diff:.2e}, argmax agreement "
            f"{self.argmax_agreement:.2%}; {int8}; bundle {self.bundle_dir}"
        )


def _parity(ort_out: np.ndarray, torch_out: np.ndarray) -> tuple[float, float]:
    if not len(ort_out):
        return 0.0, 1.0
    diff = float(np.abs(ort_out - torch_out).max())
    return diff, float((ort_out.argmax(-1) == torch_out.argmax(-1)).mean())


def _bundle_json(bundle_dir: Path, **fields: object) -> None:
    path = bundle_dir / BUNDLE_JSON
    write_json(path, {**json.loads(path.read_text()), **fields})


def lineage(model_dir: Path, bundle_dir: Path) -> dict[str, Any]:
    """Where the bundle's graphs came from, for the release manifest: the source model (its
    inputs, starting checkpoint and weights), the fine-tuned checkpoint (its inputs,
    strategy and weights) and the SHA-256 of every ONNX file exported from it."""
    meta = read_meta(model_dir)
    return {
        "source_model": meta.get("source"),
        "finetuned": {
            "inputs": meta.get("inputs"),
            "strategy": meta.get("params", {}).get("strategy"),
            "weights": sha256_file(model_dir / WEIGHTS),
        },
        "onnx": {f.name: sha256_file(f) for f in sorted(bundle_dir.glob("*.onnx"))},
    }


def export(
    exporter_of: type[Exporter], p: ExportParams, finetune_dir: Path, prepare_dir: Path, out_dir: Path
) -> ExportResult:
    """Export `finetune_dir/model` through the setting's `exporter_of` to `out_dir/bundle`
    (model.onnx, with `p.int8` model.int8.onnx, the preprocessor's files, bundle.json
    naming the setting; `lineage.json` beside it) and compare onnxruntime, through the
    bundle's own predictor, with PyTorch over the whole test split.

    With `p.optimize` the setting's fused graph ships when it passes the parity gate, else
    the plain one. Writes `parity.json`, and `serving.json`: the shipped bundle's
    predictions on the exporter's serving inputs (what publish's serving check asks the
    downloaded bundle for again); raises GateFailed unless max |Δlogit| <=
    p.max_abs_diff and the argmax agrees on every row, when one of the setting's own checks
    (`Exporter.checks`) fails, or when the int8 model's test score is more than
    `p.int8_max_drop` worse than the fp32 model's.
    """
    fresh_dir(out_dir)
    exporter = exporter_of(finetune_dir / "model")
    bundle_dir = out_dir / "bundle"
    bundle_dir.mkdir()
    fp32 = bundle_dir / "model.onnx"
    exporter.write(bundle_dir, p.opset)
    _bundle_json(bundle_dir, setting=exporter.setting)
    failpoint("export.write")

    inputs = exporter.parity_inputs(bundle_dir, prepare_dir)
    torch_out = exporter.torch_outputs(inputs, p.batch_size)
    diff, agree = _parity(load_bundle(bundle_dir).outputs(inputs, p.batch_size), torch_out)
    report: dict = {"plain": {"max_abs_diff": diff, "argmax_agreement": agree}}
    fused = False
    candidate = out_dir / "fused.onnx"
    operators = exporter.optimize(fp32, candidate) if p.optimize else None
    if operators is not None:
        report["fused_operators"] = operators
        plain = out_dir / "plain.onnx"
        os.replace(fp32, plain)
        os.replace(candidate, fp32)
        f_diff, f_agree = _parity(load_bundle(bundle_dir).outputs(inputs, p.batch_size), torch_out)
        report["fused"] = {"max_abs_diff": f_diff, "argmax_agreement": f_agree}
        fused = f_diff <= p.max_abs_diff and f_agree == 1.0
        if fused:
            diff, agree = f_diff, f_agree
            plain.unlink()
        else:
            log.warning(
                "export: the fused graph misses parity (max |Δlogit| %.2e); shipping the plain one", f_diff
            )
            os.replace(plain, fp32)

    rows = len(torch_out)
    failures = []
    if diff > p.max_abs_diff:
        failures.append(f"max |Δlogit| {diff:.3e} exceeds export.max_abs_diff {p.max_abs_diff:.1e}")
    if agree < 1.0:
        failures.append(f"argmax agrees on {agree:.2%} of {rows} rows, not 100%")
    checked, missed = exporter.checks(bundle_dir, prepare_dir)
    report |= checked
    failures += missed

    int8_drop = None
    if p.int8 and not failures:
        quantisation = exporter.quantize(fp32, bundle_dir / "model.int8.onnx", prepare_dir)
        _bundle_json(bundle_dir, models={"fp32": "model.onnx", "int8": "model.int8.onnx"})
        metric = exporter.quality_metric
        score32 = exporter.quality(torch_out, prepare_dir)
        score8 = exporter.quality(
            load_bundle(bundle_dir, precision="int8").outputs(inputs, p.batch_size), prepare_dir
        )
        # How much worse int8 scores (a positive drop is a loss, whichever way is better).
        int8_drop = -metric.gain(score8, score32)
        report["int8"] = {
            **quantisation,
            "metric": metric.key,
            "fp32": score32,
            "int8": score8,
            "drop": int8_drop,
            "max_drop_allowed": p.int8_max_drop,
            "onnx_bytes": (bundle_dir / "model.int8.onnx").stat().st_size,
        }
        if int8_drop > p.int8_max_drop:
            failures.append(
                f"int8 test {metric.label} {score8:.4f} is {int8_drop:.4f} worse than fp32's {score32:.4f}, "
                f"more than export.int8_max_drop {p.int8_max_drop} "
                "(set export.int8: false to ship fp32 alone)"
            )
    write_json(out_dir / LINEAGE, lineage(finetune_dir / "model", bundle_dir))
    served = exporter.serving_inputs(prepare_dir)
    write_json(
        out_dir / SERVING,
        {"inputs": [to_wire(x) for x in served], "predictions": load_bundle(bundle_dir).predict(served)},
    )
    write_json(
        out_dir / "parity.json",
        {
            "rows": rows,
            "max_abs_diff": diff,
            "argmax_agreement": agree,
            "max_abs_diff_allowed": p.max_abs_diff,
            "graph": "fused" if fused else "plain",
            "onnx_bytes": fp32.stat().st_size,
            **report,
        },
    )
    log.info(
        "export: %d rows, max |Δlogit| %.2e, argmax agreement %.4f, %s graph",
        rows,
        diff,
        agree,
        "fused" if fused else "plain",
    )
    if failures:
        raise GateFailed("export gate failed: " + "; ".join(failures))
    return ExportResult(bundle_dir, rows, diff, agree, fused, int8_drop)


if __name__ == "__main__":
    from tasks.wiring import main

    main("export")
