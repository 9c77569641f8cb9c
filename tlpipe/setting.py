"""The interface every transfer setting implements, and the registry that finds one by name.

A setting (text classification today; image classification and text generation are its
peers) owns what is particular to its data and models: how rows become batches, the
models of each arm and their layer groups, the loss, the metrics and their direction, the
classical reference and the trivial baseline, what forgetting means. The shared machinery
(the training loop, the strategies, the curve, the gate, the report) asks only this
interface, so a new setting is a new folder under `tlpipe/settings/`, not a branch in
shared code.

Each setting is a package: its `__init__` declares it (a `SettingSpec`: the column roles
and the metrics params are checked against, no torch imported), its `setting` module
implements it (`SETTING`), imported when a stage first asks for it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from tlpipe.params import DataParams, EncoderConfig, EvaluateParams, FinetuneParams
    from tlpipe.train import Runtime
    from tlpipe.transfer import LayerGroups


@dataclass(frozen=True)
class Metric:
    """A score a setting reports: its key, how people write it, and which way is better."""

    key: str
    label: str
    higher_is_better: bool = True

    def gain(self, transfer: float, scratch: float) -> float:
        """How much better transfer is than scratch (positive: transfer is better)."""
        return transfer - scratch if self.higher_is_better else scratch - transfer

    def better(self, score: float, than: float) -> bool:
        return score > than if self.higher_is_better else score < than

    @property
    def worst(self) -> float:
        return -float("inf") if self.higher_is_better else float("inf")


class TrainTask(Protocol):
    """One model's training data, loss and validation, as the shared loop sees them."""

    rows: int
    # The validation score that keeps the best weights (a key `validate` returns).
    selection: Metric

    def epoch(self, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch's batches of training-row indices (the loop takes them from the end)."""
        ...

    def loss(self, model: nn.Module, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """The mean loss of the rows `idx` (the loop runs it under the runtime's autocast)."""
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Scores on the validation rows, keyed `val_<metric>`."""
        ...

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the model the loss trains (a tied source head), else none."""
        ...

    def fast_paths(self, model: nn.Module, runtime: Runtime, seed: int) -> contextlib.ExitStack:
        """The setting's fast paths for training `model` on `runtime`, active until closed."""
        ...


@dataclass(frozen=True)
class SettingSpec:
    """What params need to know of a setting, without importing its machinery."""

    name: str
    # The columns an input's rows are read from, by role (`data.*.columns`): a target needs
    # every role, a source the first.
    roles: tuple[str, ...]
    # Every metric the setting reports; `evaluate.metric` picks the primary one.
    metrics: Mapping[str, Metric]
    # The trivial predictor `Setting.baseline` scores ("majority class").
    baseline_name: str


@dataclass
class Arm:
    """A model ready to train: for transfer, which parameters came from the source model
    (the L2-SP anchors) and what the transfer objectives attached (`extras`: a setting's
    own, handed back to its `task`); `facts` are recorded in the stage's metrics."""

    model: nn.Module
    transferred: set[str] = field(default_factory=set)
    extras: Any = None
    facts: dict[str, Any] = field(default_factory=dict)


class Setting(Protocol):
    """A setting's implementation; its name, roles, metrics and baseline_name are its spec's."""

    name: str
    roles: tuple[str, ...]
    metrics: Mapping[str, Metric]
    baseline_name: str

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        """The depth of each parameter of `model` (its architecture's declared groups)."""
        ...

    def transfer_arm(self, p: FinetuneParams, data: DataParams, source_dir: Path, prepare_dir: Path) -> Arm:
        """The source model with the target's head, its transfer objectives attached."""
        ...

    def scratch_arm(self, data: DataParams, source_dir: Path, size: EncoderConfig | None) -> Arm:
        """A randomly initialised model for the target (the control), of the source model's
        architecture or of `size`, with the source model's preprocessor."""
        ...

    def task(
        self,
        arm: Arm,
        train: pd.DataFrame,
        val: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime,
    ) -> TrainTask:
        """What the shared loop trains `arm` on: `train`, validated on `val`."""
        ...

    def score(
        self,
        model: nn.Module,
        rows: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime | None = None,
    ) -> dict[str, float]:
        """Every metric of `metrics` for `model` on `rows`, in fp32 unless `runtime` says
        otherwise."""
        ...

    def reference(
        self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, data: DataParams
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The classical reference trained on `train`: (its `metrics` on test, training facts)."""
        ...

    def baseline(self, test: pd.DataFrame, data: DataParams) -> dict[str, float]:
        """What a trivial predictor (the majority class, a unigram model) scores on test,
        for every metric."""
        ...

    def shipped(
        self, model_dir: Path, test: pd.DataFrame, p: FinetuneParams, data: DataParams, out_dir: Path
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The shipped model on test: (the model, its metrics with the setting's detail);
        writes the setting's own test plots under `out_dir`."""
        ...

    def save(self, model: nn.Module, source_dir: Path, out_dir: Path, meta: dict[str, Any]) -> None:
        """A self-contained checkpoint of `model` in `out_dir`: weights (safetensors), config,
        the preprocessor of `source_dir`'s checkpoint, and `meta` (tlpipe.json)."""
        ...

    def input_facts(
        self, splits: dict[str, pd.DataFrame], p: FinetuneParams, source_dir: Path
    ) -> dict[str, Any]:
        """What the preprocessor did to each split's rows that a reader should know (the
        share of texts cut to max_length), for the stage's metrics."""
        ...

    def forgetting(
        self,
        p: EvaluateParams,
        ft: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        model: nn.Module,
        prepare_dir: Path,
    ) -> dict[str, Any]:
        """The source task before and after fine-tuning."""
        ...


# Every setting: its name in params (`setting:`) and its package.
SETTINGS = {"text-classification": "tlpipe.settings.text_classification"}


def _package(name: str) -> str:
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[name]


def spec(name: str) -> SettingSpec:
    """The declaration of the setting named `name` (one of SETTINGS)."""
    return importlib.import_module(_package(name)).SPEC


def get_setting(name: str) -> Setting:
    """The implementation of the setting named `name` (imports its machinery)."""
    return importlib.import_module(f"{_package(name)}.setting").SETTING


def primary_metric(setting: Setting | SettingSpec, key: str) -> Metric:
    """The setting's metric `key` (evaluate.metric), or a ValueError naming the choices."""
    if key not in setting.metrics:
        raise ValueError(
            f"evaluate.metric {key!r} is not a {setting.name} metric; "
            f"choose one of {', '.join(setting.metrics)}"
        )
    return setting.metrics[key]


__all__ = [
    "SETTINGS",
    "Arm",
    "Metric",
    "Setting",
    "SettingSpec",
    "TrainTask",
    "get_setting",
    "primary_metric",
    "spec",
]
