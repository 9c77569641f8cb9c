"""The image classifier's validation suites, built from params: every split's images are
decoded once (Pillow) and what was found is validated with Great Expectations. Every
target split (train, val, test and pool) must have an `image` and a `label` column, images
that decode, sides within [min_side, max_side], a channel count from `channels`, labels
from the target's label set, and `min_per_class` rows of every label (the pool too, when
it has rows). A labelled source gets the same row checks against its own label set, an
unlabelled one the image checks alone, and either needs `min_source_rows` rows. No image
(the hash of its decoded pixels) may appear in more than one split, the source included."""

from __future__ import annotations

import pandas as pd

from tlpipe.expectations import Frame, Spec, examples
from tlpipe.images import image_facts
from tlpipe.labelled_rules import (
    classifier_suite,
    exists_specs,
    label_specs,
    leakage_frame,
    min_source_rows_spec,
)
from tlpipe.params import DataParams, ValidateParams
from tlpipe.settings.image_classification.rows import identity


def suite(p: ValidateParams, data: DataParams, splits: dict[str, pd.DataFrame]) -> list[Frame]:
    """Every input's frames and expectations (see the module's docstring)."""
    leakage = leakage_frame(splits, identity, "image", "pixels_sha256", "image (decoded pixels)")
    return classifier_suite(p, data, splits, _split_specs, _facts, leakage)


def _facts(df: pd.DataFrame) -> pd.DataFrame:
    """One row per image: what decoding found (`image` holds its pixels' hash), and its label."""
    if "image" not in df.columns:
        return df.drop(columns=[c for c in df.columns if c != "label"])
    found = image_facts(df["image"])
    facts = pd.DataFrame(
        {
            "image": found["pixels_sha256"],
            "decode_error": found["error"],
            "shortest_side": found[["width", "height"]].min(axis=1).astype("Int64"),
            "longest_side": found[["width", "height"]].max(axis=1).astype("Int64"),
            "channels": found["channels"],
        }
    )
    if "label" in df.columns:
        facts["label"] = df["label"]
    return facts.reset_index(drop=True)


def _split_specs(
    p: ValidateParams, labels: tuple[str, ...] | None, split: str, df: pd.DataFrame
) -> tuple[Spec, ...]:
    """The row checks of one split: its columns, its images and, when `labels` is given,
    its labels; a source also needs `min_source_rows` rows."""
    import great_expectations.expectations as gxe

    specs = exists_specs(("image", "label") if labels is not None else ("image",), len(df))
    if "image" in df.columns:
        specs += [
            Spec(
                "image_decodes",
                "image",
                "every image decodes",
                gxe.ExpectColumnValuesToBeNull(column="decode_error"),
                lambda r, u, n: f"{u} of {n} images do not decode" + examples(r, 2),
            ),
            Spec(
                "image_min_side",
                "image",
                f"every image is at least {p.min_side} pixels on its shorter side",
                gxe.ExpectColumnValuesToBeBetween(column="shortest_side", min_value=p.min_side),
                lambda r, u, n: f"{u} of {n} images have a side below {p.min_side} pixels",
            ),
            Spec(
                "image_max_side",
                "image",
                f"every image is at most {p.max_side} pixels on its longer side",
                gxe.ExpectColumnValuesToBeBetween(column="longest_side", max_value=p.max_side),
                lambda r, u, n: f"{u} of {n} images have a side above {p.max_side} pixels",
            ),
            Spec(
                "image_channels",
                "image",
                f"every image has {' or '.join(map(str, p.channels))} channel(s)",
                gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=list(p.channels)),
                lambda r, u, n: f"{u} of {n} images have another channel count" + examples(r),
            ),
        ]
    if labels is not None and "label" in df.columns:
        specs += label_specs(labels)
    if split == "source":
        specs.append(min_source_rows_spec(p))
    return tuple(specs)


SUITE = suite
