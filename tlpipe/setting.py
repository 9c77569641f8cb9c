"""The interface every transfer setting implements, and the registry that finds one by name.

A setting (text and image classification; text generation is their peer) owns what is
particular to its data and models: how rows become batches, the models of each arm and
their layer groups, the loss, the metrics and their direction, the classical reference and
the trivial baseline, what forgetting means. The shared machinery (the training loop, the
strategies, the curve, the gate, the report) asks only this interface, so a new setting is
a new folder under `tlpipe/settings/`, not a branch in shared code.

Each setting is a package: its `__init__` declares it (a `SettingSpec`: the column roles
and the metrics params are checked against, no torch imported), its `setting` module
implements it (`SETTING`), its `export` module turns a checkpoint into a bundle
(`EXPORTER`), its `serve` module serves one on onnxruntime (`PREDICTOR`, no torch) and its
`report` module writes its parts of the report (`REPORT`, no torch), its `rows` module holds
its row rules (`ROWS`, no torch) and its `rules` module builds its validation suites
(`SUITE`, no torch); each is imported when first asked for.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from tlpipe.expectations import Frame
    from tlpipe.params import (
        DataParams,
        EncoderConfig,
        EvaluateParams,
        FinetuneParams,
        Params,
        PretrainParams,
        ValidateParams,
    )
    from tlpipe.report import Block, Section
    from tlpipe.resume import Resume
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


# What a classifier reports (either setting's primary metric, by `evaluate.metric`).
CLASSIFICATION_METRICS = {
    "accuracy": Metric("accuracy", "accuracy"),
    "macro_f1": Metric("macro_f1", "macro-F1"),
}


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

    def fast_paths(
        self, model: nn.Module, runtime: Runtime, seed: int | np.random.Generator
    ) -> contextlib.ExitStack:
        """The setting's fast paths for training `model` on `runtime`, active until closed
        (`seed`: host dropout's seed, or the generator it draws from)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the task draws from or holds between steps (its generators, a joint loss's
        pending source batches), saved with the loop's state; `{}` when nothing."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned."""
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
    # The pretraining objectives the setting trains a source model with (`pretrain_objective`).
    objectives: tuple[str, ...] = ("supervised",)
    # Whether the control may take another size than the source model's
    # (`evaluate.scratch_models` beyond null).
    sized_scratch: bool = False
    # Whether a target needs labels (`data.target.labels`); text generation reads plain text.
    labelled: bool = True
    # What the transfer arm may carry from the source model (`finetune.transfer`).
    carried: tuple[str, ...] = ("all",)
    # What the curve's sizes (`evaluate.sizes`) count (`Setting.units`).
    size_unit: str = "rows"
    # How the curve names the classical reference arm.
    reference_name: str = "reference"


@dataclass
class Arm:
    """A model ready to train: for transfer, which parameters came from the source model
    (the L2-SP anchors) and what the transfer objectives attached (`extras`: a setting's
    own, handed back to its `task`); `facts` are recorded in the stage's metrics."""

    model: nn.Module
    transferred: set[str] = field(default_factory=set)
    extras: Any = None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceRun:
    """A source model pretrain trained, with its preprocessor (saved beside it), held-out
    source metrics, the run's history (one row per log or validation, `history_fields`
    its columns) and its throughput."""

    model: nn.Module
    preprocessor: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    history_fields: tuple[str, ...]
    timing: dict[str, float]


class Setting(Protocol):
    """A setting's implementation; its name, roles, metrics and baseline_name are its spec's."""

    name: str
    roles: tuple[str, ...]
    metrics: Mapping[str, Metric]
    baseline_name: str

    def pretrain(
        self,
        p: PretrainParams,
        objective: str,
        labels: tuple[str, ...],
        train: pd.DataFrame,
        held_out: pd.DataFrame,
        init_dir: Path | None,
        resume: Resume | None = None,
    ) -> SourceRun:
        """The source model: `init_dir` continued, or a new one, trained with `objective`
        (`pretrain_objective`: masked-LM, supervised on the source's `labels`) on `train`,
        scored on `held_out`; its training resumed from `resume` where it saved a state."""
        ...

    def save_source(self, run: SourceRun, model_dir: Path, meta: dict[str, Any]) -> None:
        """The source model and its preprocessor as a self-contained checkpoint."""
        ...

    def resolve_init(self, init_from: str, p: PretrainParams, download_dir: Path) -> Path:
        """The local checkpoint directory `pretrain.init_from` names (`package:<module>`, a
        path or `s3://`), downloaded or converted into `download_dir` where it must be."""
        ...

    def copy_checkpoint(self, init_dir: Path, model_dir: Path) -> None:
        """A checkpoint taken as it is (no source, or no steps) into `model_dir`, checked to
        be one this setting can fine-tune."""
        ...

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
        self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The classical reference trained on `train` (its inputs prepared as the source
        model's preprocessor prepares them, where it needs one): (its `metrics` on test,
        training facts)."""
        ...

    def baseline(
        self, train: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> dict[str, float]:
        """What a trivial predictor (the majority class, a unigram model of `train`) scores
        on test, for every metric."""
        ...

    def units(self, rows: pd.DataFrame, source_dir: Path) -> np.ndarray | None:
        """What each row counts toward a curve size (`SettingSpec.size_unit`: a text's
        tokens), or None where every row counts one."""
        ...

    def examples(
        self, model: nn.Module, rows: pd.DataFrame, p: FinetuneParams, source_dir: Path
    ) -> list[dict[str, str]] | None:
        """A few of `model`'s outputs on `rows` the report shows beside each other for
        transfer and scratch (a language model's continuations), or None."""
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


class Exporter(Protocol):
    """One fine-tuned checkpoint on its way to a bundle: the setting's part of export,
    constructed as `EXPORTER(model_dir)`. The shared stage gates parity, picks the fused or
    the plain graph, quantises and gates int8."""

    # The setting's name, written into bundle.json (serving finds its predictor by it).
    setting: str
    # The score the int8 model is gated on, as the report names it.
    quality_metric: Metric

    def write(self, bundle_dir: Path, opset: int) -> None:
        """model.onnx, the preprocessor's files and the setting's part of bundle.json."""
        ...

    def parity_inputs(self, bundle_dir: Path, prepare_dir: Path) -> Any:
        """The test split as the bundle's own predictor prepares it."""
        ...

    def torch_outputs(self, inputs: Any, batch_size: int) -> np.ndarray:
        """The checkpoint's outputs on `inputs` in PyTorch (the last axis is argmax'd)."""
        ...

    def optimize(self, src: Path, dst: Path) -> dict[str, int] | None:
        """onnxruntime graph fusions for this model into `dst` (the fused operators'
        counts), or None when the model has none."""
        ...

    def quantize(self, src: Path, dst: Path, prepare_dir: Path) -> dict[str, Any]:
        """The int8 model of `src` into `dst` (calibrated, if at all, on the train and
        validation splits, never on test); what was done, for parity.json."""
        ...

    def quality(self, outputs: np.ndarray, prepare_dir: Path) -> float:
        """`quality_metric` of `outputs` on the test split."""
        ...

    def serving_inputs(self, prepare_dir: Path) -> list[Any]:
        """Real test inputs, raw as a client sends them (texts, encoded images, prompts):
        export records the bundle's predictions on them, and publish's serving check asks
        the downloaded bundle for the same ones."""
        ...

    def checks(self, bundle_dir: Path, prepare_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """The setting's own parity checks of the bundle beyond its outputs (a language
        model's greedy continuations): (what parity.json records, each failure)."""
        ...


class Predictor(Protocol):
    """A bundle loaded for serving on onnxruntime (no torch): the setting's preprocessing
    around the ONNX model, at one of the bundle's precisions; constructed as
    `PREDICTOR(path, threads=None, precision="fp32")`."""

    path: Path

    def outputs(self, inputs: Any, batch_size: int = 64) -> np.ndarray:
        """The model's raw outputs on already prepared inputs (`Exporter.parity_inputs`)."""
        ...

    def predict(self, rows: Sequence[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        """One prediction (a JSON-ready dict) per raw input row."""
        ...

    def score(self, rows: pd.DataFrame, batch_size: int = 64) -> dict[str, float]:
        """Every metric of the setting (`SettingSpec.metrics`) on a prepared split's rows,
        the way the bundle serves them: what the champion check compares."""
        ...

    @staticmethod
    def read_inputs(path: Path, column: str, chunk_rows: int) -> Iterator[list[Any]]:
        """Raw input rows of a file, streamed in chunks (what `tlpipe predict` reads)."""
        ...


class RowRules(Protocol):
    """A setting's row-level rules and row identity, as pandas masks over an input's rows
    (its `rows` module's `ROWS`; no torch): what prepare sets aside under `validate.rows:
    quarantine`, and what makes two rows the same item for de-duplication and leakage."""

    # The role whose column holds the item itself (`text`, `image`): an empty source has it.
    item: str

    def broken_rule(
        self, frame: pd.DataFrame, p: ValidateParams, labels: tuple[str, ...] | None
    ) -> pd.Series:
        """Per row, the name of the first rule it breaks, or None."""
        ...

    def identity(self, frame: pd.DataFrame) -> pd.Series:
        """Per row, the key two rows share when they hold the same item (None: no key)."""
        ...


class ReportSections(Protocol):
    """A setting's parts of the run's report and of a release's model card (its `report`
    module's `REPORT`; reads outputs only, no torch). The shared report writes the inputs'
    files and hashes, validation, the curve, the gate, the strategy and the lineage."""

    # How the curve names the classical reference arm, and a sentence on what it is.
    reference_name: str
    reference_note: str

    def inputs(self, params: Params) -> list[Block]:
        """What the target and the source are (the Data section's opening)."""
        ...

    def counts(self, params: Params, summary: dict[str, Any]) -> list[Block]:
        """The prepared splits' sizes (from prepare's summary.json)."""
        ...

    def shipped(self, params: Params, metrics: dict[str, Any], out: Path) -> Section:
        """The shipped model's section (its test scores and what explains them)."""
        ...

    def source_model(self, params: Params, out: Path) -> str:
        """One sentence on the source model pretrain made."""
        ...

    def forgetting(self, forgetting: dict[str, Any]) -> Section:
        """The section on the source task before and after fine-tuning."""
        ...

    def card(self, params: Params, metrics: dict[str, Any]) -> tuple[str, str]:
        """The model card's opening line and its line on the shipped model."""
        ...


# Every setting: its name in params (`setting:`) and its package.
SETTINGS = {
    "text-classification": "tlpipe.settings.text_classification",
    "image-classification": "tlpipe.settings.image_classification",
    "text-generation": "tlpipe.settings.text_generation",
}


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


def get_exporter(name: str) -> type[Exporter]:
    """The export half of the setting named `name` (its `export` module)."""
    return importlib.import_module(f"{_package(name)}.export").EXPORTER


def row_rules(name: str) -> RowRules:
    """The row rules of the setting named `name` (its `rows` module, no torch)."""
    return importlib.import_module(f"{_package(name)}.rows").ROWS


def validation_suite(
    name: str,
) -> Callable[[ValidateParams, DataParams, dict[str, pd.DataFrame]], list[Frame]]:
    """The validation suite builder of the setting named `name` (its `rules` module's
    `SUITE(p, data, splits) -> [tlpipe.expectations.Frame]`; no torch)."""
    return importlib.import_module(f"{_package(name)}.rules").SUITE


def report_sections(name: str) -> ReportSections:
    """The report sections of the setting named `name` (its `report` module, no torch)."""
    return importlib.import_module(f"{_package(name)}.report").REPORT


def predictor(name: str) -> type[Predictor]:
    """The serving predictor of the setting named `name` (its `serve` module: onnxruntime,
    no torch)."""
    return importlib.import_module(f"{_package(name)}.serve").PREDICTOR


def primary_metric(setting: Setting | SettingSpec, key: str) -> Metric:
    """The setting's metric `key` (evaluate.metric), or a ValueError naming the choices."""
    if key not in setting.metrics:
        raise ValueError(
            f"evaluate.metric {key!r} is not a {setting.name} metric; "
            f"choose one of {', '.join(setting.metrics)}"
        )
    return setting.metrics[key]


__all__ = [
    "CLASSIFICATION_METRICS",
    "SETTINGS",
    "Arm",
    "Exporter",
    "Metric",
    "Predictor",
    "ReportSections",
    "RowRules",
    "Setting",
    "SettingSpec",
    "SourceRun",
    "TrainTask",
    "get_exporter",
    "get_setting",
    "predictor",
    "primary_metric",
    "report_sections",
    "row_rules",
    "spec",
    "validation_suite",
]
