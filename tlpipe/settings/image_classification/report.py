"""The image classifier's parts of the run's report and of a release's model card: the
shared classifier sections (`tlpipe.report.ClassifierSections`) with what the
preprocessor did to the images and a grid of test images with their true and predicted
labels (made for the page from the prepared test split and evaluate's confusion.csv, one
row per test image in order). Reads outputs only (no torch)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tlpipe.params import Params
from tlpipe.report import Block, ClassifierSections, Image, pct, read_json
from tlpipe.settings.image_classification import SPEC

# The grid's size: its mistakes first, then correct predictions, in test order.
GRID_COLUMNS, GRID_ROWS = 8, 4


class ImageClassifierReport(ClassifierSections):
    # The classical reference arm of the curve (tlpipe.settings.image_classification.reference).
    reference_name = SPEC.reference_name
    reference_note = (
        "The reference is a classical model on the same rows (logistic regression on the "
        "standardised pixels the preprocessor makes); the gate compares transfer with scratch only."
    )
    kind = "Image classifier"
    new_model = "a new CNN"

    def shipped_notes(self, params: Params, metrics: dict[str, Any], out: Path) -> list[Block]:
        notes: list[Block] = []
        facts = read_json(out / "finetune" / "metrics.json").get("preprocessed")
        if facts:
            mode = "grayscale" if facts["channels"] == 1 else "RGB"
            notes.append(
                f"Images are converted to {mode} and resized to {facts['size']}x{facts['size']}: "
                f"{pct(facts['train_resized_share'])} of train and {pct(facts['val_resized_share'])} "
                "of val images were another size."
            )
        grid = test_grid(out, params.data.labels)
        if grid is not None:
            notes.append(Image(None, "test images: true / predicted label, mistakes first (red)", grid))
        return notes


def test_grid(out: Path, labels: tuple[str, ...]) -> bytes | None:
    """A PNG of up to GRID_COLUMNS x GRID_ROWS test images titled `true / predicted`,
    mistakes first; None before evaluate has run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from tlpipe.images import decode

    confusion, test_file = out / "evaluate" / "confusion.csv", out / "prepare" / "test.parquet"
    if not (confusion.is_file() and test_file.is_file()):
        return None
    predicted = pd.read_csv(confusion, dtype=str, keep_default_na=False)
    test = pd.read_parquet(test_file, columns=["image"])
    if len(predicted) != len(test) or not len(test):
        return None
    wrong = (predicted["actual"] != predicted["predicted"]).to_numpy()
    order = [*[i for i in range(len(test)) if wrong[i]], *[i for i in range(len(test)) if not wrong[i]]]
    picked = order[: GRID_COLUMNS * GRID_ROWS]
    rows = -(-len(picked) // GRID_COLUMNS)
    fig, axes = plt.subplots(rows, GRID_COLUMNS, figsize=(GRID_COLUMNS * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picked, strict=False):
        pixels = decode(test["image"].iloc[i])
        ax.imshow(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, cmap="gray", interpolation="nearest")
        ax.set_title(
            f"{predicted['actual'].iloc[i]} / {predicted['predicted'].iloc[i]}",
            fontsize=8,
            color="#b00020" if wrong[i] else "#1b5e20",
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


REPORT = ImageClassifierReport()
