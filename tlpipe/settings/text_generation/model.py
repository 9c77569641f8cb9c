"""The setting's language models, their layer groups and their checkpoints.

Two architectures: an LSTM language model (an embedding, stacked LSTM layers, the output
projection tied to the embedding) and a GPT-style decoder (a transformers GPT-2 config from
random initialisation). Both map token ids (B, T) to next-token logits (B, T, V) through
`logits`, carry their state between calls for incremental generation, and declare their
layer groups: depth 0 the embeddings (with the tied output projection), one group per
LSTM layer or transformer block, the head above (the LSTM's output bias, GPT's final layer
norm). A checkpoint is a directory of config.json, model.safetensors, the tokenizer and
tlpipe.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from tlpipe.checkpoint import META_FILE
from tlpipe.files import write_json
from tlpipe.settings.text_generation.tokenizer import TOKENIZER_FILE
from tlpipe.transfer import LayerGroups

# config.json's key that marks a tlpipe LSTM checkpoint (a Hugging Face one has model_type).
ARCHITECTURE_KEY = "tlpipe_architecture"
WEIGHTS_FILE = "model.safetensors"
# LSTM state between calls: (h, c), each (layers, B, H).
LstmState = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LstmConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    dropout: float


class LstmLM(nn.Module):
    """Embedding, `num_layers` LSTM layers of `hidden_size`, and the embedding's transpose
    (plus a bias) as the output projection (Press & Wolf 2017: tying saves V x H
    parameters and regularises)."""

    def __init__(self, config: LstmConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, h)
        # One module per layer: each is a layer group that can be frozen or re-initialised.
        self.layers = nn.ModuleList(nn.LSTM(h, h, batch_first=True) for _ in range(config.num_layers))
        self.drop = nn.Dropout(config.dropout)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # The embedding feeds the first LSTM and, tied, scores every output: at the usual
        # 0.05 std its inputs barely open the gates and training sits near the unigram
        # loss for hundreds of steps; at 0.3 it leaves that plateau within about a hundred.
        nn.init.normal_(self.embed.weight, std=0.3)

    def hidden(
        self, input_ids: torch.Tensor, state: LstmState | None = None
    ) -> tuple[torch.Tensor, LstmState]:
        """(the last layer's outputs (B, T, H), the state after the last position)."""
        x = self.drop(self.embed(input_ids))  # (B, T, H)
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            x, (h, c) = layer(x, None if state is None else (state[0][i : i + 1], state[1][i : i + 1]))
            x = self.drop(x)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))

    def forward(
        self, input_ids: torch.Tensor, state: LstmState | None = None
    ) -> tuple[torch.Tensor, LstmState]:
        """(logits (B, T, V), the state after the last position)."""
        x, state = self.hidden(input_ids, state)
        return nn.functional.linear(x, self.embed.weight, self.bias), state


def new_lstm(vocab_size: int, hidden_size: int, num_layers: int, dropout: float) -> LstmLM:
    return LstmLM(LstmConfig(vocab_size, hidden_size, num_layers, dropout))


def new_gpt(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    dropout: float,
    positions: int,
    eos: int,
) -> GPT2LMHeadModel:
    """A GPT-2-style decoder from random initialisation (pre-norm blocks, learned positions,
    the LM head tied to the token embedding)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        n_inner=4 * hidden_size,
        n_positions=positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, T, V) of either architecture."""
    if isinstance(model, LstmLM):
        return model(input_ids)[0]
    return model(input_ids=input_ids, use_cache=False).logits


def features(
    model: nn.Module, input_ids: torch.Tensor
) -> tuple[torch.Tensor, nn.Parameter, nn.Parameter | None] | None:
    """What the output projection reads, for a loss that fuses it: the hidden states (B, T, H)
    and the projection's weight (V, H) and bias (V,) or None, so that logits = hidden @
    weight.T + bias. None for a decoder family not declared in DECODERS (its logits may be
    scaled or capped after the projection)."""
    if isinstance(model, LstmLM):
        return model.hidden(input_ids)[0], model.embed.weight, model.bias
    if model.config.model_type not in DECODERS:
        return None
    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden, head.weight, head.bias


def context_limit(model: nn.Module) -> int | None:
    """The most positions the model reads at once (None: unbounded, an LSTM)."""
    if isinstance(model, LstmLM):
        return None
    return int(model.config.n_positions) if hasattr(model.config, "n_positions") else None


# Each decoder family's layer groups below its base model (timm's group matcher):
# (embeddings, numbered blocks); the rest (a final norm) is the head.
DECODERS: dict[str, tuple[str, str]] = {
    "gpt2": (r"^(wte|wpe)\.", r"^h\.(\d+)\."),
    "gpt_neox": (r"^embed_in\.", r"^layers\.(\d+)\."),
    "llama": (r"^embed_tokens\.", r"^layers\.(\d+)\."),
    "mistral": (r"^embed_tokens\.", r"^layers\.(\d+)\."),
    "qwen2": (r"^embed_tokens\.", r"^layers\.(\d+)\."),
}


def layer_groups(model: nn.Module) -> LayerGroups:
    """Depth of every parameter: 0 the embeddings (an LM head tied to them is the same
    tensor), 1..L the LSTM layers or decoder blocks, the head above. Raises ValueError for a
    decoder family without a declaration."""
    if isinstance(model, LstmLM):
        names = [name for name, _ in model.named_parameters()]
        return LayerGroups.match(names, r"^embed\.", r"^layers\.(\d+)\.", model.config.num_layers)
    family = model.config.model_type
    if family not in DECODERS:
        raise ValueError(
            f"layer groups are declared for decoder families {', '.join(sorted(DECODERS))}, "
            f"not {family!r}: freezing and layer-wise learning rates cannot place its layers"
        )
    embeddings, block = DECODERS[family]
    return LayerGroups.below_base(model, embeddings, block, int(model.config.num_hidden_layers))


def save_lm(model: nn.Module, tok: Tokenizer, out_dir: Path, meta: dict[str, Any]) -> None:
    """A self-contained checkpoint: config.json, model.safetensors, tokenizer.json, tlpipe.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, LstmLM):
        write_json(out_dir / "config.json", {ARCHITECTURE_KEY: "lstm", **asdict(model.config)})
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, out_dir / WEIGHTS_FILE
        )
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(str(out_dir / TOKENIZER_FILE))
    write_json(out_dir / META_FILE, meta)


def load_lm(model_dir: Path) -> nn.Module:
    """The language model of a checkpoint directory (a tlpipe LSTM, or any Hugging Face
    causal LM), in eval mode on the CPU."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    config = json.loads(config_path.read_text())
    if config.get(ARCHITECTURE_KEY) == "lstm":
        fields = {k: v for k, v in config.items() if k != ARCHITECTURE_KEY}
        model: nn.Module = LstmLM(LstmConfig(**fields))
        model.load_state_dict(load_file(model_dir / WEIGHTS_FILE))
    elif "model_type" in config:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        raise ValueError(f"{config_path}: neither a tlpipe LSTM nor a Hugging Face model config")
    return model.eval()


def is_decoder(model: nn.Module) -> bool:
    return isinstance(model, PreTrainedModel)
