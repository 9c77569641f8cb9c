"""The image classifier's row-level rules, as pandas masks: what prepare sets aside under
`validate.rows: quarantine` (the rules module checks the same rules with Great
Expectations), and what makes two rows the same image (de-duplication, leakage): the hash
of its decoded pixels, so a PNG and a JPEG re-save of one picture differ but two copies of
one file, or one picture in two lossless formats, are the same. Pillow and NumPy alone."""

from __future__ import annotations

import pandas as pd

from tlpipe.images import image_facts
from tlpipe.params import ValidateParams


def broken_rule(frame: pd.DataFrame, p: ValidateParams, labels: tuple[str, ...] | None) -> pd.Series:
    """Per row, the first rule it breaks (None when it breaks none), in validate's order: an
    image that is missing or does not decode, a side below min_side or above max_side, a channel
    count outside `channels`, a null label or one outside `labels` (when labelled)."""
    facts = image_facts(frame["image"])
    decoded = facts["error"].isna()
    shortest = facts[["width", "height"]].min(axis=1)
    longest = facts[["width", "height"]].max(axis=1)
    rules: list[tuple[str, pd.Series]] = [
        ("image_decodes", ~decoded),
        ("image_min_side", decoded & (shortest < p.min_side).fillna(False)),
        ("image_max_side", decoded & (longest > p.max_side).fillna(False)),
        ("image_channels", decoded & ~facts["channels"].isin(list(p.channels)).fillna(False)),
    ]
    if labels is not None and "label" in frame.columns:
        label = frame["label"]
        rules += [("label_not_null", label.isna()), ("label_in_set", label.notna() & ~label.isin(labels))]
    broken = pd.Series(None, index=frame.index, dtype="object")
    for name, mask in reversed(rules):
        broken = broken.mask(mask.fillna(False).astype(bool).to_numpy(), name)
    return broken


def identity(frame: pd.DataFrame) -> pd.Series:
    """What makes two rows the same image: the SHA-256 of its decoded pixels (None when it
    does not decode)."""
    return image_facts(frame["image"])["pixels_sha256"].astype(object).where(lambda s: s.notna(), None)


class ImageRows:
    item = "image"
    broken_rule = staticmethod(broken_rule)
    identity = staticmethod(identity)


ROWS = ImageRows()
