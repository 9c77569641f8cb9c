"""The row-level rules every input's rows must meet, as pandas masks: what prepare sets aside
under `validate.rows: quarantine` (validate checks the same rules with Great Expectations).
"""

from __future__ import annotations

import pandas as pd

from tlpipe.data import UNDECODABLE
from tlpipe.params import ValidateParams


def undecodable(frame: pd.DataFrame) -> pd.Series:
    """Rows that held a byte that did not decode (marked by a strict read_input)."""
    if UNDECODABLE not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame[UNDECODABLE].astype(bool)


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
