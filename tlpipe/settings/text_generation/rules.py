"""A language model's validation suites, built from params: every split of the target
(train, val, test, pool) and the source are text inputs (`tlpipe.text_rules`: a `text`
column, non-null, non-blank texts within the length bounds; a source needs
`min_source_rows` rows); each of train, val and test needs `min_per_class` rows; and no
normalised text may appear in more than one split, so no held-out text was trained on
(prepare has already dropped repeats within an input and source texts that are also
target texts)."""

from __future__ import annotations

import pandas as pd

from tlpipe.expectations import Frame
from tlpipe.labelled_rules import leakage_frame, min_rows_spec
from tlpipe.params import TARGET_SPLITS, DataParams, ValidateParams
from tlpipe.text_rows import identity
from tlpipe.text_rules import text_split_specs


def suite(p: ValidateParams, data: DataParams, splits: dict[str, pd.DataFrame]) -> list[Frame]:
    """Every input's frames and expectations (see the module's docstring)."""
    frames = []
    for name, df in splits.items():
        specs = text_split_specs(p, None, name, df)
        if name in TARGET_SPLITS:
            specs = (*specs, min_rows_spec("min_rows", name, p.min_per_class, "texts"))
        frames.append(Frame(name, name, df, specs))
    how = " (lowercased, whitespace collapsed, stripped)"
    frames.append(leakage_frame(splits, identity, "text", "text_normalised", "normalised text", how))
    return frames


SUITE = suite
