"""The text setting's models and checkpoints: BERT-family encoders with a masked-LM or a
classification head, and checkpoint directories of Hugging Face weights and config, the
tokenizer and tlpipe.json.

A checkpoint rebuilds everything on its own: fine-tuning, export and serving read nothing
but its directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from tlpipe.checkpoint import META_FILE
from tlpipe.files import write_json
from tlpipe.params import EncoderConfig

log = logging.getLogger(__name__)


def bert_config(p: EncoderConfig, vocab_size: int, pad_id: int, max_positions: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        intermediate_size=p.intermediate_size,
        hidden_dropout_prob=p.dropout,
        attention_probs_dropout_prob=p.dropout,
        max_position_embeddings=max_positions,
        pad_token_id=pad_id,
    )


def load_mlm(model_dir: Path) -> PreTrainedModel:
    """A masked-LM model from a checkpoint; an encoder-only checkpoint gets a new LM head."""
    return AutoModelForMaskedLM.from_pretrained(model_dir)


def new_mlm(config: BertConfig) -> PreTrainedModel:
    return BertForMaskedLM(config)


def mlm_head(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    """(encoder, head): the head maps hidden states (N, H) to vocabulary logits (N, V)."""
    for enc_name, head_name in (("bert", "cls"), ("roberta", "lm_head")):
        enc, head = getattr(model, enc_name, None), getattr(model, head_name, None)
        if enc is not None and head is not None:
            return enc, head
    raise TypeError(f"masked-LM training supports BERT and RoBERTa models, not {type(model).__name__}")


def load_classifier(model_dir: Path, labels: tuple[str, ...]) -> PreTrainedModel:
    """The encoder of a checkpoint with a new classification head for `labels`."""
    return load_transfer_classifier(model_dir, labels)[0]


def load_transfer_classifier(model_dir: Path, labels: tuple[str, ...]) -> tuple[PreTrainedModel, set[str]]:
    """`load_classifier`, and the names of the parameters whose values came from the checkpoint.

    A classifier checkpoint for the same labels in the same order (a supervised source
    model) keeps its head; every other checkpoint gets a new one, even when its head has
    the right shape.
    """
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, output_loading_info=True, ignore_mismatched_sizes=True, **_label_kwargs(labels)
    )
    new = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    if classifier_labels(model_dir) not in (None, labels):
        new |= _reset_head(model)
    return model, {name for name, _ in model.named_parameters() if name not in new}


@torch.no_grad()
def _reset_head(model: PreTrainedModel) -> set[str]:
    """Every parameter outside the encoder back to BERT's initialisation; returns their names."""
    std = getattr(model.config, "initializer_range", 0.02)
    prefix = f"{model.base_model_prefix}."
    reset = set()
    for name, module in model.named_modules():
        if not name or name == model.base_model_prefix or name.startswith(prefix):
            continue
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        reset |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return reset


def classifier_labels(model_dir: Path) -> tuple[str, ...] | None:
    """The labels a sequence-classifier checkpoint was trained on, in head order (None for
    any other checkpoint)."""
    config = AutoConfig.from_pretrained(model_dir)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or ()):
        return None
    return tuple(str(config.id2label[i]) for i in range(config.num_labels))


def new_classifier(config: BertConfig, labels: tuple[str, ...]) -> PreTrainedModel:
    """A randomly initialised classifier for `labels` on an encoder of `config`."""
    config.update(_label_kwargs(labels))
    return AutoModelForSequenceClassification.from_config(config)


def scratch_classifier(
    model_dir: Path, labels: tuple[str, ...], encoder: EncoderConfig | None = None
) -> PreTrainedModel:
    """A randomly initialised classifier on the checkpoint's vocabulary (the scratch control):
    the checkpoint's own architecture, or an encoder of the size `encoder` gives."""
    config = AutoConfig.from_pretrained(model_dir)
    if encoder is not None:
        config = bert_config(encoder, config.vocab_size, config.pad_token_id, config.max_position_embeddings)
    return new_classifier(config, labels)


def tied_mlm_head(model_dir: Path, classifier: PreTrainedModel) -> nn.Module:
    """The checkpoint's masked-LM head (a new one if it has none), its decoder tied to the
    classifier's input embeddings, so masked-LM on the classifier's encoder trains both."""
    mlm = load_mlm(model_dir)
    _, head = mlm_head(mlm)
    mlm.get_output_embeddings().weight = classifier.get_input_embeddings().weight
    return head


def has_mlm_head(model_dir: Path) -> bool:
    """Whether the checkpoint carries trained masked-LM head weights."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return any(k.startswith(("cls.predictions.transform", "lm_head.dense")) for k in f.keys())  # noqa: SIM118


def _label_kwargs(labels: tuple[str, ...]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def save_checkpoint(model: PreTrainedModel, tok: Tokenizer, out_dir: Path, meta: dict[str, Any]) -> None:
    """Weights (safetensors), config, tokenizer files and tlpipe.json (params, input hashes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=int(meta.get("max_length", 512)),
    )
    fast.save_pretrained(out_dir)
    write_json(out_dir / META_FILE, meta)


__all__ = [
    "bert_config",
    "classifier_labels",
    "has_mlm_head",
    "load_classifier",
    "load_mlm",
    "load_transfer_classifier",
    "mlm_head",
    "new_classifier",
    "new_mlm",
    "save_checkpoint",
    "scratch_classifier",
    "tied_mlm_head",
]
