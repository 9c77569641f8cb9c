"""The row-level rules every input's rows must meet, as pandas masks: what prepare sets aside
under `validate.rows: quarantine` (validate checks the same rules with Great Expectations).
"""

from __future__ import annotations

import pandas as pd

from tlpipe.params import ValidateParams

# U+FFFD: what a byte that does not decode becomes.
REPLACEMENT = "\ufffd"


def broken_rule(
    frame: pd.DataFrame, p: ValidateParams, labels: tuple[str, ...] | None, strict: bool
) -> pd.Series:
    """Per row, the first rule it breaks (None when it breaks none), in validate's order:
    a null, blank, too short or too long text, undecodable bytes (when the input's
    `encoding_errors` is strict), a null label or one outside `labels` (when labelled)."""
    text = frame["text"]
    rules: list[tuple[str, pd.Series]] = [
        ("text_not_null", text.isna()),
        ("text_not_blank", ~text.fillna("").str.contains(r"\S", regex=True)),
        ("text_length", ~text.fillna("").str.len().between(p.min_chars, p.max_chars)),
    ]
    if strict:
        rules.append(("text_decodes", text.fillna("").str.contains(REPLACEMENT, regex=False)))
    if labels is not None and "label" in frame.columns:
        label = frame["label"]
        rules += [("label_not_null", label.isna()), ("label_in_set", label.notna() & ~label.isin(labels))]
    broken = pd.Series(None, index=frame.index, dtype="object")
    for name, mask in reversed(rules):
        broken = broken.mask(mask.fillna(False).astype(bool), name)
    return broken
