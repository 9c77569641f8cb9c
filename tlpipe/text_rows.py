"""The row-level rules of a text input (both text settings'), as pandas masks: what prepare
sets aside under `validate.rows: quarantine` (each setting's rules module checks the same
rules with Great Expectations), and what makes two rows the same text (de-duplication,
leakage). An input without a label column gets the text rules alone.
"""

from __future__ import annotations

import pandas as pd

from tlpipe.data import normalise_text, undecodable
from tlpipe.params import ValidateParams


def broken_rule(frame: pd.DataFrame, p: ValidateParams, labels: tuple[str, ...] | None) -> pd.Series:
    """Per row, the first rule it breaks (None when it breaks none), in validate's order:
    undecodable bytes (possible only when the input's `encoding_errors` is strict), a null,
    blank, too short or too long text, a null label or one outside `labels` (when
    labelled)."""
    text = frame["text"]
    rules: list[tuple[str, pd.Series]] = [
        ("text_decodes", undecodable(frame)),
        ("text_not_null", text.isna()),
        ("text_not_blank", ~text.fillna("").str.contains(r"\S", regex=True)),
        ("text_length", ~text.fillna("").str.len().between(p.min_chars, p.max_chars)),
    ]
    if labels is not None and "label" in frame.columns:
        label = frame["label"]
        rules += [("label_not_null", label.isna()), ("label_in_set", label.notna() & ~label.isin(labels))]
    broken = pd.Series(None, index=frame.index, dtype="object")
    for name, mask in reversed(rules):
        broken = broken.mask(mask.fillna(False).astype(bool), name)
    return broken


def identity(frame: pd.DataFrame) -> pd.Series:
    """What makes two rows the same item: their normalised text (None for a null text)."""
    return normalise_text(frame["text"])


class TextRows:
    item = "text"
    broken_rule = staticmethod(broken_rule)
    identity = staticmethod(identity)
