"""The text-classification setting: the `tlpipe.setting.Setting` its stages and the shared
machinery call, over this folder's modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from tlpipe.checkpoint import resolve_init
from tlpipe.data import label_ids, texts
from tlpipe.metrics import majority_scores
from tlpipe.params import DataParams, EncoderConfig, EvaluateParams, FinetuneParams, PretrainParams
from tlpipe.setting import Arm, SourceRun
from tlpipe.settings.text_classification import (
    SPEC,
    arms,
    classifier,
    forgetting,
    layers,
    reference,
)
from tlpipe.settings.text_classification.model import save_checkpoint
from tlpipe.settings.text_classification.pretrain import copy_checkpoint, train_source
from tlpipe.settings.text_classification.text import load_tokenizer, truncated_share
from tlpipe.train import Runtime
from tlpipe.transfer import LayerGroups


class TextClassification:
    name = SPEC.name
    roles = SPEC.roles
    metrics = SPEC.metrics
    baseline_name = SPEC.baseline_name

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return layers.layer_groups(model)

    def transfer_arm(self, p: FinetuneParams, data: DataParams, source_dir: Path, prepare_dir: Path) -> Arm:
        return arms.transfer_arm(p, data.labels, source_dir, prepare_dir)

    def scratch_arm(self, data: DataParams, source_dir: Path, size: EncoderConfig | None) -> Arm:
        return arms.scratch_arm(data, source_dir, size)

    def task(
        self,
        arm: Arm,
        train: pd.DataFrame,
        val: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime,
    ) -> classifier.ClassifierTask:
        return classifier.classifier_task(
            arm, train, val, p, data.labels, load_tokenizer(source_dir), runtime
        )

    def score(
        self,
        model: nn.Module,
        rows: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime | None = None,
    ) -> dict[str, float]:
        return classifier.score(model, rows, p, data.labels, source_dir, runtime)

    def reference(
        self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> tuple[dict[str, float], dict[str, Any]]:
        return reference.reference_run(train, val, test, data.labels)

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

    pretrain = staticmethod(train_source)
    copy_checkpoint = staticmethod(copy_checkpoint)

    def resolve_init(self, init_from: str, p: PretrainParams, download_dir: Path) -> Path:
        return resolve_init(init_from, download_dir)

    def save_source(self, run: SourceRun, model_dir: Path, meta: dict[str, Any]) -> None:
        save_checkpoint(run.model, run.preprocessor, model_dir, meta)

    def save(self, model: nn.Module, source_dir: Path, out_dir: Path, meta: dict[str, Any]) -> None:
        save_checkpoint(model, load_tokenizer(source_dir), out_dir, meta)

    def input_facts(
        self, splits: dict[str, pd.DataFrame], p: FinetuneParams, source_dir: Path
    ) -> dict[str, Any]:
        """How many rows of each split were longer than max_length tokens, and how they were cut."""
        tok = load_tokenizer(source_dir)
        shares = {
            f"{name}_share": truncated_share(tok, texts(rows), p.max_length) for name, rows in splits.items()
        }
        return {"truncated": {"max_length": p.max_length, "truncation": p.truncation, **shares}}

    def forgetting(
        self,
        p: EvaluateParams,
        ft: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        model: nn.Module,
        prepare_dir: Path,
    ) -> dict[str, Any]:
        return forgetting.forgetting(p, ft, data, source_dir, model, prepare_dir)


SETTING = TextClassification()
