"""The layer groups of each text encoder family the setting supports.

Each family (a Hugging Face `model_type`) declares where its input embeddings and its
numbered blocks are, as patterns over parameter names below the base model (timm's group
matcher); everything else (the pooler, a classification or LM head) is the head. Freezing,
gradual unfreezing and layer-wise rates then act on the intended modules of any of them.
"""

from __future__ import annotations

from torch import nn

from tlpipe.transfer import LayerGroups

_BERT_LIKE = (r"^embeddings\.", r"^encoder\.layer\.(\d+)\.")
ENCODERS: dict[str, tuple[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": (r"^embeddings\.", r"^transformer\.layer\.(\d+)\."),
}


def layer_groups(model: nn.Module) -> LayerGroups:
    """The groups of a Hugging Face text model (a bare encoder, or one with a head), from its
    family's declaration. Raises ValueError naming an unsupported family."""
    config = model.config
    family = config.model_type
    if family not in ENCODERS:
        raise ValueError(
            f"layer groups are declared for encoder families {', '.join(sorted(ENCODERS))}, "
            f"not {family!r}: freezing and layer-wise learning rates cannot place its layers"
        )
    embeddings, block = ENCODERS[family]
    return LayerGroups.below_base(model, embeddings, block, int(config.num_hidden_layers))
