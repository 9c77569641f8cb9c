"""int8 ONNX models: dynamic quantisation for graphs of matrix products (transformers),
static QDQ quantisation calibrated on training inputs for convolutional networks.

Each returns what it did, for export's parity.json. onnxruntime's dynamic quantisation
turns a convolution into ConvInteger, which its CPU provider runs far slower than its fp32
convolution (the image example's CNN: 9.4x slower at batch 64 on 2 cores); a static QDQ
graph runs as fused int8 QLinearConv, 2.5x faster than fp32 (`python -m bench.image`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Calibration inputs go through the graph this many at a time. The min-max calibrator keeps
# only each tensor's per-batch minimum and maximum, so memory is one batch's activations.
# (Its CalibMaxIntermediateOutputs option discards the batches it has collected instead of
# folding them into the ranges, onnxruntime 1.32: it is not used.)
CALIBRATION_BATCH = 32


@contextlib.contextmanager
def _quantiser_notes_dropped() -> Iterator[None]:
    """onnxruntime's quantiser logs a warning on the root logger for every tensor it leaves
    in float (integer shape arithmetic, such as EfficientNet's padding, included) and for a
    graph without its pre-processing; while inside, those are dropped (errors pass)."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or "onnxruntime/quantization" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_dynamic_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic quantisation: int8 weights for matrix products, attention and the embedding
    tables, one scale per output channel; activations quantised on the fly. (One scale per
    tensor lost 1.35 points of test accuracy on the different-labels example, per channel
    0.25.)"""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused contrib ops (Attention, BiasGelu) defeat ONNX shape inference:
    # their outputs are fp32.
    with _quantiser_notes_dropped():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"method": "dynamic", "weights": "int8, per output channel", "activations": "int8 on the fly"}


def quantize_static_int8(src: Path, dst: Path, input_name: str, calibration: np.ndarray) -> dict[str, Any]:
    """Static QDQ quantisation of `src` into `dst`: int8 weights (symmetric, one scale per
    output channel) and uint8 activations whose ranges are the min and max seen on
    `calibration`, the graph's own float32 inputs (N, ...). ValueError when there are none.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not len(calibration):
        raise ValueError("static int8 quantisation needs calibration inputs; none were given")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = (
                {input_name: calibration[i : i + CALIBRATION_BATCH]}
                for i in range(0, len(calibration), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, _quantiser_notes_dropped():
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and constant folding first: the quantiser places QDQ pairs
        # by the inferred types, and batch norm folds into the convolutions before their
        # weights are quantised.
        quant_pre_process(str(src), str(prepared))
        quantize_static(
            str(prepared),
            str(dst),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # uint8 activations against int8 weights: x86's VNNI dot product multiplies
            # u8 by s8, where s8 x s8 takes a conversion first (EfficientNet-Lite0 at 32 px,
            # batch 64, ran 2.3x faster than with int8 activations at the same test
            # accuracy, side by side on an AMD EPYC).
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "method": "static QDQ",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, min-max calibrated",
        "calibration_rows": len(calibration),
    }
