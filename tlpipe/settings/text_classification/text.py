"""Tokenizers: training a WordPiece vocabulary, loading a checkpoint's, encoding text.

No torch here: serving imports this module."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from tlpipe.params import TokenizerParams

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


def train_wordpiece(texts: Iterable[str], p: TokenizerParams) -> Tokenizer:
    """A BERT-style WordPiece tokenizer trained on `texts` ([CLS] text [SEP]); the same
    texts and params give the same vocabulary in every process."""
    texts = list(texts)
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=p.lowercase
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the word-inner pieces ("##e") in hash-map order, which changes from
    # process to process, and breaks ties between equally frequent merges by those numbers,
    # so the vocabulary itself changed from run to run (huggingface/tokenizers#1794). Named
    # up front, in sorted order, they are numbered the same every time.
    inner = sorted(
        {
            c
            for t in texts
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))
            for c in word[1:]
        }
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=p.vocab_size,
        min_frequency=p.min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in inner)],
        show_progress=False,
    )
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    trained.normalizer, trained.pre_tokenizer = normalizer, pre_tokenizer
    trained.train_from_iterator(texts, trainer=trainer)
    # The same vocabulary, with only the real special tokens special: "##e" in a text is text.
    tok = Tokenizer(
        models.WordPiece(
            trained.get_vocab(with_added_tokens=False), unk_token="[UNK]", max_input_chars_per_word=100
        )
    )
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The fast tokenizer of a checkpoint directory, with no padding or truncation set."""
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {TOKENIZER_FILE}")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    unk: int

    @classmethod
    def of(cls, tok: Tokenizer) -> SpecialIds:
        ids = {name: tok.token_to_id(f"[{name.upper()}]") for name in ("pad", "cls", "sep", "mask", "unk")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        return cls(**ids)


def encode(
    tok: Tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head"
) -> list[np.ndarray]:
    """Token ids per text ([CLS] ... [SEP]), unpadded, at most `max_length`: a longer text
    keeps its first tokens (`head`), or the first quarter and the last three quarters of
    the room between its special tokens (`head_tail`)."""
    if truncation == "head":
        tok.enable_truncation(max_length)
        try:
            encs = tok.encode_batch(list(texts), add_special_tokens=True)
        finally:
            tok.no_truncation()
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]
    if truncation != "head_tail":
        raise ValueError(f"truncation must be head or head_tail, not {truncation!r}")
    tok.no_truncation()
    room = max_length - 2
    head = room // 4
    out = []
    for e in tok.encode_batch(list(texts), add_special_tokens=True):
        ids = np.asarray(e.ids, dtype=np.int64)
        if len(ids) > max_length:
            # [CLS] + head tokens + tail tokens + [SEP]
            ids = np.concatenate([ids[: 1 + head], ids[len(ids) - 1 - (room - head) :]])
        out.append(ids)
    return out


def truncated_share(tok: Tokenizer, texts: Sequence[str], max_length: int) -> float:
    """The share of `texts` longer than `max_length` tokens ([CLS] and [SEP] included):
    what `encode` cuts."""
    if not texts:
        return 0.0
    tok.no_truncation()
    lengths = [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=True)]
    return sum(n > max_length for n in lengths) / len(lengths)
