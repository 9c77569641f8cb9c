"""The byte-level BPE tokenizer and corpora as token streams.

A byte-level vocabulary starts from the 256 byte values, so any text, target-only words,
emoji and other scripts included, encodes without an unknown token: a word the source
never saw costs more tokens, never a lost one. No torch here: serving imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tlpipe.params import TokenizerParams

# Ends every text and begins the first one: the model learns where a text stops, and a
# prompt is read as the start of a new text.
EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], p: TokenizerParams) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer of at most `p.vocab_size` tokens (the 256
    bytes, EOS and the merges) trained on `texts`; NFC-normalised, lowercased if
    `p.lowercase`."""
    tok = Tokenizer(models.BPE())
    steps: list[normalizers.Normalizer] = [normalizers.NFC()]
    if p.lowercase:
        steps.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=p.vocab_size,
        min_frequency=p.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tok: Tokenizer) -> int:
    found = tok.token_to_id(EOS)
    if found is None:
        raise ValueError(f"the tokenizer has no {EOS} token: it was not made for text generation")
    return found


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Each text's token ids, without EOS."""
    encs = tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]


def token_stream(tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """The texts as one stream, EOS t1 EOS t2 ... tn EOS (int32): every text is read from a
    text boundary and ends with EOS, which the model predicts like any other token."""
    eos = np.array([eos_id(tok)], dtype=np.int32)
    parts = [eos]
    for ids in encode_texts(tok, texts):
        parts += [ids, eos]
    return np.concatenate(parts)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of a checkpoint or bundle directory."""
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {TOKENIZER_FILE}")
    return Tokenizer.from_file(str(path))
