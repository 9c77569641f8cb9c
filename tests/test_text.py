"""Encoding text: a long text is cut to max_length by its head, or by its head and tail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tlpipe.settings.text_classification.text import SPECIAL_TOKENS, encode, load_tokenizer, truncated_share


@pytest.fixture(scope="module")
def long_and_short(pretrained: Path) -> tuple[object, list[str]]:
    words = ["delayed", "flight", "bag", "crew", "gate", "thanks", "great", "awful", "rude", "seat"]
    long = " ".join(words[i % len(words)] + f" {i}" for i in range(120))
    return load_tokenizer(pretrained), [long, "thanks for the great crew"]


def test_head_keeps_the_first_tokens(long_and_short: tuple) -> None:
    tok, texts = long_and_short
    full = encode(tok, texts, 10_000)
    cut = encode(tok, texts, 32)
    assert len(full[0]) > 32 and len(cut[0]) == 32
    assert np.array_equal(cut[0][:-1], full[0][:31]) and cut[0][-1] == full[0][-1]  # [SEP] kept
    assert np.array_equal(cut[1], full[1])


def test_head_tail_keeps_a_quarter_from_the_start_and_the_rest_from_the_end(long_and_short: tuple) -> None:
    tok, texts = long_and_short
    full = encode(tok, texts, 10_000)
    cut = encode(tok, texts, 32, "head_tail")
    # 30 tokens between [CLS] and [SEP]: the first 7 and the last 23.
    assert len(cut[0]) == 32 and cut[0][0] == full[0][0] and cut[0][-1] == full[0][-1]
    assert np.array_equal(cut[0][1:8], full[0][1:8])
    assert np.array_equal(cut[0][8:-1], full[0][-24:-1])
    assert np.array_equal(cut[1], full[1])  # short texts are not touched
    assert truncated_share(tok, texts, 32) == 0.5


def test_unknown_truncation_is_named(long_and_short: tuple) -> None:
    tok, texts = long_and_short
    with pytest.raises(ValueError, match="head or head_tail, not 'tail'"):
        encode(tok, texts, 32, "tail")


_TRAIN = """
import sys
import pandas as pd
from tlpipe.params import TokenizerParams
from tlpipe.settings.text_classification.text import train_wordpiece
texts = pd.read_csv(sys.argv[1], dtype=str)["text"].tolist()
print(train_wordpiece(texts, TokenizerParams(vocab_size=400, min_frequency=2)).to_str())
"""


def test_wordpiece_training_gives_one_vocabulary_in_every_process(sample_csv: Path) -> None:
    """The trainer's own order changes from process to process (a new hash seed each time)."""
    made = {
        subprocess.run(
            [sys.executable, "-c", _TRAIN, str(sample_csv)], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(4)
    }
    assert len(made) == 1
    tok = Tokenizer.from_str(made.pop())
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    # The word-inner pieces named up front are vocabulary, not special tokens.
    assert {t.content for t in tok.get_added_tokens_decoder().values()} == set(SPECIAL_TOKENS)
    assert tok.encode("delayed ##e").tokens[-4:] == ["#", "#", "e", "[SEP]"]
