"""The image classifier's part of export: the ONNX graph over normalised images with a
dynamic batch axis, and the preprocessor and bundle.json beside it. Its graph needs no
offline fusion: onnxruntime's session optimisations fold batch norm into the convolutions.
Its int8 model is statically quantised, calibrated on the training and validation images."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlpipe.data import label_ids, read_split
from tlpipe.files import write_json
from tlpipe.quantize import quantize_static_int8
from tlpipe.serve import BUNDLE_JSON, SERVING_ROWS
from tlpipe.setting import Metric
from tlpipe.settings.image_classification import METRICS, SPEC
from tlpipe.settings.image_classification.classifier import predict_logits
from tlpipe.settings.image_classification.model import load_checkpoint
from tlpipe.settings.image_classification.preprocess import FILE as PREPROCESSOR_FILE
from tlpipe.settings.image_classification.serve import INPUT_NAME, BundleSpec, ImageBundle

# The int8 model's activation ranges are measured on at most this many training (then
# validation) images, in split order.
CALIBRATION_ROWS = 512


class ImageExporter:
    """finetune's checkpoint (the CNN with its preprocessor) and how it becomes a bundle."""

    setting = SPEC.name
    quality_metric: Metric = METRICS["accuracy"]

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.model, self.preprocessor = load_checkpoint(model_dir)
        self.labels = self.model.config.labels

    def write(self, bundle_dir: Path, opset: int) -> None:
        p = self.preprocessor
        sample = torch.zeros(2, p.channels, p.size, p.size)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self.model,
                (sample,),
                str(bundle_dir / "model.onnx"),
                input_names=[INPUT_NAME],
                output_names=["logits"],
                dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        shutil.copyfile(self.model_dir / PREPROCESSOR_FILE, bundle_dir / PREPROCESSOR_FILE)
        write_json(bundle_dir / BUNDLE_JSON, BundleSpec(labels=self.labels).to_json())
        write_json(bundle_dir / "labels.json", dict(enumerate(self.labels)))

    def parity_inputs(self, bundle_dir: Path, prepare_dir: Path) -> np.ndarray:
        return ImageBundle(bundle_dir).prepare(list(read_split(prepare_dir, "test")["image"]))

    def torch_outputs(self, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_logits(self.model, torch.from_numpy(inputs), self.preprocessor, batch_size)

    def optimize(self, src: Path, dst: Path) -> None:
        return None

    def quantize(self, src: Path, dst: Path, prepare_dir: Path) -> dict[str, Any]:
        images: list[bytes] = []
        for split in ("train", "val"):
            images += list(read_split(prepare_dir, split)["image"][: CALIBRATION_ROWS - len(images)])
        calibration = self.preprocessor.normalise(self.preprocessor.batch_pixels(images))
        return quantize_static_int8(src, dst, INPUT_NAME, calibration)

    def serving_inputs(self, prepare_dir: Path) -> list[Any]:
        return list(read_split(prepare_dir, "test")["image"].head(SERVING_ROWS))

    def checks(self, bundle_dir: Path, prepare_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """Nothing beyond the outputs' parity: a classifier's outputs are its logits."""
        return {}, []

    def quality(self, outputs: np.ndarray, prepare_dir: Path) -> float:
        y = label_ids(read_split(prepare_dir, "test"), self.labels)
        return float((outputs.argmax(1) == y).mean()) if len(y) else 0.0


EXPORTER = ImageExporter
