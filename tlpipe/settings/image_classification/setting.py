"""The image-classification setting: the `tlpipe.setting.Setting` its stages and the shared
machinery call, over this folder's modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from tlpipe.checkpoint import read_meta
from tlpipe.data import label_ids, read_split, source_split
from tlpipe.errors import DataError
from tlpipe.images import image_facts
from tlpipe.metrics import majority_scores, probe_accuracy
from tlpipe.params import AugmentParams, DataParams, EncoderConfig, EvaluateParams, FinetuneParams
from tlpipe.setting import Arm, SourceRun
from tlpipe.settings.image_classification import SPEC, classifier, reference
from tlpipe.settings.image_classification import pretrain as source_model
from tlpipe.settings.image_classification.model import Cnn, build, load_checkpoint, save_checkpoint
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.train import Runtime
from tlpipe.transfer import LayerGroups


def _source_images(
    alpha: float, source_dir: Path, prepare_dir: Path, prep: Preprocessor, labels: tuple[str, ...],
    head: nn.Module | None,
) -> classifier.SourceImages:  # fmt: skip
    """The source rows pretrain trained on, augmented as its tlpipe.json says pretrain did
    (not at all for a checkpoint that does not say)."""
    _, trained_on = source_split(read_split(prepare_dir, "source"))
    if "label" not in trained_on.columns:
        raise DataError("finetune.joint_alpha trains on labelled source images; data.source has no labels")
    pretrained = read_meta(source_dir).get("params", {}).get("augment")
    augment = classifier.Augment.of(AugmentParams(**pretrained)) if pretrained else classifier.Augment()
    return classifier.SourceImages(
        classifier.pixels(trained_on, prep), label_ids(trained_on, labels), alpha, augment, head
    )


class ImageClassification:
    name = SPEC.name
    roles = SPEC.roles
    metrics = SPEC.metrics
    baseline_name = SPEC.baseline_name

    pretrain = staticmethod(source_model.train_source)
    copy_checkpoint = staticmethod(source_model.copy_checkpoint)
    resolve_init = staticmethod(source_model.resolve_init)

    def save_source(self, run: SourceRun, model_dir: Path, meta: dict[str, Any]) -> None:
        save_checkpoint(run.model, run.preprocessor, model_dir, meta)

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return model.layer_groups()

    def transfer_arm(self, p: FinetuneParams, data: DataParams, source_dir: Path, prepare_dir: Path) -> Arm:
        """The source model; its head kept when it was trained on the target's labels, else a
        new one. Every parameter that came from the source model is an L2-SP anchor. Under
        the joint objective, the labelled source images pretrain trained on (not those it
        held out) come along, with the source's own head when the target got a new one."""
        model, prep = load_checkpoint(source_dir)
        source_labels = model.config.labels
        kept = source_labels == data.labels
        before = {name: id(q) for name, q in model.named_parameters()}
        old_head = None if kept else model.head
        if not kept:
            model.new_head(data.labels)
        transferred = {name for name, q in model.named_parameters() if before.get(name) == id(q)}
        extras = None
        if p.joint_alpha:
            extras = _source_images(p.joint_alpha, source_dir, prepare_dir, prep, source_labels, old_head)
        return Arm(model, transferred, extras, {"head": "transferred" if kept else "new"})

    def scratch_arm(self, data: DataParams, source_dir: Path, size: EncoderConfig | None) -> Arm:
        """The source model's architecture, randomly initialised, with the target's head
        (params admit no other size for images)."""
        model = build(source_dir)
        model.new_head(data.labels)
        return Arm(model)

    def task(
        self,
        arm: Arm,
        train: pd.DataFrame,
        val: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime,
    ) -> classifier.ImageTask:
        prep = Preprocessor.load(source_dir)
        return classifier.image_task(arm, train, val, p, data.labels, prep, runtime)

    def score(
        self,
        model: nn.Module,
        rows: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime | None = None,
    ) -> dict[str, float]:
        return classifier.score(model, rows, p, data.labels, Preprocessor.load(source_dir), runtime)

    def reference(
        self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Logistic regression on the pixels the source model's preprocessor makes."""
        prep = Preprocessor.load(source_dir)
        arrays = []
        for rows in (train, val, test):
            arrays += [classifier.pixels(rows, prep).numpy(), label_ids(rows, data.labels)]
        return reference.reference_run(*arrays, len(data.labels))

    def baseline(
        self, train: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> dict[str, float]:
        return majority_scores(label_ids(test, data.labels), len(data.labels))

    def units(self, rows: pd.DataFrame, source_dir: Path) -> None:
        return None

    def examples(self, model: nn.Module, rows: pd.DataFrame, p: FinetuneParams, source_dir: Path) -> None:
        return None

    def shipped(
        self, model_dir: Path, test: pd.DataFrame, p: FinetuneParams, data: DataParams, out_dir: Path
    ) -> tuple[nn.Module, dict[str, Any]]:
        return classifier.shipped(model_dir, test, p, data.labels, out_dir)

    def save(self, model: nn.Module, source_dir: Path, out_dir: Path, meta: dict[str, Any]) -> None:
        save_checkpoint(model, Preprocessor.load(source_dir), out_dir, meta)

    def input_facts(
        self, splits: dict[str, pd.DataFrame], p: FinetuneParams, source_dir: Path
    ) -> dict[str, Any]:
        """The share of each split's images the preprocessor resized and the share whose
        channels it converted."""
        prep = Preprocessor.load(source_dir)
        facts: dict[str, Any] = {"size": prep.size, "channels": prep.channels}
        for name, rows in splits.items():
            found = image_facts(rows["image"])
            n = max(len(found), 1)
            resized = (found["width"] != prep.size) | (found["height"] != prep.size)
            facts[f"{name}_resized_share"] = float(resized.fillna(True).sum() / n)
            converted = found["channels"] != prep.channels
            facts[f"{name}_converted_share"] = float(converted.fillna(True).sum() / n)
        return {"preprocessed": facts}

    def forgetting(
        self,
        p: EvaluateParams,
        ft: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        model: nn.Module,
        prepare_dir: Path,
    ) -> dict[str, Any]:
        """A linear probe's accuracy on a labelled source's labels over the pooled backbone
        features of the source model and of the fine-tuned one, on the source rows pretrain
        held out."""
        report: dict[str, Any] = {
            "source": data.source_kind,
            "source_rows": 0,
            "probe_accuracy_before": None,
            "probe_accuracy_after": None,
        }
        labels = data.source_labels
        if labels is None:
            return report
        held_out, _ = source_split(read_split(prepare_dir, "source"))
        picked = held_out.iloc[: p.forgetting_rows]
        report["source_rows"] = len(picked)
        if not len(picked):
            return report
        source, prep = load_checkpoint(source_dir)
        x = classifier.pixels(picked, prep)
        y = label_ids(picked, labels)
        runtime = Runtime.pick(ft.device, ft.precision)
        before = _features(source, x, prep, ft.eval_batch_size, runtime)
        after = _features(model, x, prep, ft.eval_batch_size, runtime)
        report["probe_accuracy_before"] = probe_accuracy(before, y, len(labels), ft.seed)
        report["probe_accuracy_after"] = probe_accuracy(after, y, len(labels), ft.seed)
        return report


@torch.no_grad()
def _features(
    model: Cnn | nn.Module, pixels: torch.Tensor, prep: Preprocessor, batch_size: int, runtime: Runtime
) -> torch.Tensor:
    """Pooled backbone features (N, D) on the CPU, computed on `runtime`."""
    model.eval().to(runtime.device)
    out = []
    for i in range(0, len(pixels), batch_size):
        x = classifier.model_input(pixels[i : i + batch_size].to(runtime.device), prep)
        with runtime.autocast():
            out.append(model.features(x).float().cpu())
    model.to("cpu")
    return torch.cat(out)


SETTING = ImageClassification()
